"""Turn a query (combined string, text, image) into one normalised vector."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .corpus import existing_file
from .errors import UsageError
from .images import ImageDecodeError, load_image, to_rgb
from .query import QueryTerm, parse_query

if TYPE_CHECKING:
    from .index import Index


ImageInput = str | Path | Image.Image
ImageQuery = ImageInput | Sequence[ImageInput] | None


def query_terms(query: str | None, text: str | None, image: ImageQuery) -> list[QueryTerm]:
    """All terms of a search call; at least one is required."""
    terms = parse_query(query) if query is not None else []
    if text is not None:
        if not text.strip():
            raise UsageError("the text query is empty")
        terms.append(QueryTerm(1.0, text=text))
    if image is not None:
        images = image if isinstance(image, (list, tuple)) else [image]
        terms += [QueryTerm(1.0, image=one) for one in images]
    if not terms:
        raise UsageError("nothing to search for: give a text query or an image")
    return terms


def query_vector(index: Index, query: str | None, text: str | None, image: ImageQuery
                 ) -> tuple[np.ndarray, str]:
    """The weighted sum of the terms' vectors, normalised, and the query's main modality."""
    terms = query_terms(query, text, image)
    texts = [t for t in terms if t.text is not None]
    images = [t for t in terms if t.image is not None]
    parts = []
    if texts:
        parts.append(_weighted(index.text_encoder.encode_texts([t.text for t in texts]), texts))
    if images:
        opened = [_open(t.image) for t in images]  # a bad path fails before the model loads
        parts.append(_weighted(index.encoder.encode_images(opened), images))
    total = np.sum(parts, axis=0)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm):
        raise UsageError("the query's weights must be ordinary numbers")
    if norm < 1e-6:
        raise UsageError("the query's terms cancel out; change their weights")
    modality = "image" if images and not texts else "text"
    return total / norm, modality


def _weighted(vectors: np.ndarray, terms: list[QueryTerm]) -> np.ndarray:
    weights = np.array([t.weight for t in terms], dtype=np.float32)
    return (vectors * weights[:, None]).sum(axis=0)


def _open(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = existing_file(str(image))
    if path is None:
        raise UsageError(f"query image {image}: no such file")
    try:
        return load_image(path)
    except ImageDecodeError as error:
        raise UsageError(f"query image {image}: {error}") from None
