"""FAISS vector indexes for one modality: ids are SQLite item ids, scores are cosine similarity.

Four index types sit behind one class:
- `flat`: exact search; the right choice up to tens of thousands of vectors;
- `hnsw`: a graph index, fast and accurate, holding every full vector in RAM;
- `ivf-sq`: inverted lists of 8-bit scalar-quantised vectors (a quarter of the memory);
- `ivf-pq`: inverted lists of product-quantised codes (a few dozen bytes a vector);
- `ivf-sq-disk`, `ivf-pq-disk`: the same with lists and exact vectors memory-mapped from disk,
  built in parallel shards (see `ondisk`), for corpora larger than RAM.
The quantised types re-rank their candidates with exact vectors (kept in SQLite), so their
scores are true cosine similarities. `choose_index_type` picks one by corpus size and memory budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from ..core.files import replacing
from ..core.types import MEMORY_INDEX_TYPES

FLAT_LIMIT = 50_000  # below this, exact search is already a few milliseconds
IVF_MINIMUM = 10_000  # fewer vectors cannot train product-quantiser codebooks well
DEFAULT_MEMORY_BUDGET = 4 << 30

# Exact vectors for ids, in the order asked: what re-ranking reads.
ExactVectors = Callable[[np.ndarray], np.ndarray]


# Candidates fetched per result before exact re-ranking: 8-bit codes rank nearly right already;
# product-quantised codes need a deep pool, deeper as the corpus grows (benchmark recall@10:
# at 100k 0.90 with 4, 0.996 with 8; at 1M 0.77 with 10, 0.94 with 25, 0.994 with 50).
DEFAULT_RERANK = {"ivf-sq": 4, "ivf-pq": 50}


@dataclass(frozen=True)
class SearchKnobs:
    """Search-time accuracy/speed settings; defaults give recall@10 >= 0.95 in the benchmark.

    `rerank` None means the index type's DEFAULT_RERANK.
    """

    ef_search: int = 64
    nprobe: int = 32
    rerank: int | None = None

    def rerank_for(self, index_type: str) -> int:
        return self.rerank or DEFAULT_RERANK.get(index_type.removesuffix("-disk"), 1)  # same codes on disk


def choose_index_type(requested: str, count: int, dim: int,
                memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """The index type to build for `count` vectors.

    `auto`: exact while it is fast, HNSW while full vectors fit the budget, then IVF with
    8-bit codes, then product quantisation. IVF types need vectors to train on: below
    IVF_MINIMUM a flat index stands in until a later build has enough.
    """
    if requested != "auto":
        return "flat" if requested.startswith("ivf") and count < IVF_MINIMUM else requested
    if count <= FLAT_LIMIT:
        return "flat"
    if count * (dim * 4 + 2 * 32 * 4) <= memory_budget:
        return "hnsw"
    if count * dim <= memory_budget:
        return "ivf-sq"
    return "ivf-pq"


class VectorIndex:
    """One FAISS index of L2-normalised vectors, searched by inner product."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    # -- making -----------------------------------------------------------------------------

    @classmethod
    def build(cls, index_type: str, dim: int, ids: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        """A new in-memory index of `index_type` holding `vectors`; IVF types are trained on them
        first. (On-disk types are built in shards by `ondisk.build_on_disk`.)"""
        if index_type not in MEMORY_INDEX_TYPES:
            raise ValueError(f"unknown in-memory index type {index_type!r}; choose from "
                             f"{', '.join(MEMORY_INDEX_TYPES)}")
        vectors = _matrix(vectors) if len(vectors) else np.zeros((0, dim), np.float32)
        index = cls(new_trained_index(index_type, dim, len(vectors),
                                      lambda limit: _training_sample(vectors, limit)))
        index.add(ids, vectors)
        return index

    @classmethod
    def load(cls, path: Path, mmap: bool = False) -> VectorIndex:
        """Read a saved index; `mmap` maps it read-only instead of reading it whole, so a query
        touches only the pages it needs (IVF lists it probes) and processes share them."""
        flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return cls(faiss.read_index(str(path), flags))

    def save(self, path: Path) -> None:
        """Write beside the target and rename, so readers never see a half-written file."""
        with replacing(path) as temporary:
            faiss.write_index(self.index, str(temporary))

    # -- properties -------------------------------------------------------------------------

    @property
    def index_type(self) -> str:
        inner = _unwrapped(self.index)
        if isinstance(inner, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(inner, faiss.IndexIVFScalarQuantizer):
            return "ivf-sq"
        if isinstance(inner, faiss.IndexIVF):
            return "ivf-pq"
        return "flat"

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def can_remove(self) -> bool:
        """HNSW graphs cannot drop nodes; removing from one means rebuilding it."""
        return self.index_type != "hnsw"

    @property
    def can_add(self) -> bool:
        return True

    def __len__(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        """Every id held, sorted."""
        if isinstance(self.index, faiss.IndexIDMap):
            return np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))
        lists = faiss.extract_index_ivf(self.index).invlists
        found = [faiss.rev_swig_ptr(lists.get_ids(n), lists.list_size(n)).copy()
                 for n in range(lists.nlist) if lists.list_size(n)]
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    # -- changing ---------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(_matrix(vectors), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            if not self.can_remove:
                raise NotImplementedError("an HNSW index cannot remove vectors; rebuild it")
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    # -- searching --------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None,
               knobs: SearchKnobs = SearchKnobs(), exact: ExactVectors | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for one query vector, optionally only among `allowed` ids.

        Quantised types re-rank `k * rerank` candidates with `exact` vectors when given.
        A filter narrow enough to scan is searched exactly: approximate indexes lose recall
        when most of what they visit is filtered out.
        """
        if allowed is not None and not len(allowed):
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        if allowed is not None and exact is not None and self.index_type != "flat" \
                and len(allowed) <= FLAT_LIMIT:
            return _exact_top_k(query, np.asarray(allowed, dtype=np.int64), exact(allowed), k)
        fetch = k * knobs.rerank_for(self.index_type) if exact is not None else k
        params = self._search_params(knobs, allowed, fetch)
        with _one_thread():
            scores, ids = self.index.search(_matrix(query[None, :]), fetch, params=params)
        found = ids[0] >= 0  # FAISS pads missing results with -1
        scores, ids = scores[0][found], ids[0][found]
        if fetch > k:
            return _exact_top_k(query, ids, exact(ids), k)
        return scores.astype(np.float32), ids

    def _search_params(self, knobs: SearchKnobs, allowed: np.ndarray | None, k: int):
        # Passed to the constructor, the selector is kept alive by FAISS's Python wrapper.
        extra = {"sel": faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))} \
            if allowed is not None else {}
        index_type = self.index_type
        if index_type == "hnsw":
            # The graph search keeps efSearch candidates: fewer than k would cut results short.
            return faiss.SearchParametersHNSW(efSearch=max(knobs.ef_search, k), **extra)
        if index_type.startswith("ivf"):
            return faiss.SearchParametersIVF(nprobe=knobs.nprobe, **extra)
        return faiss.SearchParameters(**extra)


@contextmanager
def _one_thread() -> Iterator[None]:
    """One query is too small to split: FAISS's OpenMP threads only wait on each other, and
    on a busy machine that wait costs milliseconds."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def _exact_top_k(query: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order].astype(np.float32), ids[order]


def new_trained_index(index_type: str, dim: int, count: int, sample: Callable[[int], np.ndarray],
                      lists: int | None = None) -> faiss.Index:
    """An empty index of `index_type` for `count` vectors; IVF types (with `lists` inverted lists, or
    a number suited to `count`) are trained on `sample(limit)`, at most `limit` of the vectors."""
    index = _new_faiss_index(index_type, dim, count, lists)
    if not index.is_trained:
        lists = faiss.extract_index_ivf(index).nlist
        index.train(_matrix(sample(max(100_000, 40 * lists))))
    return index


def _new_faiss_index(index_type: str, dim: int, count: int, lists: int | None = None) -> faiss.Index:
    if index_type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if index_type == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        # The graph, not the search depth, caps recall: at 1M clustered vectors through the
        # product (`benchmark.py --search`), efConstruction 80 / 128 / 200 gave recall@10 0.939 /
        # 0.956 / 0.966 at p50 1.51 / 1.99 / 2.40 ms and built in 438 / 669 / 1,034 s; more
        # efSearch left 80's recall where it was.
        graph.hnsw.efConstruction = 128
        return faiss.IndexIDMap2(graph)
    nlist = lists or _list_count(count)
    quantizer = faiss.IndexFlatIP(dim)
    if index_type == "ivf-sq":
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, _pq_subquantizers(dim), 8,
                                 faiss.METRIC_INNER_PRODUCT)
    return index


def _list_count(count: int) -> int:
    """About 4 * sqrt(N) inverted lists, with at least 39 training points per list."""
    return int(max(1, min(4 * np.sqrt(max(count, 1)), count // 39 or 1, 65536)))


def _pq_subquantizers(dim: int) -> int:
    for m in (64, 48, 32, 16, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


def _training_sample(vectors: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` rows: k-means wants ~40 points per list and gains little from more."""
    if len(vectors) <= limit:
        return vectors
    rows = np.random.default_rng(0).choice(len(vectors), limit, replace=False)
    return vectors[np.sort(rows)]


def _unwrapped(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _matrix(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)
