"""Paths as the engine takes them in and as it stores and shows them: absolute with ~ expanded,
always valid UTF-8 text, compared by whole components."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path


def absolute_path(name: str | Path) -> Path:
    """`name` with ~ expanded, absolute, '..' folded away (so one folder has one spelling);
    symlinks are kept. The empty name is refused: it would mean the working directory."""
    text = os.fspath(name)
    if not text.strip():
        raise FileNotFoundError("a path is empty; name a file or folder")
    try:
        return Path(os.path.abspath(os.path.expanduser(text)))
    except ValueError:  # '~' followed by a NUL or a lone surrogate
        raise FileNotFoundError(f"{text!r} cannot name a file or folder") from None


def existing_file(name: str) -> Path | None:
    """`name`, with ~ expanded, if it is a file; None for anything else, including names no
    file system could hold (an unknown ~user, a part over 255 bytes, a NUL)."""
    try:
        path = Path(name).expanduser()
        return path if path.is_file() else None
    except (OSError, RuntimeError, ValueError):
        return None


def display_path(path: str) -> str:
    """A path as the index stores and shows it: valid UTF-8 text that names exactly one file.

    A name's bytes that are not UTF-8 become `\\xNN`, and a backslash in a name is doubled,
    so the name `a\\xffb.jpg` and the bytes `a<ff>b.jpg` stay apart. Other names are kept as
    they are. `path_from_display` turns the stored text back into the path.
    """
    if "\\" not in path:
        try:
            path.encode("utf-8")
            return path
        except UnicodeEncodeError:
            pass
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate no file name decodes to: escape it as text
        return path.replace("\\", "\\\\").encode("utf-8", errors="backslashreplace").decode("utf-8")
    return raw.replace(b"\\", b"\\\\").decode("utf-8", errors="backslashreplace")


_ESCAPE = re.compile(rb"\\(\\|x[0-9a-fA-F]{2})")


def path_from_display(shown: str) -> str:
    """The file system path a stored path names: what `display_path` made it from.

    A backslash that starts no escape is kept as it is (indexes written before backslashes
    were doubled hold such names)."""
    if "\\" not in shown:
        return shown
    raw = _ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1][1:], 16)]),
                      shown.encode("utf-8"))
    return os.fsdecode(raw)


def is_under(path: str, prefixes: Iterable[str]) -> bool:
    """`path` is one of `prefixes` or lies below one (compared as stored: absolute, display form)."""
    return any(path == p or path.startswith(p.rstrip(os.sep) + os.sep) for p in prefixes)


def stored_path(path: str | Path) -> str:
    """A path as the index stores paths: absolute, in display form (odd bytes as \\xNN)."""
    return display_path(str(absolute_path(path)))
