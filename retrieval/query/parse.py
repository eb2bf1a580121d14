"""Combined queries: `"cat + 2:dog - grass"`, where a term may also be an image or audio path.

Terms are separated by ` + ` or ` - ` (spaces around the sign, so "t-shirt" stays one term;
a sign at either end is text, so no term is ever empty),
may carry a weight as `2:` or `0.5:`, and are images, sounds or videos when they name an
existing such file. A term that reads as a path but names none stays text, with a QueryWarning.
The query vector is the normalised weighted sum of the terms' vectors.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import QueryWarning, UsageError
from ..core.paths import existing_file
from ..media.corpus import AUDIO_SUFFIXES, IMAGE_SUFFIXES, VIDEO_SUFFIXES

_SEPARATOR = re.compile(r"\s+([+-])\s+")
MEDIA_SUFFIXES = IMAGE_SUFFIXES | AUDIO_SUFFIXES | VIDEO_SUFFIXES
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
    path = existing_file(body) if suffix in MEDIA_SUFFIXES else None
    if path is None:
        if suffix in MEDIA_SUFFIXES or _has_folder(body):
            # A long path keeps its end: the file name is what the reader needs.
            shown = body if len(body) <= 80 else "…" + body[-79:]
            warnings.warn(QueryWarning(f"query term {shown!r} names no image, sound or video "
                                       "file; searched as text"), stacklevel=4)
        return QueryTerm(weight, text=body)
    if suffix in AUDIO_SUFFIXES:
        return QueryTerm(weight, audio=str(path))
    if suffix in VIDEO_SUFFIXES:
        return QueryTerm(weight, video=str(path))
    return QueryTerm(weight, image=str(path))


def _has_folder(body: str) -> bool:
    """Whether a term reads as a path with a folder: `photos/dog`, `~/dog`, `./dog`; words
    around a slash ("1/2 cup", "AC/DC live") are text."""
    separators = tuple(s for s in (os.sep, os.altsep) if s)
    if body.startswith(("~", ".", *separators)):
        return any(s in body for s in separators)
    return any(s in body for s in separators) and not any(c.isspace() for c in body)
