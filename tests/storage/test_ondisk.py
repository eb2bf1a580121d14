"""On-disk IVF indexes: trained on a sample, filled in parallel shards, merged, memory-mapped."""

from __future__ import annotations

import json
import mmap
import shutil

import faiss
import numpy as np
import pytest
from support.vectors import DIM, ArraySource, clustered, fill

from retrieval import Index
from retrieval.storage import ondisk
from retrieval.storage.ondisk import OnDiskIndex, build_on_disk
from retrieval.storage.vectors import IVF_MINIMUM, VectorIndex, new_trained_index

# Chunks of this many rows, not CHUNK_ROWS's 65,536: the merge is the same for three chunks of
# any size, and a tenth of the vectors costs a tenth of the training, filling and searching.
TEST_CHUNK_ROWS = 6_000
COUNT = 2 * TEST_CHUNK_ROWS + 1_000  # three chunks, the last one short (and above IVF_MINIMUM)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """An in-memory IVF-PQ index and an on-disk one, built by two processes, sharing codebooks."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ondisk, "CHUNK_ROWS", TEST_CHUNK_ROWS)  # read by the parent, which cuts the chunks
        return _twins(tmp_path_factory)


def _twins(tmp_path_factory):
    source = ArraySource(COUNT)
    ids, vectors = source.read(0, 1 << 40)
    trained = new_trained_index("ivf-pq", DIM, COUNT, lambda limit: vectors[:limit])
    memory = VectorIndex(faiss.clone_index(trained))
    memory.add(ids, vectors)
    folder = tmp_path_factory.mktemp("ondisk") / "image"
    disk = build_on_disk(source, folder, "ivf-pq-disk", workers=2, trained=trained)
    return memory, disk, ids, vectors


def test_merged_on_disk_index_returns_the_top_10_of_the_in_memory_one(twins):
    memory, disk, ids, vectors = twins
    assert len(disk) == len(memory) == COUNT
    assert np.array_equal(disk.ids(), ids)
    queries = clustered(100, seed=9)
    # the merged lists hold the same codes in the same order: raw FAISS results are identical
    assert np.array_equal(disk.index.search(queries, 10)[1], memory.index.search(queries, 10)[1])
    exact = lambda wanted: vectors[(wanted - 7) // 3]  # noqa: E731
    for query in queries:
        memory_scores, memory_ids = memory.search(query, 10, exact=exact)
        disk_scores, disk_ids = disk.search(query, 10)
        assert list(disk_ids) == list(memory_ids)
        assert np.allclose(disk_scores, memory_scores, atol=1e-6)
        assert np.allclose(disk_scores, vectors[(disk_ids - 7) // 3] @ query, atol=1e-6)  # exact


def test_on_disk_index_maps_its_lists_and_vectors_and_can_move(twins, tmp_path):
    _, disk, ids, vectors = twins
    invlists = faiss.extract_index_ivf(disk.index).invlists
    assert isinstance(faiss.downcast_InvertedLists(invlists), faiss.OnDiskInvertedLists)
    assert isinstance(disk.matrix.base, mmap.mmap) and isinstance(disk.sorted_ids, np.memmap)
    assert np.array_equal(disk.exact_vectors(ids[[5, 1, 3]]), vectors[[5, 1, 3]])
    assert sorted(p.name for p in disk.folder.iterdir()) == \
        ["ids.npy", "index.faiss", "lists.ivfdata", "vectors.npy"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(disk.folder, moved)
    reopened = OnDiskIndex.load(moved)
    assert reopened.index_type == "ivf-pq-disk" and not reopened.can_add and not reopened.can_remove
    assert reopened.search(vectors[77], 1)[1][0] == ids[77]


def test_on_disk_filters_and_scalar_quantiser(tmp_path):
    source = ArraySource(IVF_MINIMUM + 2_000, seed=4)
    ids, vectors = source.read(0, 1 << 40)
    disk = build_on_disk(source, tmp_path / "text", "ivf-sq-disk", workers=1)
    assert disk.index_type == "ivf-sq-disk" and len(disk) == len(ids)
    allowed = ids[::400]
    _, found = disk.search(vectors[3], 5, allowed=allowed)
    expected = allowed[np.argsort(-(vectors[(allowed - 7) // 3] @ vectors[3]))[:5]]
    assert list(found) == list(expected)
    assert disk.search(vectors[1234], 1)[1][0] == ids[1234]


def test_an_index_converts_to_on_disk_and_rebuilds_when_it_changes(tmp_path):
    vectors = clustered(IVF_MINIMUM + 500, seed=3)
    folder = tmp_path / "index"
    with Index.open(folder, model="local-dir:/nowhere", create=True) as index:
        ids = fill(index, vectors)
        index.convert("ivf-pq")
        in_memory = [index.vectors("text").search(v, 10, exact=index.store.vectors_for_ids)[1]
                     for v in vectors[:20]]
        index.convert("ivf-pq-disk")
        disk = index.vectors("text")
        assert disk.index_type == "ivf-pq-disk" and disk.ids().tolist() == sorted(ids)
        # trained on the same vectors in the same order: the same codebooks, the same results
        assert all(list(disk.search(v, 10)[1]) == list(found) for v, found in zip(vectors, in_memory))
    manifest = json.loads((folder / "manifest.json").read_text())
    state = manifest["vectors"]["text"]
    assert state["kind"] == "ivf-pq-disk" and (folder / state["file"] / "lists.ivfdata").exists()
    assert not (folder / "text.faiss").exists()  # once left behind, stale, beside the folder
    with Index.open(folder, readonly=True) as reader:
        assert reader.vectors("text").index_type == "ivf-pq-disk"
        with Index.open(folder) as writer:  # a change: rebuilt into a new folder, the old deleted
            extra = fill(writer, clustered(10, seed=8), "more")
            assert writer.vectors("text").index_type == "ivf-pq-disk"
            assert len(writer.vectors("text")) == len(ids) + 10
        assert reader.vectors("text").search(clustered(10, seed=8)[4], 1)[1][0] == extra[4]
    assert [p.name for p in folder.glob("text-*.ondisk*")] == \
        [json.loads((folder / "manifest.json").read_text())["vectors"]["text"]["file"]]
    with Index.open(folder) as index:  # and back into memory: the on-disk folder goes
        index.convert("flat")
    assert (folder / "text.faiss").is_file() and not list(folder.glob("text-*.ondisk*"))


def test_a_failed_on_disk_build_leaves_nothing_half_made(tmp_path):
    source = ArraySource(2_000)
    trained = new_trained_index("ivf-pq", DIM, 2_000, lambda limit: source.read(0, 1 << 40)[1][:limit],
                                lists=16)

    def dying_runner(function, jobs):
        raise RuntimeError("a shard worker died")

    with pytest.raises(RuntimeError, match="died"):
        build_on_disk(source, tmp_path / "text-1.ondisk", "ivf-pq-disk", runner=dying_runner,
                      trained=trained)
    assert list(tmp_path.iterdir()) == []
