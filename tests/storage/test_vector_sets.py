"""VectorSets keeps each modality's FAISS index in step with SQLite: changes applied in place,
rebuilt when stale or of another type, saved with the generation it reflects, and cached by it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.vectors import DIM, clustered

from retrieval.storage.manifest import Manifest
from retrieval.storage.settings import Settings
from retrieval.storage.store import NewItem, Store
from retrieval.storage.vector_sets import VectorSets


class Folder:
    """An index folder's store, settings and vector sets, as a writer or a reader opens them."""

    def __init__(self, folder: Path, readonly: bool = False) -> None:
        self.store = Store(folder / "meta.sqlite", readonly=readonly)
        self.settings = Settings(folder, self.store)
        self.vectors = VectorSets(folder, self.store, self.settings, readonly)

    def add(self, name: str, vectors: np.ndarray) -> dict[int, np.ndarray]:
        """Commit a text file's items, as a build would; returns id -> vector."""
        with self.store.conn:
            file_id = self.store.upsert_file(f"/{name}", "/", "text", 0, 0, name)
            ids = self.store.insert_items(file_id, [NewItem(f"/{name}#L{n}", "text", v, f"{name}{n}")
                                                    for n, v in enumerate(vectors)])
            self.store.bump_generation("text")
        return dict(zip(ids, vectors))

    def remove(self, name: str) -> dict[int, None]:
        with self.store.conn:
            removed = self.store.delete_files([self.store.file_row(f"/{name}").id])
            self.store.bump_generation("text")
        return dict.fromkeys(removed.get("text", []))


@pytest.fixture
def writer(tmp_path) -> Folder:
    folder = Folder(tmp_path)
    folder.settings.record_dim(DIM, "the synthetic vectors")
    yield folder
    folder.store.close()


def ids_of(vectors) -> list[int]:
    return sorted(vectors.ids().tolist())


def test_a_build_applies_its_changes_in_place_and_saves_them(writer, tmp_path):
    base = {"text": writer.vectors.fresh("text")}
    assert base["text"] is None  # nothing saved yet
    first = writer.add("a.txt", clustered(20))
    writer.vectors.apply({"text": first}, base)
    index = writer.vectors.get("text")
    assert ids_of(index) == sorted(first) and len(index) == 20
    state = Manifest.read(tmp_path).vectors["text"]
    assert (state.count, state.generation, state.file) == (20, writer.store.generation("text"), "text.faiss")
    assert Manifest.read(tmp_path).counts["text"] == 20

    base = {"text": writer.vectors.fresh("text")}
    second = writer.add("b.txt", clustered(5, seed=1))
    gone = writer.remove("a.txt")
    writer.vectors.apply({"text": {**second, **gone}}, base)
    assert ids_of(writer.vectors.get("text")) == sorted(second)
    assert Manifest.read(tmp_path).vectors["text"].count == 5


def test_a_stale_index_is_rebuilt_from_sqlite(writer):
    writer.vectors.apply({"text": writer.add("a.txt", clustered(10))}, {"text": None})
    before = writer.vectors.get("text")
    writer.add("b.txt", clustered(3, seed=2))  # committed, but no FAISS change applied
    assert writer.vectors.fresh("text") is None
    rebuilt = writer.vectors.get("text")
    assert rebuilt is not before and len(rebuilt) == 13


def test_the_cache_answers_while_the_generation_stands(writer, tmp_path):
    writer.vectors.apply({"text": writer.add("a.txt", clustered(10))}, {"text": None})
    assert writer.vectors.get("text") is writer.vectors.get("text")
    reader = Folder(tmp_path, readonly=True)
    try:
        seen = reader.vectors.get("text")
        assert len(seen) == 10 and reader.vectors.get("text") is seen  # loaded from its file once
        writer.vectors.apply({"text": writer.add("b.txt", clustered(4, seed=3))},
                             {"text": writer.vectors.fresh("text")})
        assert len(reader.vectors.get("text")) == 14  # a long-lived reader sees the build beside it
    finally:
        reader.store.close()


def test_a_damaged_or_missing_file_is_rebuilt_not_trusted(writer, tmp_path):
    writer.vectors.apply({"text": writer.add("a.txt", clustered(10))}, {"text": None})
    (tmp_path / "text.faiss").write_bytes(b"not faiss")
    reader = Folder(tmp_path, readonly=True)
    try:
        assert reader.vectors.fresh("text") is None
        assert len(reader.vectors.get("text")) == 10  # rebuilt in memory from SQLite
    finally:
        reader.store.close()
    writer.vectors.cached.clear()
    writer.vectors.repair()
    assert len(Folder(tmp_path, readonly=True).vectors.fresh("text")) == 10


def test_another_index_type_rebuilds_and_removes_the_old_file(writer, tmp_path):
    writer.vectors.apply({"text": writer.add("a.txt", clustered(50))}, {"text": None})
    with writer.store.conn:
        writer.settings.update(index_type="hnsw")
    writer.vectors.rebuild_all()
    index = writer.vectors.get("text")
    assert index.index_type == "hnsw" and len(index) == 50
    assert Manifest.read(tmp_path).vectors["text"].index_type == "hnsw"
    base = {"text": index}
    writer.vectors.apply({"text": writer.remove("a.txt")}, base)  # a graph cannot drop ids: rebuilt
    assert len(writer.vectors.get("text")) == 0
