"""The filter language: one small syntax for the CLI's `--filter`, the API's `filter=` and the
page, compiled to parameterised SQL over `item_view` (no text of a filter ever becomes SQL).

A filter is terms separated by spaces, all of which must hold; `-term` negates one. Values with
spaces go in double quotes; field names are case-insensitive:

    modality:image              one modality; several as modality:image,video (any of them)
    path:"*.jpg"                glob over the item's path (* ? [..]; * crosses folders); a
                                pattern that is not absolute matches the path's end
    under:photos/2020           a folder, by whole path components: absolute, or relative to
                                an indexed root
    size>1MB  size<=500KB       bytes; units B, KB, MB, GB (powers of 1000)
    mtime>=2024-01-01           ISO date or datetime (UTC); a bare date is the whole day, so
                                mtime=2024-01-01 is that day and mtime>2024-01-01 after it
    text:dog  text:"red car"    the item's text or any of its captions contains this
                                (case-insensitive for ASCII letters)
    meta.camera=Canon           a metadata JSON field; numbers compare as numbers

Operators for size, mtime and meta: = != < <= > >=.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

from ..core.errors import UsageError
from ..core.paths import display_path
from ..core.types import MODALITIES

OPERATORS = ("<=", ">=", "!=", "=", "<", ">")
UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
FIELDS = ("modality", "path", "under", "size", "mtime", "text", "meta.KEY")

_TOKEN = re.compile(r'(?:[^\s"]+|"[^"]*")+')  # a term: runs of plain or quoted characters
_COMPARISON = re.compile(r"^(size|mtime|meta\.[^<>=!:]+)(<=|>=|!=|=|<|>)(.*)$", re.IGNORECASE | re.DOTALL)
_FIELD = re.compile(r"^(modality|path|under|text):(.*)$", re.IGNORECASE | re.DOTALL)
_NUMBER = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([KMG]?B?)$", re.IGNORECASE)
_META_KEY = re.compile(r"^[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*$")


class FilterError(UsageError):
    """A filter that cannot be understood; names the bad term."""


@dataclass(frozen=True)
class FilterTerm:
    """One term: its SQL over item_view (with ? placeholders), its parameters, and its text."""

    text: str
    sql: str
    params: tuple
    negated: bool = False


@dataclass(frozen=True)
class Filter:
    """A parsed filter: every term must hold. `under:` terms need the index's roots to compile."""

    text: str
    terms: tuple[FilterTerm, ...]
    unders: tuple[tuple[str, bool], ...] = ()  # (folder as given, negated)

    def __bool__(self) -> bool:
        return bool(self.terms or self.unders)

    def sql(self, roots: list[str] = ()) -> tuple[str, list]:
        """A boolean SQL expression over item_view's columns and its parameters; relative
        `under:` folders are looked for below each of `roots` (the index's sources)."""
        parts, params = [], []
        for term in self.terms:
            parts.append(f"NOT ({term.sql})" if term.negated else f"({term.sql})")
            params += term.params
        for folder, negated in self.unders:
            sql, folder_params = _under_sql(folder, roots)
            parts.append(f"NOT ({sql})" if negated else f"({sql})")
            params += folder_params
        return " AND ".join(parts) or "1", params


def parse_filter(text: str | None) -> Filter:
    """Parse a filter (see the module's docstring); FilterError names the first bad term."""
    text = (text or "").strip()
    terms, unders = [], []
    if text.count('"') % 2:
        culprit = text[text.rfind(" ", 0, text.rfind('"')) + 1:]
        raise FilterError(f"filter term {culprit!r}: a double quote is not closed")
    for match in _TOKEN.finditer(text):
        raw = match.group(0)
        negated = raw.startswith("-") and len(raw) > 1
        body = raw[1:] if negated else raw
        field = _FIELD.match(body)
        if field and field.group(1).lower() == "under":
            unders.append((_value(raw, field.group(2)), negated))
            continue
        term = _term(raw, body, field)
        terms.append(FilterTerm(raw, term[0], tuple(term[1]), negated))
    return Filter(text, tuple(terms), tuple(unders))


def _term(raw: str, body: str, field: re.Match | None) -> tuple[str, list]:
    if field:
        name, value = field.group(1).lower(), _value(raw, field.group(2))
        if name == "modality":
            chosen = [m.strip().lower() for m in value.split(",")]
            unknown = [m for m in chosen if m not in MODALITIES]
            if unknown or not chosen:
                raise FilterError(f"filter term {raw!r}: modality must be one or more of "
                                  f"{', '.join(MODALITIES)} (comma-separated)")
            return f"modality IN ({','.join('?' * len(chosen))})", chosen
        if name == "path":
            if value.startswith("/"):
                return "path GLOB ?", [value]
            return "(path GLOB ? OR path GLOB ?)", [value, "*/" + value]
        # text: the item's own text, or any caption pointing at it
        needle = value.lower()
        return ("instr(lower(coalesce(text, '')), ?) > 0 OR id IN "
                "(SELECT parent_id FROM item_view AS caption WHERE caption.parent_id IS NOT NULL "
                "AND instr(lower(caption.text), ?) > 0)"), [needle, needle]
    comparison = _COMPARISON.match(body)
    if not comparison:
        raise FilterError(f"filter term {raw!r}: expected FIELD:VALUE or FIELD<op>VALUE; fields are "
                          f"{', '.join(FIELDS)}, operators {' '.join(OPERATORS)}")
    name, operator, value = comparison.group(1), comparison.group(2), _value(raw, comparison.group(3))
    if name.lower() == "size":
        return f"size {operator} ?", [_bytes(raw, value)]
    if name.lower() == "mtime":
        return _mtime_sql(raw, operator, value)
    key = name[len("meta."):]
    if not _META_KEY.match(key):
        raise FilterError(f"filter term {raw!r}: a metadata key is letters, digits, _ and -, "
                          "dotted for nested fields (meta.camera.model)")
    number = _as_number(value)
    column = "json_extract(meta, ?)"
    if number is not None:  # numbers as numbers; a text field holding one still compares
        return (f"CASE WHEN typeof({column}) IN ('integer', 'real') THEN {column} {operator} ? "
                f"ELSE CAST({column} AS TEXT) {operator} ? END",
                ["$." + key, "$." + key, number, "$." + key, value])
    return f"CAST({column} AS TEXT) {operator} ?", ["$." + key, value]


def _value(raw: str, value: str) -> str:
    value = value.replace('"', "")
    if not value:
        raise FilterError(f"filter term {raw!r}: the value is missing")
    return value


def _bytes(raw: str, value: str) -> float:
    match = _NUMBER.match(value.strip())
    unit = match.group(2).upper() if match else ""
    if match and unit and not unit.endswith("B"):
        unit += "B"
    if not match or unit not in UNITS:
        raise FilterError(f"filter term {raw!r}: expected a number with an optional unit "
                          "(B, KB, MB, GB)")
    return float(match.group(1)) * UNITS[unit]


def _mtime_sql(raw: str, operator: str, value: str) -> tuple[str, list]:
    """A bare date is the whole day [start, end); a datetime is one instant."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
            start = datetime.combine(date.fromisoformat(value), datetime.min.time(), timezone.utc)
            end = start + timedelta(days=1)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            start = end = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    except ValueError:
        raise FilterError(f"filter term {raw!r}: expected an ISO date or datetime, e.g. 2024-01-31 "
                          "or 2024-01-31T12:00") from None
    low, high = start.timestamp(), end.timestamp()
    if low == high:
        return f"mtime {operator} ?", [low]
    return {"=": ("mtime >= ? AND mtime < ?", [low, high]),
            "!=": ("mtime < ? OR mtime >= ?", [low, high]),
            "<": ("mtime < ?", [low]), "<=": ("mtime < ?", [high]),
            ">": ("mtime >= ?", [high]), ">=": ("mtime >= ?", [low])}[operator]


def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _under_sql(folder: str, roots: list[str]) -> tuple[str, list]:
    """Whole path components: photos/ima is not photos/images. substr, not LIKE, which would
    also take photos/Images for photos/images."""
    if os.path.isabs(os.path.expanduser(folder)):
        candidates = [display_path(os.path.normpath(os.path.expanduser(folder)))]
    else:
        relative = os.path.normpath(folder)
        candidates = [os.path.join(root, relative) for root in roots if relative != "."] or \
            list(roots) or ["\0"]  # no roots: nothing matches
    parts, params = [], []
    for path in candidates:
        prefix = path.rstrip(os.sep) + os.sep
        parts.append("path = ? OR substr(path, 1, ?) = ?")
        params += [path, len(prefix), prefix]
    return " OR ".join(parts), params
