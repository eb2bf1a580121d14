"""Entries: the files that describe one thing, searched as one.

A product is a photo plus its description, a recording a sound plus its picture: files that
share a stem in one folder (`dog.jpg`, `dog.txt` captions, `dog.wav`) form one entry by
`stem`, every file of a folder forms one by `folder`, or a manifest file (CSV or JSONL with
`entry` and `path` fields) names each file's entry. A caption belongs to its image's entry.

Each modality the index holds is searched on its own; the parts found are grouped into entries
and their evidence fused:
- late fusion (`sum`, `max`, `rrf`) merges the per-modality rankings (see `fusion.late_fuse`);
- early fusion (`mean`, `weighted`, `concat`) fuses each candidate entry's part vectors into
  one entry vector and scores that (see `fusion.early_fuse`); a modality's part vector is the
  mean of the entry's items of that modality (all captions of an image, all windows of a sound);
- `attention` weighs each modality's cosine per query with a small gate trained on the user's
  queries (`retrieval.train.fusion`, saved in the index folder; see `gate.AttentionFusion`).
Every hit tells which part of each modality matched and how much each modality contributed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..context import IndexContext
from ..core.errors import QueryWarning, UsageError, counted
from ..core.paths import absolute_path, stored_path
from ..core.types import FUSIONS, GROUPINGS, LATE_FUSIONS, MODALITIES, Hit
from ..core.vectors import unit_mean
from ..media.tables import read_table, row_error
from ..storage.store import WHERE_TIMEOUT_S
from .encode import AudioQuery, ImageQuery, query_terms, query_vector
from .filters import Filter, parse_filter
from .fusion import early_fuse, early_fuse_query, late_fuse
from .search import Searcher

Allowed = dict[str, np.ndarray | None]  # modality -> the item ids a filter keeps (None: all)

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


Grouping = str | dict[str, str]  # "stem", "folder", or a manifest's file path -> entry name


def entry_of(hit: Hit, grouping: Grouping) -> str:
    """The entry a part belongs to; a caption belongs to its image's entry. A file a manifest
    does not name is an entry of its own."""
    return entry_key(hit.modality, hit.path, hit.uri, hit.metadata.get("image"), grouping)


def entry_key(modality: str, path: str | None, uri: str, image: str | None, grouping: Grouping) -> str:
    """The entry of an item of `modality` in the file at `path` (None: the file is `uri`'s);
    `image` is a caption's image."""
    path = (image if modality == "text" and image else None) or path or uri.split("#")[0]
    if isinstance(grouping, dict):
        return grouping.get(path, path)
    return os.path.splitext(path)[0] if grouping == "stem" else os.path.dirname(path)


def resolve_grouping(grouping: str) -> Grouping:
    """`stem`, `folder`, or the path of a manifest file, read into file path -> entry name."""
    if grouping in GROUPINGS:
        return grouping
    path = Path(grouping).expanduser()
    if not path.is_file():
        raise UsageError(f"entries are grouped by stem, folder or a manifest file, and {grouping} "
                         "is none of these")
    entries = {}
    for row in read_table(path, "entries manifest", other="csv"):
        entry, member = row.text("entry"), row.text("path")
        if not entry or not member:
            raise row_error("entries manifest", path, row, "needs an entry and a path")
        entries[_beside(path, member)] = entry
    return entries


def _beside(file: Path, name: str) -> str:
    """A path named in `file`, taken relative to the file's folder, as the index stores paths
    (absolute, display form), whatever the working directory."""
    return stored_path(absolute_path(file).parent / name)


def search_entries(searcher: Searcher, query: str | None = None, *, text: str | None = None,
                   image: ImageQuery = None, audio: AudioQuery = None, video: AudioQuery = None,
                   k: int = 10,
                   grouping: Grouping = "stem", fusion: str | None = None,
                   weights: dict[str, float] | None = None, depth: int = DEFAULT_DEPTH,
                   filter: str | Filter | None = None, where: str | None = None,
                   under: str | None = None, where_timeout: float = WHERE_TIMEOUT_S
                   ) -> list[EntryHit]:
    """The k entries that best match a query, each modality searched and their evidence fused
    (by `fusion`, else the index's recorded default, else rrf). `filter` (the language of
    `retrieval.query.filters`), `where` (SQL over item_view, stopped after `where_timeout`
    seconds) and `under` (a folder) keep the items entries are made of, as in `Index.search`."""
    context = searcher.context
    chosen = filter if isinstance(filter, Filter) else parse_filter(filter)  # bad ones before any work
    grouping = resolve_grouping(grouping) if isinstance(grouping, str) else grouping
    fusion = fusion or context.settings.fusion or "rrf"
    if fusion not in FUSIONS:
        raise UsageError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}")
    terms = query_terms(query, text, image, audio, video=video)
    keys: dict[str, int] = {}
    rankings: dict[str, list[tuple[int, float]]] = {}
    parts: dict[tuple[int, str], Hit] = {}
    vectors: dict[str, np.ndarray] = {}
    allowed: Allowed = {m: searcher.allowed_ids(m, where, under, chosen, where_timeout)
                        for m in searchable(context)}
    for modality in searchable(context):
        vectors[modality] = query_vector(context.encoders, terms, modality)
        ranking = []
        for hit in searcher.hydrate(*searcher.nearest(modality, vectors[modality],
                                                      min(depth, context.count(modality)),
                                                      allowed[modality])):
            entry = keys.setdefault(entry_of(hit, grouping), len(keys))
            if (entry, modality) not in parts:  # the best part of each modality stands for it
                parts[(entry, modality)] = hit
                ranking.append((entry, hit.score))
        rankings[modality] = ranking
    names = list(keys)
    if fusion in LATE_FUSIONS:
        fused = [(hit.entry, hit.score, hit.contributions)
                 for hit in late_fuse(rankings, fusion, weights, k)]
    elif fusion == "attention":
        fused = _attention(context, next(iter(vectors.values())), keys, grouping, k, allowed)
    else:
        fused = _early(context, vectors, keys, grouping, fusion, weights, k, allowed)
    return [EntryHit(names[entry], score, contributions,
                     {m: parts[(entry, m)] for m in MODALITIES if (entry, m) in parts})
            for entry, score, contributions in fused]


def searchable(context: IndexContext) -> list[str]:
    """Modalities with items whose vectors a query can be compared with (CLAP audio cannot)."""
    found = [m for m in MODALITIES
             if context.count(m) and not (m == "audio" and context.encoders.audio_is_clap)]
    if not found:
        raise UsageError(f"index {context.folder} holds nothing to group into entries")
    return found


def _early(context: IndexContext, vectors: dict[str, np.ndarray], keys: dict[str, int],
           grouping: Grouping, fusion: str, weights: dict[str, float] | None, k: int,
           allowed: Allowed) -> list[tuple[int, float, dict[str, float]]]:
    """Score each candidate entry by its fused vector; contributions split the score by modality."""
    query = next(iter(vectors.values()))  # all modalities share the CLIP space here
    members = entry_members(context, set(keys), grouping, allowed)
    scored = []
    for name, entry in keys.items():
        parts = {m: unit_mean(vs) for m, vs in members.get(name, {}).items()}
        if not parts or (fusion != "mean" and weights and not any(weights.get(m, 1) for m in parts)):
            continue  # nothing of it, or nothing that counts: every part it has is weighted 0
        fused = early_fuse(parts, fusion, weights)
        score = float(fused @ early_fuse_query(query, fusion, weights))
        # Each modality's cosine as much as it counts in the score: not at all when weighted 0.
        power = {"mean": 0, "weighted": 1, "concat": 2}[fusion]  # concat weighs both sides
        cosines = {m: (weights or {}).get(m, 1.0) ** power * float(part @ query)
                   for m, part in parts.items()}
        total = sum(cosines.values()) or 1.0
        scored.append((entry, score, {m: score * c / total for m, c in cosines.items()}))
    scored.sort(key=lambda item: (-item[1], item[0]))
    return scored[:k]


def entry_members(context: IndexContext, entries: set[str] | None, grouping: Grouping,
                  allowed: Allowed | None = None) -> dict[str, dict[str, list[np.ndarray]]]:
    """entry -> modality -> the stored vectors of every item of that entry (of every entry
    when `entries` is None; only the items `allowed` names, where it names any)."""
    found: dict[str, dict[str, list[np.ndarray]]] = {}
    for modality in searchable(context):
        ids, stored = context.store.all_vectors(modality)
        kept = (allowed or {}).get(modality)
        if kept is not None:
            keep = np.isin(ids, kept)
            ids, stored = ids[keep], stored[keep]
        for entry, vector in zip(_entries_of_items(context, ids.tolist(), grouping), stored):
            if entries is None or entry in entries:
                found.setdefault(entry, {}).setdefault(modality, []).append(vector)
    return found


def _entries_of_items(context: IndexContext, item_ids: list[int], grouping: Grouping) -> list[str]:
    """The entry of each of these items, in their order."""
    rows = context.store.items(item_ids)
    parents = context.store.items([r.parent_id for r in rows.values() if r.parent_id])
    entries = []
    for item_id in item_ids:
        row = rows[item_id]
        parent = parents.get(row.parent_id)
        entries.append(entry_key(row.modality, row.path, row.uri, parent.uri if parent else None, grouping))
    return entries


def known_entries(context: IndexContext, grouping: Grouping) -> set[str]:
    """Every entry the index holds parts of."""
    return {entry for modality in searchable(context)
            for entry in _entries_of_items(context, context.store.item_ids(modality).tolist(), grouping)}


def check_answers(context: IndexContext, queries: list[tuple[str, set[str]]], known: set[str],
                  source: str | Path) -> None:
    """Refuse queries none of whose answers is an entry of the index (a measure of nothing, or
    nothing to learn from), naming one unknown answer beside an entry the index does hold;
    warn when only some are unknown (they count as misses)."""
    unknown = [sorted(right)[0] for _, right in queries if not right & known]
    if not unknown:
        return
    example = f"{unknown[0]!r} is not one of its {counted(len(known), 'entry', 'entries')}"
    if known:
        example += f", such as {min(known)!r}"
    if len(unknown) == len(queries):
        raise UsageError(f"no entry named in {source} is in index {context.folder}: {example}")
    warnings.warn(QueryWarning(f"{len(unknown)} of {counted(len(queries), 'query', 'queries')} in "
                               f"{source} name no entry of the index, and count as misses: {example}"),
                  stacklevel=3)


def part_arrays(members: dict[str, dict[str, list[np.ndarray]]], names: list[str], dim: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(parts (N, M, d), mask (N, M)) of these entries, in MODALITIES order."""
    parts = np.zeros((len(names), len(MODALITIES), dim), np.float32)
    mask = np.zeros((len(names), len(MODALITIES)), bool)
    for row, name in enumerate(names):
        for modality, vectors in members.get(name, {}).items():
            parts[row, MODALITIES.index(modality)] = unit_mean(vectors)
            mask[row, MODALITIES.index(modality)] = True
    return parts, mask


def _attention(context: IndexContext, query: np.ndarray, keys: dict[str, int], grouping: Grouping,
               k: int, allowed: Allowed) -> list[tuple[int, float, dict[str, float]]]:
    """Candidate entries scored by the trained gate's per-query weighting of their parts."""
    import torch

    from .gate import load_gate

    model = load_gate(context.folder)
    names = list(keys)
    parts, mask = part_arrays(entry_members(context, set(names), grouping, allowed), names, len(query))
    query_t = torch.from_numpy(query[None].astype(np.float32))
    with torch.no_grad():
        scores = model(query_t, torch.from_numpy(parts), torch.from_numpy(mask))[0].numpy()
        weights = model.weights(query_t)[0].numpy()
    fused = []
    for row in np.argsort(-scores, kind="stable")[:k]:
        present = weights * mask[row]
        share = present / max(float(present.sum()), 1e-12) * (parts[row] @ query)
        fused.append((keys[names[row]], float(scores[row]),
                      {m: float(share[i]) for i, m in enumerate(MODALITIES) if mask[row, i]}))
    return fused


# -- queries with their answers --------------------------------------------------------------------

def read_entry_queries(path: str | Path, grouping: Grouping = "stem") -> list[tuple[str, set[str]]]:
    """Queries with the entries that answer them, from a TSV (`query<TAB>entry`), CSV or JSONL
    file with `query` and `entry` fields; a query on several lines has several right entries.
    Entries are named as `grouping` names them: by stem or folder, paths relative to the file's
    folder; by a manifest (file name or read), the manifest's entry names."""
    path = Path(path).expanduser()
    by_path = grouping in GROUPINGS
    answers: dict[str, set[str]] = {}
    for row in read_table(path, "queries file", columns=("query", "entry")):
        query, entry = row.text("query"), row.text("entry")
        if not query or not entry:
            raise row_error("queries file", path, row, "needs a query and an entry")
        answers.setdefault(query, set()).add(_beside(path, entry) if by_path else entry)
    if not answers:
        raise UsageError(f"queries file {path} holds no queries")
    return list(answers.items())
