"""What an index folder holds, read through the store's public methods, for tests that check it
(the one place here that knows the schema is `integrity`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from retrieval.core.types import MODALITIES
from retrieval.storage.store import ItemRow, Store


def items_by_uri(store: Store, modality: str | None = None) -> dict[str, ItemRow]:
    """Every item (of one modality), by uri."""
    modalities = MODALITIES if modality is None else (modality,)
    ids = [int(i) for m in modalities for i in store.item_ids(m)]
    return {row.uri: row for row in store.items(ids).values()}


def item_ids(store: Store, modality: str) -> list[int]:
    """A modality's item ids, in order."""
    return sorted(int(i) for i in store.item_ids(modality))


def committed_items(index_dir: Path, modality: str = "image") -> int | None:
    """How many items of a modality another process has committed; None before the database
    exists, 0 before its schema does."""
    if not (index_dir / "meta.sqlite").exists():
        return None
    try:
        store = Store(index_dir / "meta.sqlite", readonly=True)
    except sqlite3.OperationalError:
        return 0
    try:
        return store.count(modality)
    except sqlite3.OperationalError:  # killed before the schema was created
        return 0
    finally:
        store.close()


def written_captions(index_dir: Path) -> int:
    """How many captions a model wrote that another process has committed (0 before the schema)."""
    if not (index_dir / "meta.sqlite").exists():
        return 0
    try:
        store = Store(index_dir / "meta.sqlite", readonly=True)
    except sqlite3.OperationalError:
        return 0
    try:
        return sum(1 for row in items_by_uri(store, "text").values() if row.meta.get("generated"))
    except sqlite3.OperationalError:  # killed before the schema was created
        return 0
    finally:
        store.close()


def integrity(store: Store) -> dict[str, int]:
    """Vectors without an item, items without a vector, and items sharing a uri: all 0 in a
    sound index."""
    def count(sql: str) -> int:
        return store.conn.execute(sql).fetchone()[0]

    return {
        "orphan vectors": count("SELECT count(*) FROM vectors WHERE item_id NOT IN (SELECT id FROM items)"),
        "items without vectors": count(
            "SELECT count(*) FROM items WHERE id NOT IN (SELECT item_id FROM vectors)"),
        "duplicated uris": count("SELECT count(*) - count(DISTINCT uri) FROM items"),
    }
