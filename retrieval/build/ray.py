"""Distributed builds on Ray: the costly part of a build runs as a Ray Data job.

The job lists the images the index lacks, then:
1. reads, hashes, decodes and preprocesses them in Ray tasks;
2. encodes them in an actor pool, one model per actor (one GPU each where the cluster has GPUs);
3. writes embedding shards (vectors with the file rows they belong to) into `<index>/shards/`.
The texts of new captions and text files that the index has no vector for go through the same
actor pool in a second job. The ordinary incremental build then ingests the shards: a file
whose path, size and mtime match a shard row takes its hash and vector from there and is
neither read nor encoded again, and a text whose hash is in a shard is not encoded again.
Sounds and videos are encoded by the driver, as in a local build.

Ray Data retries failed tasks and restarts dead actors (by default, as often as it takes). A
shard is named after the files it holds and written atomically, so a retried task rewrites the
same shard, and a job that is stopped leaves complete shards only: the next run skips the files
they hold. Shards are deleted once the build has committed their rows.

Ray starts only when there is something to embed (it takes seconds), and what it prints itself
(its C++ core's errors, its loggers' lines) is kept out of the terminal unless RETRIEVAL_RAY_LOGS
is set; Ray keeps its own logs under its session folder (/tmp/ray/session_latest/logs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ..core.errors import UsageError
from ..encoders.spec import ModelSpec
from ..media.corpus import SourceFile, file_digest
from ..media.images import ImageDecodeError
from ..storage.ondisk import ShardJob, ShardRunner
from .reading import UnreadableFile, preprocess_bytes, read_source

if TYPE_CHECKING:
    from ..context import Encoders

RETRIES = 3  # for the tasks that fill an on-disk index's shards
TEXT_BATCH = 256
RAY_LOGS_VARIABLE = "RETRIEVAL_RAY_LOGS"  # set (to anything but 0) to see what Ray prints


@dataclass(frozen=True)
class ShardRow:
    """What a shard knows of one file: its stat when read, its hash, its vector or its error."""

    size: int
    mtime_ns: int
    sha256: str
    vector: np.ndarray | None
    error: str | None


class Shards:
    """The embedding shards in an index's shard folder: image rows by stored path (`images/`)
    and text vectors by text hash (`texts/`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: dict[str, ShardRow] = {}
        self.texts: dict[str, np.ndarray] = {}
        for columns in _read_shards(folder / "images"):
            for n, key in enumerate(columns["key"]):
                error = str(columns["error"][n]) or None
                self.rows[str(key)] = ShardRow(int(columns["size"][n]), int(columns["mtime_ns"][n]),
                                               str(columns["sha256"][n]),
                                               None if error else columns["vector"][n], error)
        for columns in _read_shards(folder / "texts"):
            self.texts.update(zip(map(str, columns["key"]), columns["vector"]))

    @property
    def dim(self) -> int:
        """The size of the vectors the shards hold; 0 when they hold none."""
        vectors = (*self.texts.values(), *(row.vector for row in self.rows.values()))
        return next((len(vector) for vector in vectors if vector is not None), 0)

    def row_for(self, source: SourceFile) -> ShardRow | None:
        """The shard row of a file, if it was made from the file as it is now."""
        row = self.rows.get(source.key)
        return row if row is not None and (row.size, row.mtime_ns) == (source.size, source.mtime_ns) else None

    def images_to_embed(self, files: Sequence[SourceFile]) -> list[SourceFile]:
        """The image files no shard holds as they are now."""
        return [f for f in files if f.kind == "image" and self.row_for(f) is None]

    def texts_to_embed(self, texts: dict[str, str]) -> dict[str, str]:
        """The texts (by text hash) no shard holds."""
        return {digest: text for digest, text in texts.items() if digest not in self.texts}

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _read_shards(folder: Path) -> Iterator[dict[str, np.ndarray]]:
    """The columns of each complete shard; damaged ones are passed over (their work is redone)."""
    for path in sorted(folder.glob("[!.]*.npz")) if folder.is_dir() else []:  # not partial ones
        try:
            with np.load(path) as shard:
                yield {name: shard[name] for name in shard.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            continue


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (`auto`, `ray://host:port`), or start a local one."""
    try:
        import ray.data
    except ImportError:
        raise UsageError("`engine` ray needs Ray: pip install 'retrieval[ray]'") from None
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours is shown instead
    logging.getLogger("ray.data").setLevel(logging.INFO if _ray_logs_wanted() else logging.ERROR)
    if ray.is_initialized():
        return
    try:
        _check_reachable(address)
        with ray_output_hidden():
            ray.init(address=address, include_dashboard=False, log_to_driver=_ray_logs_wanted(),
                     logging_level=logging.INFO if _ray_logs_wanted() else logging.ERROR)
    except ConnectionError as error:
        raise UsageError(f"`address` {address}: no Ray cluster there ({error}); start one with "
                         "`ray start --head`, or leave out `address` for a local Ray") from None


def _ray_logs_wanted() -> bool:
    return os.environ.get(RAY_LOGS_VARIABLE, "0") not in ("", "0")


@contextmanager
def ray_output_hidden() -> Iterator[None]:
    """Meanwhile, what is written to the standard error descriptor (Ray's C++ core writes its
    errors there, and its loggers hold the stream they found at import) goes to /dev/null;
    `sys.stderr`, where our progress bars and messages go, still reaches the terminal.
    Nothing is hidden when RETRIEVAL_RAY_LOGS is set, or when sys.stderr is not that
    descriptor (a notebook, a test capturing output)."""
    try:
        hiding = not _ray_logs_wanted() and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # no descriptor behind sys.stderr
        hiding = False
    if not hiding:
        yield
        return
    shown = sys.stderr
    shown.flush()
    terminal = os.dup(2)
    sys.stderr = open(terminal, "w", buffering=1, encoding=shown.encoding, errors=shown.errors)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(terminal, 2)
        sys.stderr.close()
        sys.stderr = shown


def _check_reachable(address: str | None) -> None:
    """Fail in seconds where nothing listens: Ray itself keeps retrying for minutes."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not port.isdigit():  # None or `auto`: Ray looks for a cluster on this machine
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as error:
        raise ConnectionError(error.strerror or str(error)) from None


def embed_images(encoders: Encoders, files: Sequence[SourceFile], shards: Shards,
                 max_megapixels: float, progress: bool) -> int:
    """Run the Ray Data job over image `files`, writing shards; returns how many it covered."""
    todo = shards.images_to_embed(files)
    if not todo:
        return 0
    encoder = encoders.clip
    rows = [{"path": f.path, "key": f.key, "size": f.size, "mtime_ns": f.mtime_ns} for f in todo]
    dataset = _items(rows, encoder.batch_size).map_batches(
        decode_images, batch_size=encoder.batch_size,
        fn_kwargs={"preprocess": encoder.preprocess, "input_side": encoder.input_side,
                   "max_megapixels": max_megapixels})
    _embed_and_write(encoders, dataset, encoder.batch_size, shards.folder / "images", len(todo),
                     "images on Ray", progress)
    return len(todo)


def embed_texts(encoders: Encoders, texts: dict[str, str], shards: Shards, progress: bool) -> int:
    """Run the Ray Data job over texts (by text hash) not in the shards yet; returns how many."""
    todo = [{"key": digest, "text": text} for digest, text in shards.texts_to_embed(texts).items()]
    if todo:
        _embed_and_write(encoders, _items(todo, TEXT_BATCH), TEXT_BATCH, shards.folder / "texts",
                         len(todo), "texts on Ray", progress)
    return len(todo)


def _items(rows: list[dict], batch: int):
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch))


def _embed_and_write(encoders: Encoders, dataset, batch: int, folder: Path, total: int, desc: str,
                     progress: bool) -> None:
    """Encode a dataset's batches in the actor pool, write them as shards into `folder`."""
    import ray.data

    folder.mkdir(parents=True, exist_ok=True)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    actors = gpus or max(1, cpus // 2)
    dataset = dataset.map_batches(
        Embedder, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        fn_constructor_kwargs={"spec": encoders.spec, "device": "cuda" if gpus else "cpu",
                               "batch_size": encoders.batch_size, "int8": encoders.int8,
                               "threads": max(1, cpus // actors)})
    dataset = dataset.map_batches(write_shard, batch_size=None, fn_kwargs={"folder": str(folder)})
    with ray_output_hidden(), tqdm(total=total, desc=desc, disable=not progress) as bar:
        for written in dataset.iter_batches(batch_size=None):
            bar.update(int(written["written"].sum()))


def decode_images(batch: dict[str, np.ndarray], preprocess: Callable, input_side: int,
                  max_megapixels: float) -> dict[str, np.ndarray]:
    """Read, hash, decode and preprocess a batch of image files, as a local build does."""
    digests, errors, pixels = [], [], []
    for path in batch["path"]:
        digest, error, tensor = "", "", None
        try:
            data = read_source(str(path))
            digest = file_digest(data)
            tensor = preprocess_bytes(data, preprocess, input_side, max_megapixels).numpy()
        except (UnreadableFile, ImageDecodeError) as failure:
            error = str(failure)
        digests.append(digest)
        errors.append(error)
        pixels.append(tensor)
    shape = next((p.shape for p in pixels if p is not None), (3, input_side, input_side))
    stacked = np.stack([p if p is not None else np.zeros(shape, np.float32) for p in pixels])
    return {**batch, "sha256": np.array(digests), "error": np.array(errors), "pixels": stacked}


class Embedder:
    """One model per actor: embeds each batch it is given, decoded images or texts."""

    def __init__(self, spec: ModelSpec, device: str, batch_size: int, int8: bool, threads: int) -> None:
        import torch

        from ..encoders.clip import load_encoder

        # Ray limits an actor's threads to the one CPU it reserves; decoding needs little, so
        # without GPUs each actor encodes with its share of the cluster's cores.
        torch.set_num_threads(threads)
        self.encoder = load_encoder(spec, device, batch_size, int8)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        batch = dict(batch)
        if "pixels" in batch:
            pixels = torch.from_numpy(np.ascontiguousarray(batch.pop("pixels")))
            batch["vector"] = self.encoder.encode_image_tensors(pixels)
        else:
            batch["vector"] = self.encoder.encode_texts([str(text) for text in batch.pop("text")])
        return batch


def write_shard(batch: dict[str, np.ndarray], folder: str) -> dict[str, np.ndarray]:
    """Write a batch as one shard, named after its keys, renamed into place when complete."""
    name = hashlib.sha256("\0".join(map(str, batch["key"])).encode()).hexdigest()[:32]
    final = Path(folder) / f"{name}.npz"
    partial = final.with_name(f".{name}.{os.getpid()}.tmp.npz")
    # strings as fixed-width unicode: loading must not need pickle
    columns = {column: np.asarray(values).astype(str) if np.asarray(values).dtype == object
               else np.asarray(values) for column, values in batch.items() if column != "path"}
    np.savez(partial, **columns)
    os.replace(partial, final)
    return {"written": np.array([len(batch["key"])])}


def ray_runner(address: str | None = None) -> ShardRunner:
    """Fill an on-disk index's shards as Ray tasks, retried when they fail, on the cluster at
    `address` (joined, or started, only when there are shards to fill)."""
    def run(function: Callable[[ShardJob], str], jobs: Sequence[ShardJob]) -> list[str]:
        import ray

        connect(address)
        remote = ray.remote(max_retries=RETRIES)(function)
        with ray_output_hidden():
            return ray.get([remote.remote(job) for job in jobs])
    return run
