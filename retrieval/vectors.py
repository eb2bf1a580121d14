"""FAISS vector index for one modality: ids are SQLite item ids, scores are cosine similarity."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np


class VectorIndex:
    """Exact inner-product search over L2-normalised vectors, addressed by item id."""

    def __init__(self, index: faiss.Index) -> None:
        self.index = index

    @classmethod
    def empty(cls, dim: int) -> VectorIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))

    @classmethod
    def load(cls, path: Path) -> VectorIndex:
        return cls(faiss.read_index(str(path)))

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(_matrix(vectors), np.asarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if len(ids):
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for one query vector, optionally only among `allowed` ids."""
        if allowed is not None:
            if not len(allowed):
                return np.zeros(0, np.float32), np.zeros(0, np.int64)
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            params = faiss.SearchParameters(sel=selector)
            scores, ids = self.index.search(_matrix(query[None, :]), k, params=params)
        else:
            scores, ids = self.index.search(_matrix(query[None, :]), k)
        found = ids[0] >= 0  # FAISS pads missing results with -1
        return scores[0][found], ids[0][found]

    def save(self, path: Path) -> None:
        """Write beside the target and rename, so readers never see a half-written file."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(temporary))
        _fsync(temporary)
        os.replace(temporary, path)


def _matrix(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
