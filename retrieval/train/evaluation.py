"""Retrieval evaluation the standard way: Recall@K, median and mean rank, both directions.

Each image has one or more captions. A caption (text -> image) is answered right at rank r when
its own image is the r-th image retrieved; an image (image -> text) is answered right at the
rank of the first of its captions retrieved. Ranks are computed exactly from the full
similarity matrix, and again through a FAISS index of the type the engine would use, where
only the first `depth` results are known, so any loss from approximate search shows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ..core.concurrency import default_workers, prefetch_map
from ..core.types import FUSIONS
from ..encoders.spec import ModelSpec
from ..media.images import ImageDecodeError, load_image
from ..media.pairs import CaptionedImages, read_captioned_images
from ..query.encode import query_terms, query_vector
from ..query.entries import (
    Grouping,
    check_answers,
    entry_of,
    known_entries,
    read_entry_queries,
    resolve_grouping,
    search_entries,
    searchable,
)
from ..query.gate import has_gate
from ..query.search import Searcher
from ..storage.vectors import SearchKnobs, VectorIndex, choose_index_type

if TYPE_CHECKING:
    from ..encoders.clip import ClipEncoder

RECALL_AT = (1, 5, 10)
CHUNK = 4096  # captions scored at a time against every image: bounded memory on big sets


@dataclass
class DirectionScores:
    """Recall@K for one direction, with median and mean rank. Through a search of limited depth,
    an answer past it has no known rank: the median is None when it lies past the depth, and the
    mean is None when any answer does (`past_depth` of them); `mean_rank_at_least` then counts
    each of those at depth + 1, a lower bound of the mean."""

    recall: dict[int, float]
    median_rank: float | None
    mean_rank: float | None
    queries: int
    past_depth: int = 0
    mean_rank_at_least: float | None = None

    @classmethod
    def from_ranks(cls, ranks: np.ndarray, depth: int | None = None) -> DirectionScores:
        """`ranks` start at 1; with `depth`, a rank above it means "not in the first depth"."""
        recall = {k: float(np.mean(ranks <= k)) for k in RECALL_AT}
        past = int(np.sum(ranks > depth)) if depth is not None else 0
        median = float(np.median(ranks))
        if past and np.sort(ranks)[len(ranks) // 2] > depth:  # a middle rank is unknown
            median = None
        mean = float(np.mean(np.minimum(ranks, depth + 1) if past else ranks))
        return cls(recall, median, None if past else mean, len(ranks), past, mean if past else None)


@dataclass
class Evaluation:
    model: str
    images: int
    captions: int
    index_type: str                # the FAISS index type the second measurement used
    depth: int                     # how many results that search returned per query
    exact: dict[str, DirectionScores] = field(default_factory=dict)
    indexed: dict[str, DirectionScores] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    unreadable: list[str] = field(default_factory=list)  # images dropped, with their captions

    def to_dict(self) -> dict:
        """As `retrieve evaluate --json` prints it (the index type under `kind`)."""
        data = asdict(self)
        data["kind"] = data.pop("index_type")
        return data

    def table(self) -> str:
        """A Markdown table: one row per direction and way of searching."""
        head = ["direction", "search", *(f"R@{k}" for k in RECALL_AT), "median rank", "mean rank"]
        rows = []
        for direction in ("text->image", "image->text"):
            for label, scores in (("exact", self.exact), (self.index_type, self.indexed)):
                found = scores[direction]
                mean = (f"{found.mean_rank:.1f}" if found.mean_rank is not None
                        else f">= {found.mean_rank_at_least:.1f}")
                median = f"{found.median_rank:.1f}" if found.median_rank is not None else f"> {self.depth}"
                rows.append([direction, label, *(f"{100 * found.recall[k]:.1f}" for k in RECALL_AT),
                             median, mean])
        lines = [head, ["---"] * len(head), *rows]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def exact_ranks(image_vectors: np.ndarray, text_vectors: np.ndarray, caption_image: np.ndarray,
                captions_of: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(text->image ranks, image->text ranks), 1-based, from the full similarity matrix.

    A rank counts the items scored strictly higher than the right one, plus one.
    """
    text_ranks = np.empty(len(text_vectors), np.int64)
    best_caption = np.full(len(image_vectors), -np.inf, np.float32)
    for start in range(0, len(text_vectors), CHUNK):
        scores = text_vectors[start:start + CHUNK] @ image_vectors.T  # (chunk, images)
        rows = np.arange(len(scores))
        own = scores[rows, caption_image[start:start + CHUNK]]
        text_ranks[start:start + CHUNK] = (scores > own[:, None]).sum(axis=1) + 1
    image_ranks = np.zeros(len(image_vectors), np.int64)
    for start in range(0, len(image_vectors), CHUNK):
        scores = image_vectors[start:start + CHUNK] @ text_vectors.T  # (chunk, captions)
        for row, owned in enumerate(captions_of[start:start + CHUNK]):
            best_caption[start + row] = scores[row, list(owned)].max()
        image_ranks[start:start + CHUNK] = (scores > best_caption[start:start + CHUNK, None]).sum(axis=1) + 1
    return text_ranks, image_ranks


def indexed_ranks(image_vectors: np.ndarray, text_vectors: np.ndarray, caption_image: np.ndarray,
                  index_type: str, depth: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Ranks as FAISS indexes of `index_type` return them with the engine's default search knobs
    (depth + 1 where not in the first `depth`), and the type actually built (IVF needs enough
    vectors to train)."""
    knobs = SearchKnobs()
    images = VectorIndex.build(choose_index_type(index_type, len(image_vectors), image_vectors.shape[1]),
                               image_vectors.shape[1], np.arange(len(image_vectors)), image_vectors)
    texts = VectorIndex.build(choose_index_type(index_type, len(text_vectors), text_vectors.shape[1]),
                              text_vectors.shape[1], np.arange(len(text_vectors)), text_vectors)

    def first_hit(index: VectorIndex, vectors: np.ndarray, query: np.ndarray, right) -> int:
        _, ids = index.search(query, min(depth, len(index)), knobs=knobs, exact=lambda i: vectors[i])
        hits = np.flatnonzero(right(ids))
        return int(hits[0]) + 1 if len(hits) else depth + 1

    text_ranks = np.array([first_hit(images, image_vectors, query, lambda ids, c=c: ids == caption_image[c])
                           for c, query in enumerate(text_vectors)], np.int64)
    image_ranks = np.array([first_hit(texts, text_vectors, query, lambda ids, i=i: caption_image[ids] == i)
                            for i, query in enumerate(image_vectors)], np.int64)
    return text_ranks, image_ranks, images.index_type


def evaluate(spec: ModelSpec, folder: str | Path, captions_file: str | Path, split: str | None = None,
             index_type: str = "auto", depth: int = 100, device: str = "auto", batch_size: int = 32,
             progress: bool = False) -> Evaluation:
    """Encode a captioned image folder with a model and measure retrieval on it."""
    from ..encoders.clip import load_encoder

    data = read_captioned_images(folder, captions_file, split)
    encoder = load_encoder(spec, device, batch_size)
    started = time.perf_counter()
    data, image_vectors, text_vectors, unreadable = encode_captioned(encoder, data, progress)
    encode_s = time.perf_counter() - started
    result = evaluate_vectors(data, image_vectors, text_vectors, index_type, depth, spec.identity)
    result.seconds["encode"] = encode_s
    result.unreadable = unreadable
    return result


def encode_captioned(encoder: ClipEncoder, data: CaptionedImages, progress: bool = False
                     ) -> tuple[CaptionedImages, np.ndarray, np.ndarray, list[str]]:
    """Vectors of every image and caption; an image that cannot be decoded is dropped with its
    captions (and named in the last element) rather than failing the whole evaluation."""
    data, pixels, unreadable = preprocess_captioned(encoder.preprocess_image, encoder.input_side, data,
                                                    encoder.batch_size, progress)
    image_vectors = encode_pixels(encoder, pixels)
    text_vectors = encoder.encode_texts(data.captions)
    return data, image_vectors, text_vectors, unreadable


def preprocess_captioned(preprocess: Callable, input_side: int, data: CaptionedImages, batch_size: int,
                         progress: bool = False) -> tuple[CaptionedImages, list, list[str]]:
    """Every image as a model's input tensor; an image that cannot be decoded is dropped with
    its captions (and named in the last element)."""
    def prepare(path: Path):
        try:
            return preprocess(load_image(path, min_side=2 * input_side))
        except ImageDecodeError:
            return None

    pixels = list(tqdm(prefetch_map(prepare, data.images, default_workers(), 4 * batch_size),
                       total=len(data.images), unit="img", desc="images", disable=not progress))
    readable = [i for i, tensor in enumerate(pixels) if tensor is not None]
    unreadable = [str(data.images[i]) for i, tensor in enumerate(pixels) if tensor is None]
    if unreadable:
        data = data.subset(readable)
        pixels = [pixels[i] for i in readable]
    return data, pixels, unreadable


def encode_pixels(encoder: ClipEncoder, pixels: list) -> np.ndarray:
    """Image vectors of preprocessed images, a batch at a time."""
    import torch

    batches = [encoder.encode_image_tensors(torch.stack(pixels[start:start + encoder.batch_size]))
               for start in range(0, len(pixels), encoder.batch_size)]
    return np.concatenate(batches) if batches else np.zeros((0, encoder.dim), np.float32)


def evaluate_vectors(data: CaptionedImages, image_vectors: np.ndarray, text_vectors: np.ndarray,
                     index_type: str = "auto", depth: int = 100, model: str = "") -> Evaluation:
    """Both measurements for vectors already encoded (rows follow `data.images`/`captions`)."""
    started = time.perf_counter()
    text_ranks, image_ranks = exact_ranks(image_vectors, text_vectors, data.caption_image,
                                          data.captions_of())
    exact_s = time.perf_counter() - started
    started = time.perf_counter()
    depth = min(depth, len(image_vectors), len(text_vectors))
    indexed_text, indexed_image, built = indexed_ranks(image_vectors, text_vectors, data.caption_image,
                                                       index_type, depth)
    result = Evaluation(model, len(image_vectors), len(text_vectors), built, depth)
    result.exact = {"text->image": DirectionScores.from_ranks(text_ranks),
                    "image->text": DirectionScores.from_ranks(image_ranks)}
    result.indexed = {"text->image": DirectionScores.from_ranks(indexed_text, depth),
                      "image->text": DirectionScores.from_ranks(indexed_image, depth)}
    result.seconds = {"exact": exact_s, "indexed": time.perf_counter() - started}
    return result


# -- entries -----------------------------------------------------------------------------------

def evaluate_fusion(searcher: Searcher, queries: str | Path | list[tuple[str, set[str]]],
                    grouping: str = "stem", depth: int = 50) -> dict[str, DirectionScores]:
    """R@1/5/10 and median rank of the right entry, for each single modality (its parts alone
    ranking the entries) and each fusion strategy: the gain or loss of fusing, measured.

    `queries` is a queries file (see `read_entry_queries`) or what that function read from one.
    """
    context = searcher.context
    source = queries if isinstance(queries, (str, Path)) else "the queries"
    grouping = resolve_grouping(grouping)
    if isinstance(queries, (str, Path)):
        queries = read_entry_queries(queries, grouping)
    check_answers(context, queries, known_entries(context, grouping), source)
    rankers = {m: partial(_single_modality, modality=m) for m in searchable(context)}
    trained = has_gate(context.folder)
    rankers.update({f: partial(_fused, fusion=f) for f in FUSIONS if f != "attention" or trained})
    results = {}
    for name, rank_entries in rankers.items():
        ranks = []
        for query, right in queries:
            order = rank_entries(searcher, query, grouping, depth)
            ranks.append(next((n for n, entry in enumerate(order, 1) if entry in right), depth + 1))
        results[name] = DirectionScores.from_ranks(np.array(ranks), depth)
    return results


def _single_modality(searcher: Searcher, query: str, grouping: Grouping, depth: int, modality: str
                     ) -> list[str]:
    vector = query_vector(searcher.context.encoders, query_terms(query), modality)
    hits = searcher.hydrate(*searcher.nearest(modality, vector,
                                              min(depth * 4, searcher.context.count(modality))))
    return list(dict.fromkeys(entry_of(hit, grouping) for hit in hits))[:depth]


def _fused(searcher: Searcher, query: str, grouping: Grouping, depth: int, fusion: str) -> list[str]:
    return [hit.entry for hit in search_entries(searcher, query, k=depth, grouping=grouping, fusion=fusion)]
