"""Combined queries: `"cat + 2:dog - grass"`, where a term may also be an image or audio path.

Terms are separated by ` + ` or ` - ` (spaces around the sign, so "t-shirt" stays one term;
a sign at either end is text, so no term is ever empty),
may carry a weight as `2:` or `0.5:`, and are images or sounds when they name an existing
image or audio file.
The query vector is the normalised weighted sum of the terms' vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .corpus import AUDIO_SUFFIXES, IMAGE_SUFFIXES, VIDEO_SUFFIXES, existing_file
from .errors import UsageError

_SEPARATOR = re.compile(r"\s+([+-])\s+")
_WEIGHT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*:\s*(.+)$", re.S)


@dataclass(frozen=True)
class QueryTerm:
    """One part of a query: text, an image, a sound or an indexed item, with a signed weight.

    `image` is a path, a PIL image or a binary file object; `audio` and `video` a path or a
    binary file object; `item` an indexed item's (modality, stored vector).
    """

    weight: float
    text: str | None = None
    image: object = None
    audio: object = None
    video: object = None
    item: tuple[str, object] | None = None

    @property
    def modality(self) -> str:
        if self.item is not None:
            return self.item[0]
        if self.text is not None:
            return "text"
        return "image" if self.image is not None else "audio" if self.audio is not None else "video"


def parse_query(query: str) -> list[QueryTerm]:
    """Split a combined query into weighted terms."""
    if not query.strip():
        raise UsageError("the query is empty; give some text, e.g. retrieve \"a dog in the park\"")
    parts = _SEPARATOR.split(query.strip())
    signs = ["+"] + parts[1::2]
    terms = []
    for sign, raw in zip(signs, parts[0::2]):
        weight, body = _weighted(raw.strip())
        terms.append(_term(weight if sign == "+" else -weight, body))
    return terms


def _weighted(raw: str) -> tuple[float, str]:
    match = _WEIGHT.match(raw)
    if not match:
        return 1.0, raw
    return float(match.group(1)), match.group(2).strip()


def _term(weight: float, body: str) -> QueryTerm:
    suffix = Path(body).suffix.lower()
    path = existing_file(body) if suffix in IMAGE_SUFFIXES | AUDIO_SUFFIXES | VIDEO_SUFFIXES else None
    if path is None:
        return QueryTerm(weight, text=body)
    if suffix in AUDIO_SUFFIXES:
        return QueryTerm(weight, audio=str(path))
    if suffix in VIDEO_SUFFIXES:
        return QueryTerm(weight, video=str(path))
    return QueryTerm(weight, image=str(path))
