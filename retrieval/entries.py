"""Entries: the files that describe one thing, searched as one.

A product is a photo plus its description, a recording a sound plus its picture: files that
share a stem in one folder (`dog.jpg`, `dog.txt` captions, `dog.wav`) form one entry by
`stem`, or every file of a folder forms one by `folder`. A caption belongs to its image's entry.

Each modality the index holds is searched on its own; the parts found are grouped into entries
and their evidence fused:
- late fusion (`sum`, `max`, `rrf`) merges the per-modality rankings (see `fusion.late_fuse`);
- early fusion (`mean`, `weighted`, `concat`) fuses each candidate entry's part vectors into
  one entry vector and scores that (see `fusion.early_fuse`); a modality's part vector is the
  mean of the entry's items of that modality (all captions of an image, all windows of a sound).
Every hit tells which part of each modality matched and how much each modality contributed.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import UsageError
from .fusion import EARLY, LATE, MODALITIES, early_fuse, early_fuse_query, late_fuse
from .search import query_terms, query_vector

if TYPE_CHECKING:
    from .index import Hit, Index
    from .search import AudioQuery, ImageQuery

GROUPINGS = ("stem", "folder")
FUSIONS = (*LATE, *EARLY)
DEFAULT_DEPTH = 200  # parts fetched per modality before grouping


@dataclass
class EntryHit:
    """One entry: its key (a path without suffix, or a folder), fused score, and per modality
    the part that matched best and that modality's share of the score."""

    entry: str
    score: float
    contributions: dict[str, float]
    parts: dict[str, Hit] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def entry_of(hit: Hit, grouping: str) -> str:
    """The entry a part belongs to; a caption belongs to its image's entry."""
    path = hit.metadata.get("image") if hit.modality == "text" and hit.metadata.get("image") else None
    path = path or hit.path or hit.uri.split("#")[0]
    return os.path.splitext(path)[0] if grouping == "stem" else os.path.dirname(path)


def search_entries(index: Index, query: str | None = None, *, text: str | None = None,
                   image: ImageQuery = None, audio: AudioQuery = None, k: int = 10,
                   grouping: str = "stem", fusion: str = "rrf", weights: dict[str, float] | None = None,
                   depth: int = DEFAULT_DEPTH) -> list[EntryHit]:
    """The k entries that best match a query, each modality searched and their evidence fused."""
    if grouping not in GROUPINGS:
        raise UsageError(f"entries are grouped by {' or '.join(GROUPINGS)}, not {grouping!r}")
    if fusion not in FUSIONS:
        raise UsageError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    terms = query_terms(query, text, image, audio)
    keys: dict[str, int] = {}
    rankings: dict[str, list[tuple[int, float]]] = {}
    parts: dict[tuple[int, str], Hit] = {}
    vectors: dict[str, np.ndarray] = {}
    for modality in _searchable(index):
        vectors[modality] = query_vector(index, terms, modality)
        ranking = []
        for hit in index._hydrate(*index._nearest(modality, vectors[modality],
                                                  min(depth, index.count(modality)), None)):
            entry = keys.setdefault(entry_of(hit, grouping), len(keys))
            if (entry, modality) not in parts:  # the best part of each modality stands for it
                parts[(entry, modality)] = hit
                ranking.append((entry, hit.score))
        rankings[modality] = ranking
    names = list(keys)
    if fusion in LATE:
        fused = [(hit.entry, hit.score, hit.contributions)
                 for hit in late_fuse(rankings, fusion, weights, k)]
    else:
        fused = _early(index, vectors, keys, grouping, fusion, weights, k)
    return [EntryHit(names[entry], score, contributions,
                     {m: parts[(entry, m)] for m in MODALITIES if (entry, m) in parts})
            for entry, score, contributions in fused]


def _searchable(index: Index) -> list[str]:
    """Modalities with items whose vectors a query can be compared with (CLAP audio cannot)."""
    return [m for m in MODALITIES if index.count(m) and not (m == "audio" and index.audio_is_clap)]


def _early(index: Index, vectors: dict[str, np.ndarray], keys: dict[str, int], grouping: str,
           fusion: str, weights: dict[str, float] | None, k: int
           ) -> list[tuple[int, float, dict[str, float]]]:
    """Score each candidate entry by its fused vector; contributions split the score by modality."""
    query = next(iter(vectors.values()))  # all modalities share the CLIP space here
    members = _members(index, set(keys), grouping)
    scored = []
    for name, entry in keys.items():
        parts = {m: _unit_mean(vs) for m, vs in members.get(name, {}).items()}
        if not parts:
            continue
        fused = early_fuse(parts, fusion, weights)
        score = float(fused @ early_fuse_query(query, fusion, weights))
        cosines = {m: float(part @ query) for m, part in parts.items()}
        total = sum(cosines.values()) or 1.0
        scored.append((entry, score, {m: score * c / total for m, c in cosines.items()}))
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[:k]


def _members(index: Index, entries: set[str], grouping: str) -> dict[str, dict[str, list[np.ndarray]]]:
    """entry -> modality -> the stored vectors of every item of that entry."""
    from .index import Hit

    found: dict[str, dict[str, list[np.ndarray]]] = {}
    for modality in _searchable(index):
        ids, stored = index.store.all_vectors(modality)
        rows = index.store.items([int(i) for i in ids])
        parents = index.store.items([r.parent_id for r in rows.values() if r.parent_id])
        for item_id, vector in zip(ids.tolist(), stored):
            row = rows[item_id]
            parent = parents.get(row.parent_id)
            hit = Hit(row.id, row.modality, row.uri, 0.0, row.path, row.text,
                      {"image": parent.uri} if parent else {})
            entry = entry_of(hit, grouping)
            if entry in entries:
                found.setdefault(entry, {}).setdefault(modality, []).append(vector)
    return found


def _unit_mean(vectors: list[np.ndarray]) -> np.ndarray:
    mean = np.mean(vectors, axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
