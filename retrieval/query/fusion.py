"""Fuse per-modality evidence into entry scores, at the vector level.

An entry groups parts of several modalities (a product: photo and description; a video segment:
frames, soundtrack and subtitle), each part a unit vector in the shared space. Evidence is fused
in one of these places:

- early: an entry's part vectors become one entry vector (mean, weighted, concat), indexed as is;
- late: each modality is searched on its own and the result lists are merged (sum, max, rrf);
- attention: a small learnt gate turns the query into weights over modalities, so a query about
  a sound leans on soundtracks and one about a look leans on photos (see `gate`);
- temporal: a sequence of frame vectors becomes one vector, by pooling (order-blind) or by a
  trained BiLSTM or transformer (order-aware; see `retrieval.encoders.video` and `temporal`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.errors import UsageError
from ..core.types import EARLY_FUSIONS, LATE_FUSIONS, MODALITIES
from ..core.vectors import unit


def _choose(name: str, choices: tuple[str, ...], what: str) -> str:
    if name not in choices:
        raise UsageError(f"unknown {what} {name!r}: choose one of {', '.join(choices)}")
    return name


def modality_weights(weights: dict[str, float] | None) -> dict[str, float]:
    """Every modality's weight: 1 unless named; a name that is no modality, or a weight that is
    not a finite number >= 0, is refused."""
    chosen = dict.fromkeys(MODALITIES, 1.0)
    for modality, weight in (weights or {}).items():
        _choose(modality, MODALITIES, "modality")
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"weight of {modality} must be a finite number >= 0, not {weight}")
        chosen[modality] = float(weight)
    return chosen


# -- early fusion ------------------------------------------------------------------------------

def early_fuse(parts: dict[str, np.ndarray], strategy: str = "mean",
               weights: dict[str, float] | None = None) -> np.ndarray:
    """One unit entry vector from the entry's unit part vectors (a missing modality: no key).

    mean: the normalised mean (weights are ignored); weighted: the normalised weighted sum;
    concat: [w_image*image, w_text*text, w_audio*audio], zeros for a missing part, normalised, of
    3x the dimension. Against a query from `early_fuse_query(q, "concat", query_weights)` the inner
    product is sum_m weights[m] * query_weights[m] * cos(q, part_m) over both vectors' norms, so
    weighting one side (the query, say, to change weights without re-indexing) is enough.
    """
    _choose(strategy, EARLY_FUSIONS, "early fusion strategy")
    if not parts:
        raise UsageError("early fusion needs at least one part")
    vectors = {_choose(m, MODALITIES, "modality"): np.asarray(v, np.float32) for m, v in parts.items()}
    shapes = {v.shape for v in vectors.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise UsageError(f"parts must be vectors of one length, got shapes {sorted(shapes)}")
    weight = modality_weights(None if strategy == "mean" else weights)
    if strategy == "concat":
        (dim,) = shapes.pop()
        fused = np.concatenate([weight[m] * vectors[m] if m in vectors else np.zeros(dim, np.float32)
                                for m in MODALITIES])
    else:
        fused = sum(weight[m] * vector for m, vector in vectors.items())
    return unit(fused, "the fused entry (are its parts all weighted 0?)")


def early_fuse_query(vector: np.ndarray, strategy: str, weights: dict[str, float] | None = None
                     ) -> np.ndarray:
    """The query to search an index of `early_fuse(..., strategy)` entries with, from a query
    vector (d,) or rows (n, d): the unit vector itself for mean and weighted, and for concat the
    vector repeated once per modality, each copy times that modality's weight, normalised."""
    _choose(strategy, EARLY_FUSIONS, "early fusion strategy")
    vector = np.asarray(vector, np.float32)
    if strategy != "concat":
        return unit(vector, "the query")
    weight = modality_weights(weights)
    return unit(np.concatenate([weight[m] * vector for m in MODALITIES], axis=-1),
                "the query (are all modalities weighted 0?)")


# -- late fusion -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedHit:
    entry: int
    score: float
    contributions: dict[str, float]  # each counted modality's share; the shares add up to score


def late_fuse(rankings: dict[str, list[tuple[int, float]]], strategy: str = "rrf",
              weights: dict[str, float] | None = None, k: int = 10, rrf_k: int = 60) -> list[FusedHit]:
    """Merge per-modality result lists [(entry, cosine), ...], best first, into the best k entries.

    sum: the weighted sum of an entry's scores (a list it is absent from adds nothing); max: its
    best weighted score, credited to that one modality; rrf: the sum of weight / (rrf_k + rank),
    ranks from 1, which needs no comparable scores across modalities. Ties go to the lower id.
    """
    _choose(strategy, LATE_FUSIONS, "late fusion strategy")
    if k < 1 or rrf_k < 0:
        raise UsageError(f"late fusion needs k >= 1 and rrf_k >= 0, got k={k}, rrf_k={rrf_k}")
    shares = _shares(rankings, strategy, modality_weights(weights), rrf_k)
    hits = [_hit(entry, by_modality, strategy) for entry, by_modality in shares.items()]
    hits.sort(key=lambda hit: (-hit.score, hit.entry))
    return hits[:k]


def _shares(rankings: dict[str, list[tuple[int, float]]], strategy: str, weight: dict[str, float],
            rrf_k: int) -> dict[int, dict[str, float]]:
    """entry -> modality -> that modality's weighted evidence for the entry."""
    shares: dict[int, dict[str, float]] = {}
    for modality, ranking in rankings.items():
        _choose(modality, MODALITIES, "modality")
        for rank, (entry, score) in enumerate(ranking, 1):
            share = weight[modality] / (rrf_k + rank) if strategy == "rrf" else weight[modality] * score
            # an entry listed twice by one modality (two frames of one video) counts once, at its best
            shares.setdefault(int(entry), {}).setdefault(modality, float(share))
    return shares


def _hit(entry: int, by_modality: dict[str, float], strategy: str) -> FusedHit:
    if strategy == "max":
        best = max(by_modality, key=by_modality.__getitem__)
        return FusedHit(entry, by_modality[best], {best: by_modality[best]})
    return FusedHit(entry, sum(by_modality.values()), by_modality)
