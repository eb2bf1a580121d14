"""On-disk IVF indexes, for corpora whose vectors outgrow RAM.

A build takes three steps, the middle one in parallel (local processes or Ray tasks):
1. train the coarse quantizer and the codes on a sample;
2. fill shards: each is a copy of the trained index holding one range of ids, and writes those
   ids' exact vectors into one shared, memory-mapped matrix;
3. merge the shards' inverted lists into one file (FAISS `OnDiskInvertedLists`).

Serving maps the lists, the id array and the exact vectors; RAM holds the coarse quantizer and
whatever pages the operating system keeps cached. Candidates are re-ranked with the exact
vectors read from the map, so scores are true cosine similarities.

A folder holds one index: `index.faiss` (the quantizer and a reference to the lists),
`lists.ivfdata`, `ids.npy` (sorted) and `vectors.npy` (float32 rows in the order of the ids).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from ..core.types import DISK_INDEX_TYPES
from .vectors import SearchKnobs, VectorIndex, new_trained_index

CHUNK_ROWS = 65_536  # vectors read and added at a time: 128 MiB of 512-d float32
SAMPLE_PIECES = 64  # the training sample is read from this many places spread over the ids

INDEX_FILE, LISTS_FILE, IDS_FILE, VECTORS_FILE = "index.faiss", "lists.ivfdata", "ids.npy", "vectors.npy"
TRAINED_FILE = "trained.faiss"
DEFAULT_KNOBS = SearchKnobs()


class VectorSource(Protocol):
    """Where a build reads vectors: picklable, so worker processes and Ray tasks can read too."""

    dim: int

    def ids(self) -> np.ndarray:
        """Every id, sorted ascending."""

    def read(self, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
        """The ids in [low, high), sorted, and their vectors."""


@dataclass(frozen=True)
class ShardJob:
    """One shard to fill: chunks of ids as (low, high, first row in the vector matrix)."""

    source: VectorSource
    folder: str
    number: int
    chunks: tuple[tuple[int, int, int], ...]

    @property
    def path(self) -> str:
        return str(Path(self.folder) / f"shard-{self.number:05d}.faiss")


# Maps a function over shard jobs, possibly elsewhere; returns the results in order.
ShardRunner = Callable[[Callable[[ShardJob], str], Sequence[ShardJob]], list[str]]


def process_runner(workers: int) -> ShardRunner:
    """Fill shards in `workers` local processes (spawned: FAISS's OpenMP does not survive fork)."""
    def run(function: Callable[[ShardJob], str], jobs: Sequence[ShardJob]) -> list[str]:
        if workers <= 1 or len(jobs) <= 1:
            return [function(job) for job in jobs]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            return list(pool.map(function, jobs))
    return run


def fill_shard(job: ShardJob) -> str:
    """Add a shard's vectors to a copy of the trained index and write its exact vectors."""
    folder = Path(job.folder)
    index = faiss.read_index(str(folder / TRAINED_FILE))
    matrix = np.load(folder / VECTORS_FILE, mmap_mode="r+")
    for low, high, row in job.chunks:
        ids, vectors = job.source.read(low, high)
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
        matrix[row:row + len(ids)] = vectors
    matrix.flush()
    faiss.write_index(index, job.path)
    return job.path


def build_on_disk(source: VectorSource, folder: Path, index_type: str, workers: int = 2,
                  runner: ShardRunner | None = None, trained: faiss.Index | None = None,
                  lists: int | None = None, log: Callable[[str], None] = lambda line: None
                  ) -> OnDiskIndex:
    """Build an on-disk index of `index_type` (a key of DISK_INDEX_TYPES) from `source` into `folder`.

    `lists` inverted lists (default: about 4 sqrt(N)); `trained` (an empty trained index)
    skips training, so two builds can share codebooks.
    The folder is assembled beside its final place and renamed into it when complete.
    """
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        _assemble(source, building, index_type, workers, runner, trained, lists, log)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    building.rename(folder)
    return OnDiskIndex.load(folder)


def _assemble(source: VectorSource, building: Path, index_type: str, workers: int,
              runner: ShardRunner | None, trained: faiss.Index | None, lists: int | None,
              log: Callable[[str], None]) -> None:
    """Train (unless given `trained`), fill the shards and merge their lists, in `building`."""
    ids = source.ids()
    np.save(building / IDS_FILE, ids)
    chunks = _chunks(ids)
    if trained is None:
        log(f"training on a sample of the {len(ids):,} vectors")
        trained = new_trained_index(DISK_INDEX_TYPES[index_type], source.dim, len(ids),
                                    lambda limit: _sample(source, ids, limit), lists)
    faiss.write_index(trained, str(building / TRAINED_FILE))
    np.lib.format.open_memmap(building / VECTORS_FILE, "w+", np.float32, (len(ids), source.dim)).flush()
    jobs = _shard_jobs(source, building, chunks, max(1, workers))
    log(f"filling {len(jobs)} shards of {len(ids):,} vectors")
    shards = (runner or process_runner(workers))(fill_shard, jobs)
    log("merging the shards' inverted lists")
    merged = faiss.read_index(str(building / TRAINED_FILE))
    with _quiet_faiss():
        merge_ondisk(merged, shards, str(building / LISTS_FILE))
    faiss.write_index(merged, str(building / INDEX_FILE))
    for leftover in [*shards, str(building / TRAINED_FILE)]:
        Path(leftover).unlink()


@contextmanager
def _quiet_faiss() -> Iterator[None]:
    """FAISS's on-disk lists printf their housekeeping ("resizing ...") to standard output,
    which must hold only what a command prints (JSON, say): send it to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # what C buffered goes to /dev/null, not after it
        os.dup2(saved, 1)
        os.close(saved)


def _chunks(ids: np.ndarray) -> list[tuple[int, int, int]]:
    """Id ranges of CHUNK_ROWS rows each, with the row where each starts."""
    starts = range(0, len(ids), CHUNK_ROWS)
    return [(int(ids[s]), int(ids[s + CHUNK_ROWS]) if s + CHUNK_ROWS < len(ids) else int(ids[-1]) + 1, s)
            for s in starts]


def _shard_jobs(source: VectorSource, folder: Path, chunks: list[tuple[int, int, int]],
                workers: int) -> list[ShardJob]:
    """Contiguous runs of chunks, a few per worker so a slow one does not hold up the rest."""
    count = min(len(chunks), 4 * workers) or 1
    bounds = np.linspace(0, len(chunks), count + 1).astype(int)
    return [ShardJob(source, str(folder), n, tuple(chunks[a:b]))
            for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def _sample(source: VectorSource, ids: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` vectors read from SAMPLE_PIECES runs spread evenly over the ids."""
    if len(ids) <= limit:
        return source.read(int(ids[0]), int(ids[-1]) + 1)[1]
    run = limit // SAMPLE_PIECES
    starts = np.linspace(0, len(ids) - run, SAMPLE_PIECES).astype(int)
    pieces = [source.read(int(ids[s]), int(ids[s + run - 1]) + 1)[1] for s in starts]
    return np.concatenate(pieces)


class OnDiskIndex(VectorIndex):
    """An IVF index whose inverted lists and exact vectors stay on disk, memory-mapped."""

    def __init__(self, index: faiss.Index, folder: Path) -> None:
        super().__init__(index)
        self.folder = folder
        self.sorted_ids = np.load(folder / IDS_FILE, mmap_mode="r")
        self.matrix = _mapped_for_random_reads(folder / VECTORS_FILE)

    @classmethod
    def load(cls, folder: Path, mmap: bool = True) -> OnDiskIndex:
        """Map a built folder; the lists file is found beside index.faiss wherever it moved."""
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        with _quiet_faiss():
            return cls(faiss.read_index(str(folder / INDEX_FILE), flags), folder)

    @property
    def index_type(self) -> str:
        return super().index_type + "-disk"

    @property
    def can_remove(self) -> bool:
        """Its lists are shared read-only maps: a change means a new build."""
        return False

    @property
    def can_add(self) -> bool:
        return False

    def ids(self) -> np.ndarray:
        return np.asarray(self.sorted_ids)

    def exact_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of `ids`, read from the map in the order asked."""
        rows = np.searchsorted(self.sorted_ids, ids)
        order = np.argsort(rows)  # ascending reads touch each page once
        found = np.empty((len(ids), self.matrix.shape[1]), np.float32)
        found[order] = self.matrix[rows[order]]
        return found

    def search(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None,
               knobs: SearchKnobs = DEFAULT_KNOBS, exact=None) -> tuple[np.ndarray, np.ndarray]:
        """As VectorIndex.search, always re-ranking with the vectors kept beside the lists."""
        return super().search(query, k, allowed, knobs, self.exact_vectors)

    def save(self, path: Path) -> None:
        if path != self.folder:
            raise ValueError(f"an on-disk index lives where it was built ({self.folder})")


def _mapped_for_random_reads(path: Path) -> np.ndarray:
    """A .npy matrix mapped read-only, with the kernel told its pages are read at random.

    Re-ranking reads a few hundred scattered rows: without the hint, each 2 KB row read from
    disk pulls in the kernel's read-around window (128 KB+) beside it. numpy's own memmap
    keeps its map to itself, so the map is made here.
    """
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray(shape, dtype, buffer=mapped, offset=offset, order="F" if fortran_order else "C")
