"""An index folder on disk: what it holds, opening its database, its one writer's lock, and a
disk that refuses writes turned into one line."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import IndexFormatError, IndexLockedError, IndexWriteError
from ..core.paths import absolute_path
from .manifest import FORMAT_VERSION
from .store import Store

DB_NAME = "meta.sqlite"
LOCK_NAME = "write.lock"
SHARDS_FOLDER = "shards"  # embedding shards of an unfinished distributed build
GATE_NAME = "fusion_gate.safetensors"  # the trained attention gate of entry search
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def holds_index(folder: Path) -> bool:
    """Whether `folder` holds an index (its database)."""
    return (folder / DB_NAME).is_file()


@dataclass(frozen=True)
class MadeFolder:
    """What opening a new index made: its folder and any parents, or, in a folder that was
    there before, the entries it added; `remove` takes away exactly that."""

    top: Path  # the outermost folder made, or the index folder if it was there before
    before: frozenset[str] | None  # what a folder that was there before held

    @classmethod
    def make(cls, folder: Path) -> MadeFolder:
        top = folder
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        try:
            before = frozenset(os.listdir(folder)) if folder.is_dir() else None
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IndexFormatError(f"cannot create index folder {folder}: {error.strerror}") from None
        return cls(top if before is None else folder, before)

    def remove(self) -> None:
        if self.before is None:
            shutil.rmtree(self.top, ignore_errors=True)
            return
        for entry in self.top.iterdir():
            if entry.name not in self.before:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def open_store(folder: Path, readonly: bool) -> Store:
    """The folder's database, refused when it is unreadable or of another format version."""
    try:
        with storage_errors(folder):
            store = Store(folder / DB_NAME, readonly=readonly)
        version = int(store.get_info("format_version", str(FORMAT_VERSION)))
    except sqlite3.DatabaseError as error:
        raise IndexFormatError(
            f"index {folder}: {DB_NAME} cannot be read ({error}); restore it from a backup or "
            "build a new index") from None
    if version != FORMAT_VERSION:
        store.close()
        if version > FORMAT_VERSION:
            raise IndexFormatError(
                f"index {folder} has format version {version}, newer than this version of "
                f"retrieval understands ({FORMAT_VERSION}); upgrade retrieval")
        # No format before version 1 was ever released, so there is nothing to migrate from.
        raise IndexFormatError(
            f"index {folder} has format version {version}, which this version of retrieval "
            f"cannot read; build it again in a new folder")
    return store


@contextmanager
def writer_lock(folder: Path, wait: bool = False, skip_if_busy: bool = False) -> Iterator[bool]:
    """Hold an index folder's one writer lock, with who holds it written in the lock file.

    Another writer is refused at once (IndexLockedError, naming it), waited for with `wait`, or
    with `skip_if_busy` not waited for: then this yields False and holds nothing.
    """
    with storage_errors(folder), open(folder / LOCK_NAME, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if skip_if_busy:
                yield False
                return
            if not wait:
                raise IndexLockedError(folder, lock_holder(folder)) from None
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.truncate(0)
            handle.write(json.dumps({"pid": os.getpid(), "command": command_line(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            handle.flush()
            yield True
        finally:
            handle.truncate(0)  # a holder is named only while it holds the lock
            fcntl.flock(handle, fcntl.LOCK_UN)


def index_writer(path: str | Path) -> str | None:
    """Who is writing the index at `path` now (see `lock_holder`), or None: a quick look
    before slow work, which the lock itself still guards."""
    try:
        folder = absolute_path(path)
        if not (folder / LOCK_NAME).is_file():
            return None
        with writer_lock(folder, skip_if_busy=True) as free:
            return None if free else lock_holder(folder)
    except (OSError, ValueError, IndexWriteError):  # the write itself will say what is wrong
        return None


def lock_holder(folder: Path) -> str:
    """Who holds an index's writer lock, as its lock file says: `pid 12 (retrieve index ~/P)
    since 2025-05-01 10:02:03`; `another process` where the file does not say."""
    try:
        holder = json.loads((folder / LOCK_NAME).read_text(encoding="utf-8"))
        return f"pid {holder['pid']} ({holder['command']}) since {holder['since']}"
    except (OSError, ValueError, TypeError, KeyError):  # not written yet, or by an older version
        return "another process"


def command_line() -> str:
    """This process's command, short: `retrieve index photos`, `python -m retrieval ...`."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m retrieval, python -m retrieval.cli
        program = "retrieve"
    command = shlex.join([program, *sys.argv[1:]])
    return command if len(command) <= 200 else command[:199] + "…"


@contextmanager
def storage_errors(folder: Path) -> Iterator[None]:
    """A full disk or a read-only folder becomes one line; SQLite has rolled back by then."""
    try:
        yield
    except sqlite3.OperationalError as error:
        raise IndexWriteError(_cannot_write(folder, str(error))) from None
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise IndexWriteError(_cannot_write(folder, error.strerror or str(error))) from None


def _cannot_write(folder: Path, reason: str) -> str:
    if folder.exists() and not os.access(folder, os.W_OK):
        reason = "the folder is read-only"  # SQLite only says it cannot open the database
    return (f"cannot write to index {folder} ({reason}); free disk space or make the folder "
            "writable, then run again: what was committed before is kept")
