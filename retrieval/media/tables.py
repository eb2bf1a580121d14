"""The one reader of row files: CSV with a header, JSONL (one JSON object a line) and TSV (fields
named by the caller, in order). Pairs files, entry manifests, entry queries, caption CSV/JSONL
and JSONL text corpora are all read here, so they split lines, decode JSON and report a bad row
in one way: naming the line (and, through `read_table`, the file).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UsageError

FORMATS = ("csv", "jsonl", "tsv")


class FormatError(ValueError):
    """A file that does not parse; the message names the line (or part) and the problem."""


@dataclass(frozen=True)
class Row:
    """One row: the line it ends on (1 is the first line of the file) and its fields by name."""

    line: int
    fields: dict

    def text(self, *names: str) -> str:
        """The first of these fields that holds a non-empty string or number, stripped; '' if none."""
        for name in names:
            value = self.fields.get(name)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                if str(value).strip():
                    return str(value).strip()
        return ""


def split_lines(content: str) -> list[str]:
    """Lines split on newlines only: str.splitlines also breaks at form feeds and U+2028,
    which are ordinary characters inside a caption or a JSON string."""
    return [line.removesuffix("\r") for line in content.split("\n")]


def parse_json(text: str, where: str):
    """json.loads whose every failure is a FormatError naming `where` (e.g. 'line 3')."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FormatError(f"{where} is not JSON ({error.msg})") from None
    except RecursionError:
        raise FormatError(f"{where} is JSON nested too deeply") from None


def table_format(path: str | Path, other: str = "tsv") -> str:
    """The format a file's suffix names: csv, jsonl, or `other` for any other suffix."""
    suffix = Path(path).suffix.lower()
    return {".csv": "csv", ".jsonl": "jsonl"}.get(suffix, other)


def parse_rows(content: str, format: str, columns: tuple[str, ...] = ()) -> list[Row]:
    """The rows of `content` in `format`; blank lines hold no row. A TSV row's fields are
    `columns` in order (the last takes the rest of the line; missing ones are '')."""
    content = content.removeprefix("\ufeff")
    if format == "csv":
        return _csv_rows(content)
    if format == "jsonl":
        rows = []
        for number, line in enumerate(split_lines(content), 1):
            if line.strip():
                record = parse_json(line, f"line {number}")
                if not isinstance(record, dict):
                    raise FormatError(f"line {number} is not a JSON object")
                rows.append(Row(number, record))
        return rows
    if format == "tsv" and columns:
        return [Row(number, dict(zip(columns, _padded(line.split("\t", len(columns) - 1), len(columns)))))
                for number, line in enumerate(split_lines(content), 1) if line.strip()]
    raise ValueError(f"rows are read from {', '.join(FORMATS)} (TSV with its columns named), not {format!r}")


def csv_header(content: str) -> list[str] | None:
    """The column names of CSV `content` (None when it is empty), so a reader can check them
    even when no row follows."""
    try:
        return next(csv.reader(io.StringIO(content.removeprefix("\ufeff"), newline="")), None)
    except csv.Error as error:
        raise FormatError(f"line 1: {error}") from None


def read_table(path: str | Path, what: str, columns: tuple[str, ...] = (), other: str = "tsv"
               ) -> list[Row]:
    """The rows of the file at `path` (`what` it is, for messages: 'queries file'); its suffix
    picks the format (.csv, .jsonl, else `other`; TSV needs its `columns`). A file that cannot
    be read or parsed is a UsageError naming the file and the line."""
    path = Path(path).expanduser()
    format = table_format(path, other)
    if format == "tsv" and not columns:
        raise UsageError(f"{what} {path}: give a .csv or a .jsonl file")
    try:
        content = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as error:
        raise UsageError(f"{what} {path}: {error.strerror}") from None
    try:
        return parse_rows(content, format, columns)
    except FormatError as error:
        raise UsageError(f"{what} {path}: {error}") from None


def row_error(what: str, path: str | Path, row: Row, problem: str) -> UsageError:
    """The error for a row that parses but lacks what the reader needs, naming file and line."""
    return UsageError(f"{what} {path}, line {row.line}: {problem}")


def _csv_rows(content: str) -> list[Row]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    try:
        return [Row(reader.line_num, row) for row in reader]
    except csv.Error as error:
        raise FormatError(f"line {reader.line_num}: {error}") from None


def _padded(parts: list[str], count: int) -> list[str]:
    return [part.strip() for part in parts] + [""] * (count - len(parts))
