"""`retrieve convert`: the search knobs it records, and what they change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.vectors import DIM, clustered, fill

from retrieval import Index
from retrieval.cli import cli
from retrieval.storage.vectors import FLAT_LIMIT, IVF_MINIMUM

QUERIES = 40


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, tiny_model) -> Path:
    """An index of IVF_MINIMUM + 2000 clustered text vectors (enough to train IVF lists)."""
    path = tmp_path_factory.mktemp("convert") / "index"
    with Index.open(path, model=tiny_model, create=True) as index:
        fill(index, clustered(IVF_MINIMUM + 2000))
    return path


def convert(index_dir: Path, *args: str) -> None:
    result = CliRunner().invoke(cli, ["convert", *args, "--index", str(index_dir)])
    assert result.exit_code == 0, result.output


def recall_at_10(index_dir: Path) -> float:
    queries = clustered(QUERIES, seed=1) + 0.01 * np.ones(DIM, np.float32)
    found = 0
    with Index.open(index_dir, readonly=True) as index:
        ids, vectors = index.store.all_vectors("text")
        for query in queries:
            exact = set(ids[np.argsort(-(vectors @ query))[:10]].tolist())
            found += len(exact & {hit.id for hit in index.search(vector=query, vector_of="text",
                                                                 target="text", k=10)})
    return found / (10 * QUERIES)


def test_nprobe_scans_more_lists_for_better_recall(synthetic):
    convert(synthetic, "ivf-sq", "--nprobe", "1")
    narrow = recall_at_10(synthetic)
    convert(synthetic, "ivf-sq", "--nprobe", "64")
    assert narrow < recall_at_10(synthetic) and narrow < 0.9


def test_rerank_and_ef_search_are_recorded_for_later_searches(synthetic):
    convert(synthetic, "flat", "--rerank", "3", "--ef-search", "17")
    with Index.open(synthetic, readonly=True) as index:
        knobs = index.search_knobs()
    assert (knobs.rerank, knobs.ef_search) == (3, 17)
    assert knobs.rerank_for("ivf-pq") == 3  # instead of the type's own default


def test_memory_budget_mb_moves_auto_to_compressed_types(tmp_path, tiny_model):
    index_dir = tmp_path / "index"
    with Index.open(index_dir, model=tiny_model, create=True) as index:
        fill(index, clustered(100))
        assert index.kind_for(FLAT_LIMIT + 1, "text") == "hnsw"
    convert(index_dir, "auto", "--memory-budget-mb", "1")
    with Index.open(index_dir, readonly=True) as index:
        assert index.kind_for(FLAT_LIMIT + 1, "text") == "ivf-pq"  # 50k x 32 floats > 1 MB
        assert index.vectors("text").index_type == "flat"  # 100 vectors: still exact
