"""FAISS index types: exactness where promised, the auto policy, filters and conversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.stored import item_ids
from support.vectors import DIM, clustered, fill

from retrieval import Index
from retrieval.core.types import MEMORY_INDEX_TYPES
from retrieval.storage.vectors import FLAT_LIMIT, IVF_MINIMUM, VectorIndex, choose_index_type


@pytest.fixture(scope="module")
def corpus():
    vectors = clustered(IVF_MINIMUM + 2000)
    ids = np.arange(1000, 1000 + len(vectors), dtype=np.int64)
    return ids, vectors


@pytest.fixture(scope="module")
def built(corpus) -> dict[str, VectorIndex]:
    """Every type built once over the corpus (training IVF-PQ takes seconds); the tests only search."""
    ids, vectors = corpus
    return {index_type: VectorIndex.build(index_type, DIM, ids, vectors) for index_type in MEMORY_INDEX_TYPES}


@pytest.mark.parametrize("index_type", MEMORY_INDEX_TYPES)
def test_every_index_type_finds_a_stored_vector_first(index_type, corpus, built):
    ids, vectors = corpus
    index = built[index_type]
    assert index.index_type == index_type and len(index) == len(ids)
    exact = lambda wanted: vectors[wanted - 1000]  # noqa: E731
    for row in range(0, len(ids), 997):
        scores, found = index.search(vectors[row], 10, exact=exact)
        assert found[0] == ids[row]
        assert scores[0] == pytest.approx(1.0, abs=1e-4)
        assert list(scores) == sorted(scores, reverse=True)


@pytest.mark.parametrize("index_type", MEMORY_INDEX_TYPES)
def test_narrow_filters_are_exact_for_every_index_type(index_type, corpus, built):
    ids, vectors = corpus
    index = built[index_type]
    allowed = ids[::500]
    exact = lambda wanted: vectors[wanted - 1000]  # noqa: E731
    _, found = index.search(vectors[7], 5, allowed=allowed, exact=exact)
    expected = allowed[np.argsort(-(vectors[allowed - 1000] @ vectors[7]))[:5]]
    assert list(found) == list(expected)


def test_auto_picks_by_size_and_memory_budget():
    assert choose_index_type("auto", 1_000, 512) == "flat"
    assert choose_index_type("auto", FLAT_LIMIT, 512) == "flat"
    assert choose_index_type("auto", 200_000, 512) == "hnsw"
    assert choose_index_type("auto", 200_000, 512, memory_budget=200 << 20) == "ivf-sq"
    assert choose_index_type("auto", 5_000_000, 512, memory_budget=1 << 30) == "ivf-pq"
    assert choose_index_type("hnsw", 10, 512) == "hnsw"
    assert choose_index_type("ivf-pq", IVF_MINIMUM - 1, 512) == "flat"  # too few to train on


@pytest.mark.parametrize("index_type", ["hnsw", "ivf-sq", "ivf-pq", "flat"])
def test_conversion_keeps_ids_and_needs_no_model(tmp_path, index_type):
    vectors = clustered(IVF_MINIMUM + 500, seed=3)
    with Index.open(tmp_path / "index", model="local-dir:/nowhere", create=True) as index:
        ids = fill(index, vectors)
        before = index.vectors("text").ids().tolist()
        index.convert(index_type, nprobe=48)
        converted = index.vectors("text")
        assert converted.index_type == index_type
        assert converted.ids().tolist() == before == sorted(ids)
        assert index.search_knobs().nprobe == 48
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["index_type"] == index_type and manifest["vectors"]["text"]["kind"] == index_type
    with Index.open(tmp_path / "index") as index:  # reopened: the saved file is used as is
        assert index.vectors("text").index_type == index_type
        scores, found = index.vectors("text").search(vectors[42], 1, exact=index.store.vectors_for_ids)
        assert found[0] == ids[42]


def test_an_hnsw_index_follows_builds(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    with Index.open(index_dir, model=tiny_model, create=True, index_type="hnsw") as index:
        index.add(photo_folder)
        assert index.vectors("image").index_type == "hnsw"
        (photo_folder / "beach" / "img1.jpg").unlink()
        report = index.add(photo_folder)
        assert report.removed == 1
        held = index.vectors("image").ids().tolist()
        stored = item_ids(index.store, "image")
        assert held == stored and len(held) == 5


def test_hnsw_returns_k_results_beyond_ef_search(corpus):
    ids, vectors = corpus
    index = VectorIndex.build("hnsw", DIM, ids, vectors)
    assert len(index.search(vectors[0], 500)[1]) == 500
