"""The SQLite store through its public methods: files, items and their vectors, captions linked
to images, settings, skipped files, filters, and transactions that undo only their own block."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from support.vectors import unit_vector as unit

from retrieval.core.errors import UsageError
from retrieval.storage.store import NewItem, SkippedRow, Store


@pytest.fixture
def store(tmp_path) -> Store:
    opened = Store(tmp_path / "meta.sqlite")
    yield opened
    opened.close()


def add_file(store: Store, path: str, kind: str, items: list[NewItem], sha256: str = "") -> list[int]:
    with store.conn:
        file_id = store.upsert_file(path, "/root", kind, 10, 1_000, sha256 or path)
        return store.insert_items(file_id, items)


def image(uri: str, *values: float, digest: str = "") -> NewItem:
    return NewItem(uri, "image", unit(*values), digest or uri)


def caption(uri: str, text: str, parent: str, *values: float) -> NewItem:
    return NewItem(uri, "text", unit(*values), f"t:{text}", text=text, parent_ref=parent)


def test_a_new_store_is_empty_and_counts_nothing(store):
    assert store.is_empty()
    assert [store.count(m) for m in ("image", "text", "audio", "video")] == [0, 0, 0, 0]
    assert store.stored_dim("image") == 0
    ids, vectors = store.all_vectors("image")
    assert len(ids) == 0 and vectors.shape == (0, 0)


def test_items_and_their_vectors_round_trip(store):
    [first, second] = add_file(store, "/root/a.png", "image", [image("/root/a.png", 1, 0, 0),
                                                               image("/root/a.png#2", 0, 1, 0)])
    assert not store.is_empty() and store.count("image") == 2 and store.stored_dim("image") == 3
    rows = store.items([first, second])
    assert rows[first].uri == "/root/a.png" and rows[first].path == "/root/a.png"
    assert rows[first].modality == "image" and rows[first].meta == {}
    ids, vectors = store.all_vectors("image")
    assert list(ids) == [first, second]
    assert np.allclose(vectors, [unit(1, 0, 0), unit(0, 1, 0)])
    assert np.allclose(store.vectors_for_ids(np.array([second, first])), [unit(0, 1, 0), unit(1, 0, 0)])
    assert [list(batch_ids) for batch_ids, _ in store.iter_vectors("image", batch=1)] == [[first], [second]]
    assert store.item_id("/root/a.png#2", "image") == second
    assert store.item_id("/root/a.png#2", "text") is None


def test_an_upsert_updates_the_file_in_place(store):
    with store.conn:
        first = store.upsert_file("/root/a.png", "/root", "image", 10, 1_000, "aa")
        again = store.upsert_file("/root/a.png", "/root", "image", 20, 2_000, "bb")
    assert first == again
    assert store.file_row("/root/a.png") == store.files_by_path()["/root/a.png"]
    row = store.file_row("/root/a.png")
    assert (row.size, row.mtime_ns, row.sha256) == (20, 2_000, "bb")
    with store.conn:
        store.touch_file(first, 30, 3_000)
    assert (store.file_row("/root/a.png").size, store.file_row("/root/a.png").mtime_ns) == (30, 3_000)
    assert store.file_row("/root/missing.png") is None


def test_a_moved_file_keeps_its_items_and_vectors(store):
    [item] = add_file(store, "/root/old/a.png", "image", [image("/root/old/a.png#t=1", 1, 2, 3)])
    file_id = store.file_row("/root/old/a.png").id
    with store.conn:
        store.move_file(file_id, "/root/old/a.png", "/root/new/b.png", "/root", 10, 5)
    assert store.items([item])[item].uri == "/root/new/b.png#t=1"
    assert store.items([item])[item].path == "/root/new/b.png"
    assert np.allclose(store.vectors_for_ids(np.array([item])), [unit(1, 2, 3)])


def test_deleting_files_removes_their_items_and_vectors(store):
    [a] = add_file(store, "/root/a.png", "image", [image("/root/a.png", 1, 0)])
    [b] = add_file(store, "/root/b.txt", "text", [NewItem("/root/b.txt#L1", "text", unit(0, 1), "x", "hi")])
    with store.conn:
        removed = store.delete_files([store.file_row("/root/a.png").id, store.file_row("/root/b.txt").id])
    assert removed == {"image": [a], "text": [b]}
    assert store.is_empty() and store.items([a, b]) == {}
    assert store.count("image") == store.count("text") == 0


def test_captions_link_to_their_image_beside_them_else_by_name(store):
    [beside] = add_file(store, "/root/x/dog.jpg", "image", [image("/root/x/dog.jpg", 1, 0)])
    [elsewhere] = add_file(store, "/other/cat.jpg", "image", [image("/other/cat.jpg", 0, 1)])
    texts = add_file(store, "/root/x/captions.tsv", "captions", [
        caption("/root/x/captions.tsv#1", "a dog", "dog.jpg", 1, 1),
        caption("/root/x/captions.tsv#2", "a cat", "cat.jpg", 1, 2),
        caption("/root/x/captions.tsv#3", "a bird", "bird.jpg", 2, 1)])
    with store.conn:
        store.link_captions()
    rows = store.items(texts)
    assert [rows[i].parent_id for i in texts] == [beside, elsewhere, None]
    assert store.captions_of([beside, elsewhere]) == {  # (text, generated)
        beside: [("a dog", False)], elsewhere: [("a cat", False)]}
    with store.conn:  # the image goes: its caption lets go of it
        store.delete_files([store.file_row("/root/x/dog.jpg").id])
        store.link_captions()
    assert store.items(texts[:1])[texts[0]].parent_id is None


def test_vectors_are_found_again_by_content(store):
    add_file(store, "/root/a.png", "image", [image("/root/a.png", 3, 4, digest="same")], sha256="f1")
    found = store.vectors_for_hashes("image", ["same", "other"])
    assert list(found) == ["same"] and np.allclose(found["same"], unit(3, 4))
    assert store.vectors_for_hashes("text", ["same"]) == {}
    [(meta, vector)] = store.items_of_file_with_hash("f1", "image")
    assert meta == {} and np.allclose(vector, unit(3, 4))
    assert store.items_of_file_with_hash("f2", "image") == []


def test_replacing_a_vector(store):
    [item] = add_file(store, "/root/a.png", "image", [image("/root/a.png", 1, 0, digest="old")])
    with store.conn:
        store.replace_vector(item, unit(0, 1), "new")
    assert np.allclose(store.vectors_for_ids(np.array([item])), [unit(0, 1)])
    assert list(store.vectors_for_hashes("image", ["old", "new"])) == ["new"]


def test_settings_sources_and_generations(store):
    assert store.get_info("dim") is None and store.get_info("dim", "0") == "0"
    with store.conn:
        store.set_info("dim", "512")
        store.set_sources(["/b", "/a", "/b"])
        store.set_source_options({"/a": {"include_hidden": True}})
        store.set_captions_files(["/c.tsv"])
        store.bump_generation("image")
        store.bump_generation("image")
    assert store.get_info("dim") == "512"
    assert store.sources() == ["/a", "/b"]
    assert store.source_options() == {"/a": {"include_hidden": True}}
    assert store.captions_files() == ["/c.tsv"]
    assert (store.generation("image"), store.generation("text")) == (2, 0)
    with store.conn:
        store.delete_info("dim")
    assert store.get_info("dim") is None


def test_skipped_files_are_remembered_until_forgotten(store):
    row = SkippedRow("/root/bad.jpg", 12, 34, "max_megapixels=100", "not an image PIL can read")
    with store.conn:
        store.remember_skipped(row)
        store.remember_skipped(SkippedRow("/root/worse.jpg", 1, 2, "", "empty file"))
    assert store.skipped_files()["/root/bad.jpg"] == row
    with store.conn:
        store.remember_skipped(SkippedRow("/root/bad.jpg", 13, 35, "max_megapixels=100", "empty file"))
        store.forget_skipped(["/root/worse.jpg"])
    assert list(store.skipped_files()) == ["/root/bad.jpg"]
    assert store.skipped_files()["/root/bad.jpg"].reason == "empty file"


def test_clear_forgets_everything_and_bumps_every_generation(store):
    add_file(store, "/root/a.png", "image", [image("/root/a.png", 1, 0)])
    with store.conn:
        store.remember_skipped(SkippedRow("/root/bad.jpg", 1, 2, "", "empty file"))
        store.clear()
    assert store.is_empty() and store.count("image") == 0 and store.skipped_files() == {}
    assert store.generation("image") == store.generation("audio") == 1


def test_item_ids_filter_by_sql_and_by_whole_folders(store):
    photos = add_file(store, "/root/photos/a.png", "image", [image("/root/photos/a.png", 1, 0)])
    images = add_file(store, "/root/photos-2/b.png", "image", [image("/root/photos-2/b.png", 0, 1)])
    assert sorted(store.item_ids("image")) == photos + images
    assert list(store.item_ids("image", under="/root/photos")) == photos  # not photos-2
    assert list(store.item_ids("image", under="/root/photos/a.png")) == photos
    assert list(store.item_ids("image", where="uri LIKE '%b.png'")) == images
    with pytest.raises(UsageError, match="columns are"):
        store.item_ids("image", where="nonsense = 1")
    with pytest.raises(UsageError):  # a filter reads, never writes
        store.item_ids("image", where="1); DELETE FROM items; --")
    assert store.count("image") == 2


def test_a_savepoint_undoes_its_block_and_keeps_the_rest(store):
    with store.conn:
        store.set_info("kept", "1")
        with pytest.raises(RuntimeError), store.savepoint():
            store.set_info("undone", "1")
            raise RuntimeError("one bad file")
        store.set_info("after", "1")
    assert [store.get_info(k) for k in ("kept", "undone", "after")] == ["1", None, "1"]


def test_a_read_only_store_reads_and_refuses_writes(store, tmp_path):
    add_file(store, "/root/a.png", "image", [image("/root/a.png", 1, 0)])
    reader = Store(tmp_path / "meta.sqlite", readonly=True)
    try:
        assert reader.count("image") == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.set_info("x", "1")
    finally:
        reader.close()
