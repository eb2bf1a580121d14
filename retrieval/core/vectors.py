"""Unit vectors: every vector the engine stores or compares has length 1, so that the inner
product is the cosine similarity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import UsageError


def unit(vectors: np.ndarray, what: str = "a vector") -> np.ndarray:
    """`vectors` scaled to length 1 along the last axis, as float32; a zero vector, which has no
    direction, is refused (`what` names it in the message)."""
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    if not np.all(norm > 0):
        raise UsageError(f"{what} is the zero vector, which has no direction to normalise")
    return (vectors / norm).astype(np.float32)


def unit_mean(vectors: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """The unit vector along the mean of `vectors`: what several windows of a sound, segments of
    a video, captions of an image or items of an entry stand for together."""
    mean = np.mean(vectors, axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
