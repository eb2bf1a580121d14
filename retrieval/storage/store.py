"""SQLite metadata store, the index's source of truth: files, items, their vectors, settings.

All SQL lives here. Vectors are kept as float32 blobs beside the items so a FAISS file can
always be rebuilt without re-encoding. The schema is created in one place, `_create_schema`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import RetrievalError, UsageError
from ..core.imports import without_module
from ..core.types import MODALITIES

if TYPE_CHECKING:  # PIL stays unloaded for readers that never see an image
    from ..media.images import ImageFacts

# A caption a model wrote (see `build.captions`): a text item marked so in its metadata.
_GENERATED = "coalesce(json_extract({item}.meta, '$.generated'), 0) = 1"

# What `where` filters see: one row per item with its file's columns.
ITEM_VIEW = """
CREATE VIEW IF NOT EXISTS item_view AS
SELECT items.id, items.modality, items.uri, items.text, items.parent_id, items.meta,
       files.path, files.size, files.mtime_ns / 1000000000 AS mtime
FROM items LEFT JOIN files ON files.id = items.file_id
"""
ITEM_VIEW_COLUMNS = "id, modality, uri, text, parent_id, meta, path, size, mtime"
WHERE_TIMEOUT_S = 3.0  # how long a raw SQL `where` may run before it is stopped
WHERE_MAX_VALUE = 1_000_000  # bytes a string or blob made inside a `where` may hold


@dataclass(frozen=True)
class FileRow:
    id: int
    path: str
    kind: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass(frozen=True)
class SkippedRow:
    """A file a build could not use, as it was then: re-read only once it changes."""

    path: str
    size: int
    mtime_ns: int
    conditions: str
    reason: str


@dataclass(frozen=True)
class ItemRow:
    id: int
    modality: str
    uri: str
    text: str | None
    parent_id: int | None
    meta: dict
    path: str | None


@dataclass(frozen=True)
class ImageFileRow:
    """An indexed image file as duplicate finding sees it; width, height and hashes are None
    where its facts were never measured (an index built before they were recorded)."""

    item_id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str
    width: int | None
    height: int | None
    phash: str | None
    dhash: str | None


@dataclass(frozen=True)
class NewItem:
    """An item ready to be written: its metadata and its vector."""

    uri: str
    modality: str
    vector: np.ndarray
    content_hash: str
    text: str | None = None
    parent_ref: str | None = None
    meta: dict | None = None
    parent_id: int | None = None  # set for an item whose parent is known by id (a written caption)


@dataclass(frozen=True)
class ImageToCaption:
    """An indexed image as the captioning pass sees it: its item, file and content, and the
    caption a model wrote for it before (None when it has none)."""

    id: int
    uri: str
    file_id: int
    path: str
    content_hash: str
    has_human_caption: bool
    caption_id: int | None
    caption_text: str | None
    caption_model: str | None
    caption_method: str | None
    captioned_hash: str | None  # the image content the caption was written for


class Store:
    """One SQLite database in WAL mode; writes happen in explicit transactions."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        # A reader gives each thread a connection of its own, so that a server's request threads
        # search side by side; a writer has one connection (its transactions are its own).
        self._readers = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._opened_lock = threading.Lock()
        self._filtering: set[sqlite3.Connection] = set()  # raw `where` queries running now
        self._stopping = False  # set by `interrupt`: no raw `where` query runs any more
        if readonly:
            conn = self._reader()
        else:
            conn = sqlite3.connect(path, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 30000")
        self._writer = None if readonly else conn
        if not readonly:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._create_schema()

    @property
    def conn(self) -> sqlite3.Connection:
        return self._reader() if self._writer is None else self._writer

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._readers, "conn", None)
        if conn is None:
            conn = _connect_read_only(self.path)
            conn.execute("PRAGMA busy_timeout = 30000")
            self._readers.conn = conn
            with self._opened_lock:
                self._opened.append(conn)
        return conn

    def interrupt(self) -> None:
        """Stop every raw `where` query running now, and refuse later ones (a server shutting
        down): each ends in a RetrievalError saying so."""
        self._stopping = True
        with self._opened_lock:
            for conn in self._filtering:
                conn.interrupt()

    def close(self) -> None:
        with self._opened_lock:
            opened, self._opened = self._opened, []
        for conn in opened if self._writer is None else [*opened, self._writer]:
            conn.close()

    def _create_schema(self) -> None:
        # Only writers create the schema: a reader (a query) needs none of sqlite_utils, whose
        # import costs a tenth of a second, and which imports pandas whenever it is installed
        # (Ray brings it), only to type pandas.Timestamp columns; none here holds one.
        with without_module("pandas"):
            import sqlite_utils

        db = sqlite_utils.Database(self.conn)
        with self.conn:
            db["info"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
            db["files"].create({
                "id": int, "path": str, "root": str, "kind": str, "size": int,
                "mtime_ns": int, "sha256": str,
            }, pk="id", not_null={"path", "kind"}, if_not_exists=True)
            db["items"].create({
                "id": int, "modality": str, "file_id": int, "uri": str, "text": str,
                "parent_ref": str, "parent_id": int, "content_hash": str, "meta": str,
            }, pk="id", not_null={"modality", "uri"}, if_not_exists=True)
            db["vectors"].create({"item_id": int, "vector": bytes}, pk="item_id", if_not_exists=True)
            # Files a build could not use, so an unchanged one is neither read nor warned about
            # again; `conditions` are the limits it was judged under.
            db["skipped"].create({"path": str, "size": int, "mtime_ns": int, "conditions": str,
                                  "reason": str}, pk="path", if_not_exists=True)
            # An image content's size and perceptual hashes, by content hash: copies share them,
            # moves keep them. Created here for indexes older than it too (it starts empty).
            db["image_facts"].create({"sha256": str, "width": int, "height": int, "phash": str,
                                      "dhash": str}, pk="sha256", if_not_exists=True)
            db["files"].create_index(["path"], unique=True, if_not_exists=True)
            db["files"].create_index(["sha256"], if_not_exists=True)
            db["items"].create_index(["uri"], unique=True, if_not_exists=True)
            db["items"].create_index(["file_id"], if_not_exists=True)
            db["items"].create_index(["parent_id"], if_not_exists=True)
            db["items"].create_index(["modality", "content_hash"], if_not_exists=True)
            self.conn.execute(ITEM_VIEW)

    # -- settings ---------------------------------------------------------------------------

    def get_info(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM info WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_info(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", [key, value])

    def delete_info(self, key: str) -> None:
        self.conn.execute("DELETE FROM info WHERE key = ?", [key])

    def sources(self) -> list[str]:
        """Folders and files given to past builds, so a bare rebuild knows where to look."""
        return json.loads(self.get_info("sources", "[]"))

    def set_sources(self, sources: Sequence[str]) -> None:
        self.set_info("sources", json.dumps(sorted(set(sources))))

    def source_options(self) -> dict[str, dict]:
        """How each source was walked (see `corpus.WalkOptions`), by source; indexes built
        before this was recorded have none, and their sources take the defaults."""
        return json.loads(self.get_info("source_options", "{}"))

    def set_source_options(self, options: dict[str, dict]) -> None:
        self.set_info("source_options", json.dumps(options, sort_keys=True))

    def captions_files(self) -> list[str]:
        """Captions files named in past builds, so a bare rebuild reads them again."""
        return json.loads(self.get_info("captions_files", "[]"))

    def set_captions_files(self, paths: Sequence[str]) -> None:
        self.set_info("captions_files", json.dumps(sorted(set(paths))))

    def generation(self, modality: str) -> int:
        """A counter bumped by every committed change to a modality's vectors."""
        return int(self.get_info(f"generation:{modality}", "0"))

    def bump_generation(self, modality: str) -> None:
        self.set_info(f"generation:{modality}", str(self.generation(modality) + 1))

    def is_empty(self) -> bool:
        return self.conn.execute("SELECT 1 FROM files LIMIT 1").fetchone() is None

    def clear(self) -> None:
        """Forget every file, item and vector (for a rebuild with another model)."""
        for table in ("vectors", "items", "files", "skipped", "image_facts"):
            self.conn.execute(f"DELETE FROM {table}")
        for modality in MODALITIES:
            self.bump_generation(modality)
        self.set_info("dim", "0")

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Inside a transaction: undo this block's writes if it raises, keep the rest."""
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN")
        self.conn.execute("SAVEPOINT block")
        try:
            yield
        except BaseException:
            if self.conn.in_transaction:  # else SQLite itself rolled back (a full disk)
                self.conn.execute("ROLLBACK TO block")
            raise
        finally:
            if self.conn.in_transaction:
                self.conn.execute("RELEASE block")

    # -- files ------------------------------------------------------------------------------

    def files_by_path(self) -> dict[str, FileRow]:
        rows = self.conn.execute("SELECT id, path, kind, size, mtime_ns, sha256 FROM files")
        return {row[1]: FileRow(*row) for row in rows}

    def file_row(self, path: str) -> FileRow | None:
        row = self.conn.execute(
            "SELECT id, path, kind, size, mtime_ns, sha256 FROM files WHERE path = ?", [path]).fetchone()
        return FileRow(*row) if row else None

    def upsert_file(self, path: str, root: str, kind: str, size: int, mtime_ns: int,
                    sha256: str) -> int:
        self.conn.execute(
            "INSERT INTO files (path, root, kind, size, mtime_ns, sha256) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET root = excluded.root, kind = excluded.kind, "
            "size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256",
            [path, root, kind, size, mtime_ns, sha256])
        return self.conn.execute("SELECT id FROM files WHERE path = ?", [path]).fetchone()[0]

    def touch_file(self, file_id: int, size: int, mtime_ns: int) -> None:
        self.conn.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?",
                          [size, mtime_ns, file_id])

    def move_file(self, file_id: int, old_path: str, new_path: str, root: str, size: int,
                  mtime_ns: int) -> None:
        """A renamed file keeps its items, ids and vectors; only paths change."""
        self.conn.execute(
            "UPDATE files SET path = ?, root = ?, size = ?, mtime_ns = ? WHERE id = ?",
            [new_path, root, size, mtime_ns, file_id])
        self.conn.execute(
            "UPDATE items SET uri = ? || substr(uri, ?) WHERE file_id = ?",
            [new_path, len(old_path) + 1, file_id])

    def delete_files(self, file_ids: Sequence[int]) -> dict[str, list[int]]:
        """Delete files with their items and vectors; returns the removed item ids by modality."""
        removed: dict[str, list[int]] = {}
        for file_id in file_ids:
            for item_id, modality in self.conn.execute(
                    "SELECT id, modality FROM items WHERE file_id = ?", [file_id]).fetchall():
                removed.setdefault(modality, []).append(item_id)
        self.delete_items([i for ids in removed.values() for i in ids])
        self.conn.executemany("DELETE FROM files WHERE id = ?", [[i] for i in file_ids])
        return removed

    def skipped_files(self) -> dict[str, SkippedRow]:
        rows = self.conn.execute("SELECT path, size, mtime_ns, conditions, reason FROM skipped")
        return {row[0]: SkippedRow(*row) for row in rows}

    def remember_skipped(self, row: SkippedRow) -> None:
        self.conn.execute("INSERT OR REPLACE INTO skipped (path, size, mtime_ns, conditions, reason) "
                          "VALUES (?, ?, ?, ?, ?)", list(astuple(row)))

    def forget_skipped(self, paths: Iterable[str]) -> None:
        self.conn.executemany("DELETE FROM skipped WHERE path = ?", [[p] for p in paths])

    # -- image facts ------------------------------------------------------------------------

    def record_image_facts(self, sha256: str, facts: ImageFacts) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO image_facts (sha256, width, height, phash, dhash) "
            "VALUES (?, ?, ?, ?, ?)", [sha256, facts.width, facts.height, facts.phash, facts.dhash])

    def images_without_facts(self, want_hashes: bool) -> list[tuple[str, str]]:
        """(content hash, one path) of each indexed image content whose facts were never
        measured, or, with `want_hashes`, lack perceptual hashes although it could be read
        (width 0 marks one that could not)."""
        missing = "image_facts.sha256 IS NULL"
        if want_hashes:
            missing += " OR (image_facts.phash IS NULL AND image_facts.width > 0)"
        rows = self.conn.execute(
            "SELECT files.sha256, min(files.path) FROM files LEFT JOIN image_facts "
            "ON image_facts.sha256 = files.sha256 "
            f"WHERE files.kind = 'image' AND files.sha256 != '' AND ({missing}) GROUP BY files.sha256")
        return [(digest, path) for digest, path in rows]

    def _has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 [name]).fetchone() is not None

    def forget_unused_facts(self) -> None:
        """Drop the facts of contents no indexed file holds any more."""
        self.conn.execute("DELETE FROM image_facts WHERE sha256 NOT IN "
                          "(SELECT sha256 FROM files WHERE kind = 'image')")

    def image_files(self, under: str | None = None, condition: tuple[str, list] | None = None
                    ) -> list[ImageFileRow]:
        """Every indexed image file (`under`: at or below that stored path; `condition`: SQL over
        item_view with its parameters, a compiled filter), with its facts."""
        if self._has_table("image_facts"):
            facts = ("image_facts.width, image_facts.height, image_facts.phash, image_facts.dhash "
                     "FROM items JOIN files ON files.id = items.file_id "
                     "LEFT JOIN image_facts ON image_facts.sha256 = files.sha256 ")
        else:  # an index older than facts, opened read-only: none measured
            facts = "NULL, NULL, NULL, NULL FROM items JOIN files ON files.id = items.file_id "
        sql = ("SELECT items.id, files.path, files.size, files.mtime_ns, files.sha256, "
               + facts + "WHERE items.modality = 'image'")
        params: list = []
        if under:
            sql += " AND " + _under_clause("files.path")
            params += _under_params(under)
        if condition:
            sql += f" AND items.id IN (SELECT id FROM item_view WHERE {condition[0]})"
            params += condition[1]
        rows = self.conn.execute(sql + " ORDER BY items.id", params)
        return [ImageFileRow(*row) for row in rows]

    # -- items ------------------------------------------------------------------------------

    def items_of_file(self, file_id: int) -> dict[str, tuple[int, str, str | None]]:
        """uri -> (id, content_hash, parent_ref) for the items a file holds."""
        rows = self.conn.execute(
            "SELECT uri, id, content_hash, parent_ref FROM items WHERE file_id = ?", [file_id])
        return {uri: (item_id, digest, parent) for uri, item_id, digest, parent in rows}

    def insert_items(self, file_id: int, items: Sequence[NewItem]) -> list[int]:
        ids = []
        for item in items:
            cursor = self.conn.execute(
                "INSERT INTO items (modality, file_id, uri, text, parent_ref, parent_id, content_hash, "
                "meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [item.modality, file_id, item.uri, item.text, item.parent_ref, item.parent_id,
                 item.content_hash, json.dumps(item.meta) if item.meta else None])
            ids.append(cursor.lastrowid)
        self.conn.executemany(
            "INSERT INTO vectors (item_id, vector) VALUES (?, ?)",
            [(item_id, _blob(item.vector)) for item_id, item in zip(ids, items)])
        return ids

    def replace_vector(self, item_id: int, vector: np.ndarray, content_hash: str) -> None:
        self.conn.execute("UPDATE items SET content_hash = ? WHERE id = ?", [content_hash, item_id])
        self.conn.execute("UPDATE vectors SET vector = ? WHERE item_id = ?", [_blob(vector), item_id])

    def delete_items(self, item_ids: Sequence[int]) -> None:
        params = [[i] for i in item_ids]
        self.conn.executemany("DELETE FROM vectors WHERE item_id = ?", params)
        self.conn.executemany("DELETE FROM items WHERE id = ?", params)

    def vectors_for_hashes(self, modality: str, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Stored vectors of items with these content hashes: embeddings never computed twice."""
        found: dict[str, np.ndarray] = {}
        for chunk in _chunks(list(set(hashes)), 500):
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(
                f"SELECT items.content_hash, vectors.vector FROM items "
                f"JOIN vectors ON vectors.item_id = items.id "
                f"WHERE items.modality = ? AND items.content_hash IN ({marks})", [modality, *chunk])
            for digest, blob in rows:
                found[digest] = np.frombuffer(blob, dtype=np.float32)
        return found

    def items_of_file_with_hash(self, sha256: str, modality: str) -> list[tuple[dict, np.ndarray]]:
        """(metadata, vector) of each item of one indexed file with this content, in id order:
        what a copy of that file needs to be indexed without encoding."""
        row = self.conn.execute("SELECT id FROM files WHERE sha256 = ? AND kind = ? LIMIT 1",
                                [sha256, modality]).fetchone()
        if row is None:
            return []
        rows = self.conn.execute(  # not the captions written for it: those are text items
            "SELECT items.meta, vectors.vector FROM items JOIN vectors ON vectors.item_id = items.id "
            "WHERE items.file_id = ? AND items.modality = ? ORDER BY items.id", [row[0], modality])
        return [(json.loads(meta) if meta else {}, np.frombuffer(blob, dtype=np.float32))
                for meta, blob in rows]

    def file_ids_of_kind(self, kind: str) -> list[int]:
        return [row[0] for row in self.conn.execute("SELECT id FROM files WHERE kind = ?", [kind])]

    def link_captions(self) -> None:
        """Point each caption at its image: by path beside its captions file, else by file name.

        Run after every change, so captions find images indexed later and let go of removed ones.
        """
        by_uri: dict[str, int] = {}
        by_name: dict[str, int | None] = {}
        for item_id, uri in self.conn.execute("SELECT id, uri FROM items WHERE modality = 'image'"):
            by_uri[uri] = item_id
            name = os.path.basename(uri)
            by_name[name] = None if name in by_name else item_id  # an ambiguous name links nothing
        changes = []
        for item_id, ref, current, source in self.conn.execute(
                "SELECT items.id, items.parent_ref, items.parent_id, files.path FROM items "
                "JOIN files ON files.id = items.file_id WHERE items.parent_ref IS NOT NULL"):
            beside = os.path.normpath(os.path.join(os.path.dirname(source), ref))
            target = by_uri.get(beside) or by_uri.get(ref) or by_name.get(os.path.basename(ref))
            if target != current:
                changes.append((target, item_id))
        self.conn.executemany("UPDATE items SET parent_id = ? WHERE id = ?", changes)

    def images_to_caption(self) -> list[ImageToCaption]:
        """Every indexed image, in id order, with whether a human caption points at it and the
        caption a model wrote for it (a text item of the image's own file, marked generated)."""
        rows = self.conn.execute(f"""
            SELECT images.id, images.uri, images.file_id, files.path, images.content_hash,
                   EXISTS (SELECT 1 FROM items AS human WHERE human.parent_id = images.id
                           AND NOT {_GENERATED.format(item="human")}),
                   written.id, written.text, json_extract(written.meta, '$.caption_model'),
                   json_extract(written.meta, '$.caption_method'), json_extract(written.meta, '$.image_hash')
            FROM items AS images JOIN files ON files.id = images.file_id
            LEFT JOIN items AS written ON written.parent_id = images.id
                 AND {_GENERATED.format(item="written")}
            WHERE images.modality = 'image' ORDER BY images.id""")
        return [ImageToCaption(*row[:5], bool(row[5]), *row[6:]) for row in rows]

    def generated_caption_count(self) -> int:
        return self.conn.execute(
            f"SELECT count(*) FROM items WHERE {_GENERATED.format(item='items')}").fetchone()[0]

    # -- reading ----------------------------------------------------------------------------

    def count(self, modality: str) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM items WHERE modality = ?", [modality]).fetchone()[0]

    def stored_dim(self, modality: str) -> int:
        """The length of a modality's stored vectors; 0 when it has none."""
        row = self.conn.execute(
            "SELECT length(vectors.vector) FROM items JOIN vectors ON vectors.item_id = items.id "
            "WHERE items.modality = ? LIMIT 1", [modality]).fetchone()
        return row[0] // np.dtype(np.float32).itemsize if row else 0

    def all_vectors(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of every item of a modality, in id order."""
        batches = list(self.iter_vectors(modality))
        if not batches:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])

    def iter_vectors(self, modality: str, batch: int = 65536
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) of a modality in id order, a batch at a time."""
        cursor = self.conn.execute(
            "SELECT items.id, vectors.vector FROM items JOIN vectors ON vectors.item_id = items.id "
            "WHERE items.modality = ? ORDER BY items.id", [modality])
        while rows := cursor.fetchmany(batch):
            yield _id_vector_rows(rows)

    def vectors_for_ids(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of these items, in the order given (exact re-ranking and the search for
        duplicates read these). Each row is written straight into the result, so reading a
        million vectors holds them once, not again as bytes."""
        rows_of: dict[int, list[int]] = {}
        for row, item_id in enumerate(ids.tolist() if isinstance(ids, np.ndarray) else ids):
            rows_of.setdefault(int(item_id), []).append(row)
        result: np.ndarray | None = None
        for chunk in _chunks(list(rows_of), 500):
            marks = ",".join("?" * len(chunk))
            for item_id, blob in self.conn.execute(
                    f"SELECT item_id, vector FROM vectors WHERE item_id IN ({marks})", chunk):
                vector = np.frombuffer(blob, dtype=np.float32)
                if result is None:
                    result = np.empty((len(ids), len(vector)), np.float32)
                result[rows_of.pop(item_id)] = vector
        if rows_of:  # as before: an item without a stored vector is a KeyError
            raise KeyError(next(iter(rows_of)))
        return result if result is not None else np.zeros((len(ids), 0), np.float32)

    def item_ids(self, modality: str, where: str | None = None, under: str | None = None,
                 condition: tuple[str, list] | None = None,
                 where_timeout: float = WHERE_TIMEOUT_S) -> np.ndarray:
        """Ids of a modality's items whose file is `under` (a stored path: that file, or a folder
        the file lies in), that pass `condition` (SQL over item_view made by the engine, with
        its parameters: a compiled filter) and a raw SQL `where` (see `where_ids`)."""
        sql = "SELECT id FROM item_view WHERE modality = ?"
        params: list = [modality]
        if condition:
            sql += f" AND ({condition[0]})"
            params += condition[1]
        if under:
            sql += " AND " + _under_clause("path")
            params += _under_params(under)
        rows = self.conn.execute(sql, params).fetchall()
        ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
        if where:
            ids = np.intersect1d(ids, self.where_ids(where, where_timeout), assume_unique=True)
        return ids

    def where_ids(self, where: str, timeout: float = WHERE_TIMEOUT_S) -> np.ndarray:
        """Ids of the items passing a raw SQL expression over item_view's columns.

        It runs as a query of its own, on a connection of its own that may only read item_view
        (an authorizer refuses every other table, and any write), for at most `timeout`
        seconds, making no string or blob over WHERE_MAX_VALUE bytes. So `1) OR (1` or a
        subquery gains nothing: whatever ids it yields are only intersected with the engine's.
        """
        if not where.strip():
            return np.zeros(0, np.int64)
        conn = _connect_read_only(self.path)
        deadline = time.monotonic() + timeout
        with self._opened_lock:
            self._filtering.add(conn)
        try:
            conn.execute("PRAGMA query_only = 1")
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, WHERE_MAX_VALUE)
            conn.set_authorizer(_read_item_view_only)
            conn.set_progress_handler(lambda: self._stopping or time.monotonic() > deadline, 1000)
            rows = conn.execute(f"SELECT id FROM item_view WHERE {where}").fetchall()
        except sqlite3.Error as error:
            if self._stopping:  # not the filter's fault: the index is closing under it
                raise RetrievalError("the SQL filter (where) was stopped: the index is closing; "
                                     "ask again later") from None
            if time.monotonic() > deadline:
                reason = (f"stopped after its time limit of {timeout:g} s; make it cheaper, or "
                          "raise `where_timeout`")
            elif "not authorized" in str(error) or "prohibited" in str(error):
                reason = "it may only read item_view"
            elif "one statement at a time" in str(error):  # sqlite3's words for a ';'
                reason = "only one SQL expression is allowed (no ';')"
            else:
                reason = str(error)
            raise UsageError(f"`where` {where!r}: {reason}; columns are {ITEM_VIEW_COLUMNS}") from None
        finally:
            with self._opened_lock:
                self._filtering.discard(conn)
            conn.close()
        return np.unique(np.fromiter((row[0] for row in rows if isinstance(row[0], int)), dtype=np.int64))

    def item_id(self, uri: str, modality: str) -> int | None:
        row = self.conn.execute("SELECT id FROM items WHERE uri = ? AND modality = ?",
                                [uri, modality]).fetchone()
        return row[0] if row else None

    def items(self, item_ids: Sequence[int]) -> dict[int, ItemRow]:
        found: dict[int, ItemRow] = {}
        for chunk in _chunks(list(item_ids), 500):
            marks = ",".join("?" * len(chunk))
            for row in self.conn.execute(
                    f"SELECT id, modality, uri, text, parent_id, meta, path FROM item_view "
                    f"WHERE id IN ({marks})", chunk):
                found[row[0]] = ItemRow(row[0], row[1], row[2], row[3], row[4],
                                        json.loads(row[5]) if row[5] else {}, row[6])
        return found

    def captions_of(self, image_ids: Sequence[int]) -> dict[int, list[tuple[str, bool]]]:
        """Each image's captions as (text, generated), human ones first, each kind in the order
        they were written."""
        found: dict[int, list[tuple[str, bool]]] = {}
        for chunk in _chunks(list(image_ids), 500):
            marks = ",".join("?" * len(chunk))
            generated = _GENERATED.format(item="items")
            for parent, text, written in self.conn.execute(
                    f"SELECT parent_id, text, {generated} FROM items WHERE parent_id IN ({marks}) "
                    f"ORDER BY {generated}, id", chunk):
                found.setdefault(parent, []).append((text, bool(written)))
        return found


@dataclass(frozen=True)
class StoredVectors:
    """A modality's stored vectors, read by ranges of ids on connections of their own: what an
    on-disk build's worker processes read (see `ondisk.VectorSource`)."""

    path: Path
    modality: str
    dim: int

    def ids(self) -> np.ndarray:
        with closing(_connect_read_only(self.path)) as conn:
            rows = conn.execute("SELECT id FROM items WHERE modality = ? ORDER BY id", [self.modality])
            return np.fromiter((row[0] for row in rows), dtype=np.int64)

    def read(self, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
        with closing(_connect_read_only(self.path)) as conn:
            rows = conn.execute(
                "SELECT items.id, vectors.vector FROM items JOIN vectors ON vectors.item_id = items.id "
                "WHERE items.modality = ? AND items.id >= ? AND items.id < ? ORDER BY items.id",
                [self.modality, low, high]).fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        return _id_vector_rows(rows)


def _id_vector_rows(rows: list[tuple[int, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of (id, float32 blob) rows."""
    ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32)
    return ids, vectors.reshape(len(rows), -1)


_WHERE_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}


def _read_item_view_only(action: int, table: str | None, column: str | None, database: str | None,
                         source: str | None) -> int:
    """An authorizer for raw `where` text: read item_view (and what the view itself reads),
    call functions; nothing else."""
    if action in _WHERE_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_READ and (database == "main" and "item_view" in (table, source)
                                          or column == "" and table in ("items", "files")):
        return sqlite3.SQLITE_OK  # no column named: the view's own join, reading no value
    return sqlite3.SQLITE_DENY


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """Read-only, and readable from a read-only folder too.

    A WAL database needs its -shm file to be read; in a folder nobody can write to, nobody
    is writing either, so SQLite may take the file as immutable and skip the WAL machinery.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if os.access(path.parent, os.W_OK):
            raise
        return sqlite3.connect(f"file:{path}?immutable=1", uri=True, check_same_thread=False)


def _under_clause(column: str) -> str:
    """SQL for `column` being a stored path at or below another (see `_under_params`)."""
    # Whole path components, as corpus.is_under compares: photos/ima is not photos/images.
    # substr, not LIKE, which would also take photos/Images for photos/images.
    return f"({column} = ? OR substr({column}, 1, ?) = ?)"


def _under_params(under: str) -> list:
    folder = under.rstrip(os.sep) + os.sep
    return [under, len(folder), folder]


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _chunks(values: list, size: int) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start:start + size]
