"""Finding duplicate images: exact copies (one content hash), and near-duplicates (resized,
recompressed, cropped, brightened or mirrored copies) whose vectors' cosine reaches a threshold,
or whose perceptual hashes differ in few bits. Pairs come from FAISS range searches, batched, so
the work grows with the number of images times the few each is near, not with all pairs; they
join into groups as connected components. Nothing here moves or deletes a file.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.errors import RetrievalError, UsageError, counted
from ..core.files import write_atomically
from ..core.paths import path_from_display
from ..core.types import DUPLICATE_SIGNALS, Hit
from ..core.vectors import unit
from ..storage.store import ImageFileRow, Store
from .filters import Filter, parse_filter

# Cosine at or above which two images' vectors make them near-duplicates. Measured on planted
# copies (resized, JPEG q60, 90% crops, brightness +-10%, mirrored, copied) of distinct renders
# with the trained tiny model: precision and recall are both 1.0 from 0.90 to 0.94 (0.85: precision
# 0.72; 0.95: recall 0.96); 0.92 sits in the middle. scripts/benchmarks/duplicates.py measures it for
# other models and photo sets (README "Duplicates").
DEFAULT_THRESHOLD = 0.92
# Hamming distance (of 64 bits) at or under which two pHashes make images near-duplicates. On the
# same set: precision 1.0 up to 6 bits, 0.98 at 8-14; pHash alone misses mirrored and most cropped
# copies (recall 0.64), so it serves best beside the vectors (`both`: 1.0 and 1.0 at 0.92 and 6).
DEFAULT_MAX_DISTANCE = 6
# Above this many images pairs are sought within coarse cells (`_cell_pairs`), not among all:
# all pairs cost n^2 (20k random 512-d vectors, 2 busy cores: 24 s exact, 10.5 s by cells).
EXACT_SEARCH_LIMIT = 10_000
CELLS_PER_ROOT = 1  # sqrt(n) cells: 1,000 for 1M images
CELL_PROBES = 3
KMEANS_POINTS_PER_CELL = 40
KMEANS_ITERATIONS = 4
REDUCED_DIMS = 128  # where cells are sought: a quarter of 512 dimensions
PCA_SAMPLE = 50_000
QUERY_BATCH = 4096
# How many candidates a deduplicated search collapses into its k hits, per hit wanted.
DEDUP_POOL = 5


class HashesMissing(RetrievalError):
    """Perceptual hashes were asked for, and images lack them."""


@dataclass(frozen=True)
class DuplicateFile:
    id: int
    path: str
    width: int | None
    height: int | None
    size: int
    mtime: float
    sha256: str

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)

    @property
    def resolution(self) -> str:
        return f"{self.width}x{self.height}" if self.width else "unknown"


@dataclass
class DuplicateGroup:
    """Files showing one picture, the one to keep first; `exact` when all hold one content."""

    files: list[DuplicateFile]
    exact: bool
    reason: str  # why the first is the one to keep

    @property
    def keep(self) -> DuplicateFile:
        return self.files[0]

    @property
    def others(self) -> list[DuplicateFile]:
        return self.files[1:]

    def to_dict(self) -> dict:
        return {"size": len(self.files), "exact": self.exact, "keep": self.keep.path,
                "reason": self.reason, "files": [asdict(f) for f in self.files]}


@dataclass
class Duplicates:
    """What a search for duplicates found among `images` images, largest groups first.
    `unmeasured` images have no recorded size: a build measures them."""

    groups: list[DuplicateGroup]
    images: int
    by: str
    threshold: float
    max_distance: int
    unmeasured: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"images": self.images, "by": self.by, "threshold": self.threshold,
                "max_distance": self.max_distance, "unmeasured": self.unmeasured,
                "groups": [g.to_dict() for g in self.groups]}

    def plan(self) -> dict:
        """What a user may do: per group, the file to keep and those that could go."""
        return {"note": "nothing was moved or deleted; each group keeps one file",
                "groups": [{"keep": g.keep.path, "reason": g.reason,
                            "remove": [f.path for f in g.others]} for g in self.groups]}

    def write_plan(self, path: str | Path) -> None:
        write_atomically(Path(path), (json.dumps(self.plan(), indent=2) + "\n").encode())

    def script(self) -> str:
        """A shell script removing all but one file per group, every line commented out, for
        the user to read and uncomment. Its `rm` lines name the files themselves (a name's
        bytes that are not UTF-8 kept as surrogates: `write_script` writes them back as bytes)."""
        lines = ["#!/bin/sh", "# Duplicates found by `retrieve duplicates`. Nothing has been removed.",
                 "# Read each group, then uncomment the `rm` lines you agree with.", ""]
        for number, group in enumerate(self.groups, 1):
            kind = "exact copies" if group.exact else "near-duplicates"
            lines.append(f"# group {number}: {counted(len(group.files), 'file')}, {kind}")
            lines.append(f"# keep {shlex.quote(group.keep.path)}  ({group.reason})")
            lines += [f"# rm -- {shlex.quote(path_from_display(f.path))}" for f in group.others]
            lines.append("")
        return "\n".join(lines)

    def write_script(self, path: str | Path) -> None:
        write_atomically(Path(path), os.fsencode(self.script()))


def find_duplicates(store: Store, *, threshold: float | None = None, by: str = "vector",
                    under: str | None = None, min_size: int = 2, max_distance: int | None = None,
                    filter: str | Filter | None = None, progress: bool = False) -> Duplicates:
    """Groups of duplicate images among those indexed (`under`: a stored folder or file path;
    `filter`: the language of `retrieval.query.filters`), largest first, of at least `min_size`
    files each. `by` chooses what makes near-duplicates: vector cosine >= `threshold`, pHash
    distance <= `max_distance` bits, or `both` (either one). Exact copies (one content hash)
    are always grouped. `progress` shows a bar on stderr while a large collection's vectors
    are compared."""
    started = time.perf_counter()
    chosen = filter if isinstance(filter, Filter) else parse_filter(filter)  # bad ones before any work
    if by not in DUPLICATE_SIGNALS:
        raise UsageError(f"`by` must be one of {', '.join(DUPLICATE_SIGNALS)}, not {by!r}")
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if not -1.0 <= threshold <= 1.0:
        raise UsageError(f"`threshold` is a cosine, between -1 and 1, not {threshold:g}")
    max_distance = DEFAULT_MAX_DISTANCE if max_distance is None else int(max_distance)
    if not 0 <= max_distance <= 64:
        raise UsageError(f"`max_distance` counts bits of a 64-bit hash: 0 to 64, not {max_distance}")
    if min_size < 2:
        raise UsageError(f"`min_size` must be at least 2, not {min_size}")
    rows = store.image_files(under, chosen.sql(store.sources()) if chosen else None)
    pairs = [exact_pairs([row.sha256 for row in rows])]
    if by in ("vector", "both") and rows:
        ids = np.array([row.item_id for row in rows], dtype=np.int64)
        with tqdm(unit="cell", desc="comparing vectors", leave=False,
                  disable=not progress or len(ids) <= EXACT_SEARCH_LIMIT) as bar:
            pairs.append(similar_pairs(store.vectors_for_ids(ids), threshold,
                                       progress=lambda done, total: _advance(bar, done, total)))
    if by in ("phash", "both") and rows:
        pairs.append(hash_pairs(_hashes(rows, store), max_distance))
    components = connected_groups(len(rows), np.concatenate(pairs))
    groups = [_group([rows[i] for i in members]) for members in components if len(members) >= min_size]
    groups.sort(key=lambda g: (-len(g.files), g.keep.path))
    unmeasured = sum(row.width is None for row in rows)
    return Duplicates(groups, len(rows), by, threshold, max_distance, unmeasured,
                      time.perf_counter() - started)


def _advance(bar: tqdm, done: int, total: int) -> None:
    bar.total = total
    bar.update(done - bar.n)


# -- pairs ---------------------------------------------------------------------------------------

def exact_pairs(digests: Sequence[str]) -> np.ndarray:
    """(i, j) pairs joining each content's files: each to the first with that content."""
    first: dict[str, int] = {}
    pairs = [(first.setdefault(digest, i), i) for i, digest in enumerate(digests) if digest]
    return np.array([p for p in pairs if p[0] != p[1]], dtype=np.int64).reshape(-1, 2)


def similar_pairs(vectors: np.ndarray, threshold: float, batch: int = QUERY_BATCH, *,
                  exact_limit: int = EXACT_SEARCH_LIMIT,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """(i, j) pairs, i < j, of rows whose cosine is at least `threshold`. Up to `exact_limit`
    rows: exact, FAISS range searches over all rows, `batch` queries at a time. Beyond: pairs
    within coarse cells (see `_cell_pairs`), which find nearly all near-duplicates at a small
    share of the cost. `progress(done, total)` is told how the cells go."""
    vectors = _unit_rows(vectors)
    count = len(vectors)
    if count < 2:
        return np.zeros((0, 2), np.int64)
    if count > exact_limit:
        return _cell_pairs(vectors, np.float32(threshold), progress)
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    # range_search keeps scores strictly above the radius; a hair below keeps `>=` as documented.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
    found = []
    for start in range(0, count, batch):
        limits, _, neighbours = index.range_search(vectors[start:start + batch], radius)
        queries = start + np.repeat(np.arange(len(limits) - 1), np.diff(limits).astype(np.int64))
        keep = neighbours > queries
        found.append(np.stack([queries[keep], neighbours[keep]], axis=1))
    return np.concatenate(found).astype(np.int64)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows of unit length as C-ordered float32: the array itself when it already is (stored
    vectors are), so a million vectors are not copied; else a normalised copy."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.empty(len(vectors), np.float32)
    for start in range(0, len(vectors), QUERY_BATCH):  # blocks: no temporary as large as the input
        block = vectors[start:start + QUERY_BATCH]
        norms[start:start + QUERY_BATCH] = np.sqrt(np.einsum("ij,ij->i", block, block))
    if np.allclose(norms, 1, atol=1e-4):
        return vectors
    import faiss

    vectors = vectors.copy()
    faiss.normalize_L2(vectors)  # in place; a zero row stays zero and pairs with nothing
    return vectors


def _cell_pairs(vectors: np.ndarray, threshold: np.float32,
                progress: Callable[[int, int], None] | None) -> np.ndarray:
    """Near pairs among many unit rows, sought cell by cell in a smaller space, then verified.

    1. PCA projects the rows onto their REDUCED_DIMS main axes. A projection never lengthens a
       difference, so two rows whose cosine reaches the threshold (|x - y|^2 <= 2 - 2t) are at
       least as close once projected: the smaller space loses no pair, at a quarter of the cost.
    2. k-means splits the projected rows into CELLS_PER_ROOT * sqrt(n) cells; each row lives in
       its nearest cell and visits its CELL_PROBES nearest. Per cell, one FAISS range search
       (BLAS inside) takes every visitor against every resident, instead of one scan per row.
       A pair is missed only when neither row visits the other's cell.
    3. The candidates are checked with the exact cosine of the stored rows."""
    import faiss

    count = len(vectors)
    guests_side = _reduced(vectors)  # rows [x, -|x|^2/2, 1]
    dims = guests_side.shape[1] - 2
    cells = max(1, int(CELLS_PER_ROOT * np.sqrt(count)))
    probes = min(CELL_PROBES, cells)
    sample = np.random.default_rng(0).choice(count, min(count, KMEANS_POINTS_PER_CELL * cells), replace=False)
    # Coarse cells need no fine k-means: near-duplicates sit close enough to share theirs.
    kmeans = faiss.Kmeans(dims, cells, niter=KMEANS_ITERATIONS, seed=0,
                          max_points_per_centroid=KMEANS_POINTS_PER_CELL)
    kmeans.train(np.ascontiguousarray(guests_side[np.sort(sample), :dims]))
    visits = np.concatenate([  # (count, probes): each row's nearest cells
        kmeans.index.search(np.ascontiguousarray(guests_side[start:start + QUERY_BATCH, :dims]), probes)[1]
        for start in range(0, count, QUERY_BATCH)])
    residents = _members(visits[:, 0], cells)
    visitors = _members(visits.ravel(), cells)
    del visits
    # [x, -|x|^2/2, 1] . [y, 1, -|y|^2/2] = x.y - |x|^2/2 - |y|^2/2 = -|x - y|^2/2, which is at
    # least t - 1 for a near pair; a hair lower, so float rounding costs no true pair.
    radius = float(threshold) - 1.0 - 1e-4
    found = []
    for cell in range(cells):
        home = residents[cell]
        if len(home):
            guests = visitors[cell] // probes  # row numbers from positions in the flat array
            hosts = faiss.IndexFlatIP(dims + 2)
            hosts.add(guests_side[home][:, [*range(dims), dims + 1, dims]])
            limits, _, hit_cols = hosts.range_search(guests_side[guests], radius)
            a = np.repeat(guests, np.diff(limits).astype(np.int64))
            b = home[hit_cols]
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[a != b])
        if progress:
            progress(cell + 1, cells)
    del guests_side
    candidates = np.unique(np.concatenate(found).astype(np.int64), axis=0)  # found from both ends
    keep = np.zeros(len(candidates), bool)
    for start in range(0, len(candidates), QUERY_BATCH):
        a, b = candidates[start:start + QUERY_BATCH].T
        keep[start:start + QUERY_BATCH] = np.einsum("ij,ij->i", vectors[a], vectors[b]) >= threshold
    return candidates[keep]


def _reduced(vectors: np.ndarray) -> np.ndarray:
    """Rows [x, -|x|^2/2, 1], x a row projected onto the rows' REDUCED_DIMS principal axes
    (learnt from a sample; the row itself when it has no more dimensions), a block at a time."""
    import faiss

    count, dim = vectors.shape
    dims = min(dim, REDUCED_DIMS)
    pca = None
    if dim > dims:
        pca = faiss.PCAMatrix(dim, dims)
        sample = np.random.default_rng(1).choice(count, min(count, PCA_SAMPLE), replace=False)
        pca.train(vectors[np.sort(sample)])
    reduced = np.empty((count, dims + 2), np.float32)
    for start in range(0, count, QUERY_BATCH):
        block = vectors[start:start + QUERY_BATCH]
        block = pca.apply(block) if pca is not None else block
        rows = reduced[start:start + len(block)]
        rows[:, :dims] = block
        rows[:, dims] = -0.5 * np.einsum("ij,ij->i", block, block)
        rows[:, dims + 1] = 1
    return reduced


def _members(cells_of: np.ndarray, cells: int) -> list[np.ndarray]:
    """For each cell, the positions in `cells_of` that name it, ascending."""
    order = np.argsort(cells_of, kind="stable")
    bounds = np.searchsorted(cells_of[order], np.arange(cells + 1))
    return [order[bounds[c]:bounds[c + 1]] for c in range(cells)]


def hash_pairs(hashes: np.ndarray, max_distance: int, batch: int = QUERY_BATCH) -> np.ndarray:
    """(i, j) pairs, i < j, of 64-bit hashes (rows of 8 bytes) at most `max_distance` bits apart;
    rows of zeros are hashes that are missing and pair with nothing."""
    import faiss

    present = np.flatnonzero(hashes.any(axis=1))
    if len(present) < 2:
        return np.zeros((0, 2), np.int64)
    codes = np.ascontiguousarray(hashes[present], dtype=np.uint8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    found = []
    for start in range(0, len(codes), batch):
        # Binary range search keeps distances strictly below the radius.
        limits, _, neighbours = index.range_search(codes[start:start + batch], max_distance + 1)
        queries = start + np.repeat(np.arange(len(limits) - 1), np.diff(limits).astype(np.int64))
        keep = neighbours > queries
        found.append(np.stack([present[queries[keep]], present[neighbours[keep]]], axis=1))
    return np.concatenate(found).astype(np.int64)


def hash_bytes(hashes: Sequence[str | None]) -> np.ndarray:
    """Hex hashes as rows of 8 bytes; a missing one as zeros."""
    joined = b"".join(bytes.fromhex(h) if h else bytes(8) for h in hashes)
    return np.frombuffer(joined, dtype=np.uint8).reshape(len(hashes), 8)


def _hashes(rows: list[ImageFileRow], store: Store) -> np.ndarray:
    missing = sum(row.phash is None for row in rows)
    if missing:
        from ..media.images import hashing_available

        if not hashing_available():
            raise HashesMissing("perceptual hashes need the imagehash package: pip install imagehash, "
                                f"then run `retrieve index --index {store.path.parent}` to hash the images")
        raise HashesMissing(f"{counted(missing, 'image')} of {len(rows)} have no perceptual hash yet: run "
                            f"`retrieve index --index {store.path.parent}` to hash them (nothing is "
                            "encoded again)")
    return hash_bytes([row.phash for row in rows])


def connected_groups(count: int, pairs: np.ndarray) -> list[list[int]]:
    """The connected components of `count` nodes joined by `pairs`, singletons left out
    (union-find with path halving; each member list in ascending order)."""
    parent = list(range(count))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in pairs.tolist():
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for node in range(count):
        members.setdefault(root(node), []).append(node)
    return [group for group in members.values() if len(group) > 1]


# -- which file to keep --------------------------------------------------------------------------

def _group(rows: list[ImageFileRow]) -> DuplicateGroup:
    files = [DuplicateFile(row.item_id, row.path, row.width or None, row.height or None, row.size,
                           row.mtime_ns / 1e9, row.sha256) for row in rows]
    # Largest resolution, then oldest, then path: the same answer every run.
    files.sort(key=lambda f: (-f.pixels, f.mtime, f.path))
    return DuplicateGroup(files, len({f.sha256 for f in files}) == 1, _why_keep(files))


def _why_keep(files: list[DuplicateFile]) -> str:
    keep = files[0]
    oldest = f"oldest ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(keep.mtime))})"
    if any(f.width is None for f in files):
        return f"{oldest}; some sizes not recorded yet (run `retrieve index` again)"
    if len({f.sha256 for f in files}) == 1:
        return f"exact copies: {oldest}"
    if keep.pixels > files[1].pixels:
        return f"largest resolution ({keep.resolution})"
    return f"largest resolution ({keep.resolution}), {oldest} of those"


# -- collapsing search results -------------------------------------------------------------------

def collapse_hits(hits: list[Hit], vectors: np.ndarray, threshold: float | None = None) -> list[Hit]:
    """One hit per group of near-duplicates among `hits` (best first): the groups
    `find_duplicates` makes by vector, chained through any member (a mirrored copy may resemble
    the original only through a darker one), each kept as its best hit listing the others."""
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    vectors = unit(np.asarray(vectors, dtype=np.float32).reshape(len(hits), -1))
    pairs = np.argwhere(np.triu(vectors @ vectors.T >= threshold, k=1))
    folded = {members[0]: members[1:] for members in connected_groups(len(hits), pairs)}
    dropped = {j for others in folded.values() for j in others}
    kept = []
    for i, hit in enumerate(hits):
        if i in dropped:
            continue
        hit.duplicates = [{"id": hits[j].id, "uri": hits[j].uri, "path": hits[j].path,
                           "score": hits[j].score} for j in folded.get(i, [])]
        kept.append(hit)
    return kept
