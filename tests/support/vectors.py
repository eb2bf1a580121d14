"""Synthetic vectors: clustered unit vectors, stored in an index as a build would store them,
or read by id ranges (ArraySource) in whichever process, worker or Ray task asks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval import Index
from retrieval.storage.store import NewItem

DIM = 32


def unit_vector(*values: float) -> np.ndarray:
    """The float32 unit vector along `values` (hand-made vectors for store and search tests)."""
    vector = np.array(values, np.float32)
    return vector / np.linalg.norm(vector)


def clustered(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, DIM))
    vectors = centres[rng.integers(0, 64, count)] + 0.25 * rng.normal(size=(count, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def fill(index: Index, vectors: np.ndarray, name: str = "synthetic") -> list[int]:
    """Store synthetic vectors as text items of /`name`.txt, as a build would."""
    index.context.settings.record_dim(DIM, "the synthetic vectors")
    with index.store.conn:
        file_id = index.store.upsert_file(f"/{name}.txt", "/", "text", 0, 0, "x")
        ids = index.store.insert_items(file_id, [
            NewItem(f"/{name}.txt#L{n}", "text", vector, f"h{n}", f"text {n}")
            for n, vector in enumerate(vectors)])
        index.store.bump_generation("text")
    return ids


@dataclass(frozen=True)
class ArraySource:
    """Vectors with sparse ids, re-made from a seed in whichever process reads them."""

    count: int
    seed: int = 0
    dim: int = DIM

    def ids(self) -> np.ndarray:
        return 7 + 3 * np.arange(self.count, dtype=np.int64)

    def read(self, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids()
        rows = np.flatnonzero((ids >= low) & (ids < high))
        return ids[rows], clustered(self.count, self.seed)[rows]
