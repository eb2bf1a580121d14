"""Searching an index: a query's vector against one modality's FAISS index, filtered by SQL and
by folder, audio and video found per file at their best window, and hits hydrated from SQLite."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..context import IndexContext
from ..core.errors import UsageError
from ..core.paths import stored_path
from ..core.types import AUTO_TARGETS, MODALITIES, TARGETS, TIMED, Hit
from ..storage.store import WHERE_TIMEOUT_S
from .duplicates import DEDUP_POOL, collapse_hits
from .encode import AudioQuery, ImageQuery, MediaCaps, query_modality, query_terms, query_vector
from .filters import Filter, parse_filter
from .parse import QueryTerm


@dataclass(frozen=True)
class EncodedQuery:
    """A query made one vector: what any index of the same model can search with
    `search(vector=vector, vector_of=vector_of, target=target)`, getting the same hits as from
    the query itself."""

    vector: np.ndarray
    vector_of: str
    target: str


class Searcher:
    """Searches one index through its context: what `Index.search`, `item` and entries run."""

    def __init__(self, context: IndexContext) -> None:
        self.context = context
        self.store = context.store

    def search(self, query: str | None = None, *, text: str | None = None,
               image: ImageQuery = None, audio: AudioQuery = None, video: AudioQuery = None,
               like: int | None = None, vector: Sequence[float] | np.ndarray | None = None,
               vector_of: str = "image", k: int = 10,
               target: str = "auto", where: str | None = None, under: str | None = None,
               min_score: float | None = None, dedup: bool = False,
               filter: str | Filter | None = None, where_timeout: float = WHERE_TIMEOUT_S,
               max_megapixels: float | None = None, max_audio_seconds: float | None = None,
               max_video_seconds: float | None = None) -> list[Hit]:
        """Nearest items to a query, best first (see `Index.search`)."""
        if k < 1:
            raise UsageError(f"k must be at least 1, not {k}")
        chosen = filter if isinstance(filter, Filter) else parse_filter(filter)  # bad ones before any work
        terms = self._terms(query, text, image, audio, video, like, vector, vector_of, target)
        target = self.resolve_target(target, query_modality(terms))
        size = self.context.count(target)
        if not size:  # nothing of that kind was ever encoded: no model needed to find nothing
            return []
        caps = MediaCaps.given(max_megapixels, max_audio_seconds, max_video_seconds)
        vector = query_vector(self.context.encoders, terms, target, caps)
        _check_text("where", where)
        allowed = self.allowed_ids(target, where, under, chosen, where_timeout)
        # Deduplicated, more candidates are fetched than wanted, to be left with k once
        # near-duplicates are folded into the hit they resemble.
        wanted = min(size, max(DEDUP_POOL * k, 50)) if dedup else k
        if target in TIMED:
            hits = self.best_window_per_file(target, vector, wanted, size, allowed)
        else:
            hits = self.hydrate(*self.nearest(target, vector, min(wanted, size), allowed))
        hits = [hit for hit in hits if min_score is None or hit.score >= min_score]
        if dedup:
            hits = collapse_hits(hits, self.store.vectors_for_ids(np.array([h.id for h in hits])))
        return hits[:k]

    def encode_query(self, query: str | None = None, *, text: str | None = None,
                     image: ImageQuery = None, audio: AudioQuery = None, video: AudioQuery = None,
                     like: int | None = None, vector: Sequence[float] | np.ndarray | None = None,
                     vector_of: str = "image", target: str = "auto",
                     max_megapixels: float | None = None, max_audio_seconds: float | None = None,
                     max_video_seconds: float | None = None) -> EncodedQuery:
        """A query's one vector, encoded once, for indexes of this model to search with (shards).

        Its `vector_of` is the query's modality, so another index resolves `target` auto as it
        would for the query; but a CLAP query for audio is the audio it was encoded for."""
        terms = self._terms(query, text, image, audio, video, like, vector, vector_of, target)
        modality = query_modality(terms)
        resolved = self.resolve_target(target, modality)
        caps = MediaCaps.given(max_megapixels, max_audio_seconds, max_video_seconds)
        encoded = query_vector(self.context.encoders, terms, resolved, caps)
        if resolved == "audio" and self.context.encoders.audio_is_clap:
            return EncodedQuery(encoded, "audio", "audio")
        return EncodedQuery(encoded, modality, target)

    def _terms(self, query: str | None, text: str | None, image: ImageQuery, audio: AudioQuery,
               video: AudioQuery, like: int | None, vector: Sequence[float] | np.ndarray | None,
               vector_of: str, target: str) -> list[QueryTerm]:
        if target not in TARGETS:
            raise UsageError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
        items = [] if like is None else [self.item_term(like)]
        items += [] if vector is None else [self._vector_term(vector, vector_of)]
        return query_terms(query, text, image, audio, items, video)

    def allowed_ids(self, modality: str, where: str | None = None, under: str | None = None,
                    chosen: Filter | None = None, where_timeout: float = WHERE_TIMEOUT_S
                    ) -> np.ndarray | None:
        """The ids of `modality` a search may return, or None for all of them."""
        if not (where or under or chosen):
            return None
        condition = chosen.sql(self.store.sources()) if chosen else None
        return self.store.item_ids(modality, where, stored_under(under), condition, where_timeout)

    def resolve_target(self, target: str, query_modality: str) -> str:
        if target != "auto":
            return target
        return next((m for m in AUTO_TARGETS[query_modality] if self.context.count(m)), query_modality)

    def nearest(self, modality: str, vector: np.ndarray, k: int, allowed: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The ids and scores of the k items of `modality` nearest `vector`, among `allowed`."""
        scores, ids = self.context.vectors.get(modality).search(
            vector, k, allowed, self.context.settings.search_knobs(), self.store.vectors_for_ids)
        return ids, scores

    def best_window_per_file(self, modality: str, vector: np.ndarray, k: int, size: int,
                             allowed: np.ndarray | None) -> list[Hit]:
        """The k best sound or video files, each represented by its best window or segment.

        Windows are fetched four per wanted file, and more while too few files come back.
        """
        wanted = min(size, 4 * k)
        while True:
            files: dict[str, Hit] = {}
            for hit in self.hydrate(*self.nearest(modality, vector, wanted, allowed)):
                files.setdefault(hit.path or hit.uri, hit)  # best first, so the first is best
            if len(files) >= k or wanted >= size:
                return list(files.values())[:k]
            wanted = min(size, 4 * wanted)

    def hydrate(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        """The hits of these items, with these scores: each item's metadata, an image's captions,
        a caption's image. Items removed since (by a writer beside this reader) are left out."""
        rows = self.store.items([int(i) for i in ids])
        captions = self.store.captions_of([i for i, row in rows.items() if row.modality == "image"])
        parents = self.store.items([row.parent_id for row in rows.values() if row.parent_id])
        hits = []
        for item_id, score in zip(ids, scores):
            row = rows.get(int(item_id))
            if row is None:  # removed by a writer since this reader's FAISS snapshot
                continue
            metadata = dict(row.meta)
            generated = bool(metadata.pop("generated", False))
            metadata.pop("image_hash", None)  # the builder's own bookkeeping
            text = row.text
            if row.modality == "image":
                written = captions.get(row.id, [])
                metadata["captions"] = [caption for caption, by_model in written if not by_model]
                by_models = [caption for caption, by_model in written if by_model]
                if by_models:
                    metadata["generated_caption"] = by_models[0]
                text = next(iter(metadata["captions"] + by_models), None)
                generated = not metadata["captions"] and bool(by_models)
            elif row.parent_id in parents:
                metadata["image"] = parents[row.parent_id].uri
            hits.append(Hit(row.id, row.modality, row.uri, float(score), row.path, text, metadata,
                            generated))
        return hits

    def item(self, item_id: int) -> Hit | None:
        """An indexed item, as a hit with score 1 (its metadata, captions or image), or None."""
        hits = self.hydrate(np.array([item_id]), np.array([1.0]))
        return hits[0] if hits else None

    def item_term(self, item_id: int) -> QueryTerm:
        """A query term carrying an indexed item's stored vector."""
        row = self.store.items([item_id]).get(item_id)
        if row is None:
            raise UsageError(f"no item with id {item_id} in index {self.context.folder}")
        return QueryTerm(1.0, item=(row.modality, self.store.vectors_for_ids(np.array([item_id]))[0]))

    def _vector_term(self, vector: Sequence[float] | np.ndarray, modality: str) -> QueryTerm:
        if modality not in MODALITIES:
            raise UsageError(f"vector_of must be one of {', '.join(MODALITIES)}, not {modality!r}")
        try:
            with np.errstate(over="ignore"):  # too large for float32 is infinite, refused below
                values = np.asarray(vector, dtype=np.float32).ravel()
        except (TypeError, ValueError):
            raise UsageError("`vector` must be a list of numbers") from None
        if not np.isfinite(values).all():
            raise UsageError("`vector` must hold finite numbers (no inf, NaN, or beyond 3.4e38)")
        dim = self.context.settings.dim_of(modality)
        if dim and len(values) != dim:
            raise UsageError(f"`vector` has {len(values)} numbers; this index's {modality} "
                             f"vectors have {dim}")
        return QueryTerm(1.0, item=(modality, values))


def stored_under(path: str | Path | None) -> str | None:
    """A folder prefix as stored: absolute, in display form (odd bytes as \\xNN)."""
    if not path:
        return None
    try:
        return stored_path(path)
    except FileNotFoundError as error:
        raise UsageError(f"`under`: {error}") from None


def _check_text(option: str, value: str | None) -> None:
    try:
        if value is not None:
            value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"--{option} {value!r} holds characters that are not text") from None
