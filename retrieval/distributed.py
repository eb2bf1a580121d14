"""Distributed builds on Ray: the costly part of a build runs as a Ray Data job.

The job lists the images the index lacks, then:
1. reads, hashes, decodes and preprocesses them in Ray tasks;
2. encodes them in an actor pool, one model per actor (one GPU each where the cluster has GPUs);
3. writes embedding shards (vectors with the file rows they belong to) into `<index>/shards/`.
The ordinary incremental build then ingests the shards: a file whose path, size and mtime match
a shard row takes its hash and vector from there and is neither read nor encoded again. Texts,
sounds and videos are read and encoded by the driver, as in a local build.

Ray Data retries failed tasks and restarts dead actors (by default, as often as it takes). A
shard is named after the files it holds and written atomically, so a retried task rewrites the
same shard, and a job that is stopped leaves complete shards only: the next run skips the files
they hold. Shards are deleted once the build has committed their rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from .build import UnreadableFile, preprocess_bytes, read_source
from .corpus import SourceFile, file_digest
from .errors import UsageError
from .images import ImageDecodeError
from .models import ModelSpec
from .ondisk import ShardJob, ShardRunner

if TYPE_CHECKING:
    from .index import Index

SHARDS_FOLDER = "shards"
RETRIES = 3  # for the tasks that fill an on-disk index's shards


@dataclass(frozen=True)
class ShardRow:
    """What a shard knows of one file: its stat when read, its hash, its vector or its error."""

    size: int
    mtime_ns: int
    sha256: str
    vector: np.ndarray | None
    error: str | None


class Shards:
    """The embedding shards in an index's shard folder, by stored path."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.rows: dict[str, ShardRow] = {}
        for path in sorted(folder.glob("[!.]*.npz")) if folder.is_dir() else []:  # not partial ones
            self._read(path)

    def _read(self, path: Path) -> None:
        try:
            with np.load(path) as shard:
                columns = {name: shard[name] for name in shard.files}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # damaged: its files are redone
            return
        for n, key in enumerate(columns["key"]):
            error = str(columns["error"][n]) or None
            self.rows[str(key)] = ShardRow(int(columns["size"][n]), int(columns["mtime_ns"][n]),
                                           str(columns["sha256"][n]), None if error else columns["vector"][n],
                                           error)

    def row_for(self, source: SourceFile) -> ShardRow | None:
        """The shard row of a file, if it was made from the file as it is now."""
        row = self.rows.get(source.key)
        return row if row is not None and (row.size, row.mtime_ns) == (source.size, source.mtime_ns) else None

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (`auto`, `ray://host:port`), or start a local one."""
    try:
        import ray.data
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'retrieval[ray]'") from None
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours is shown instead
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    try:
        _check_reachable(address)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as error:
        raise UsageError(f"--address {address}: no Ray cluster there ({error}); start one with "
                         "`ray start --head`, or leave out --address for a local Ray") from None


def _check_reachable(address: str | None) -> None:
    """Fail in seconds where nothing listens: Ray itself keeps retrying for minutes."""
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not port.isdigit():  # None or `auto`: Ray looks for a cluster on this machine
        return
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as error:
        raise ConnectionError(error.strerror or str(error)) from None


def embed_images(index: Index, files: Sequence[SourceFile], shards: Shards,
                 max_megapixels: float, progress: bool) -> int:
    """Run the Ray Data job over `files`, writing shards; returns how many files it covered."""
    import ray.data

    todo = [f for f in files if shards.row_for(f) is None]
    if not todo:
        return 0
    shards.folder.mkdir(exist_ok=True)
    encoder, batch = index.encoder, index.encoder.batch_size
    gpus, cpus = int(ray.cluster_resources().get("GPU", 0)), int(ray.cluster_resources().get("CPU", 1))
    actors = gpus or max(1, cpus // 2)
    rows = [{"path": f.path, "key": f.key, "size": f.size, "mtime_ns": f.mtime_ns} for f in todo]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch))
    dataset = dataset.map_batches(
        decode_images, batch_size=batch,
        fn_kwargs={"preprocess": encoder.preprocess, "input_side": encoder.input_side,
                   "max_megapixels": max_megapixels})
    dataset = dataset.map_batches(
        ImageEmbedder, batch_size=batch, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0,
        fn_constructor_kwargs={"spec": index.spec, "device": "cuda" if gpus else "cpu",
                               "batch_size": batch, "int8": index.int8,
                               "threads": max(1, cpus // actors)})
    dataset = dataset.map_batches(write_shard, batch_size=None, fn_kwargs={"folder": str(shards.folder)})
    with tqdm(total=len(todo), unit="img", desc="images on Ray", disable=not progress) as bar:
        for written in dataset.iter_batches(batch_size=None):
            bar.update(int(written["files"].sum()))
    return len(todo)


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


class ImageEmbedder:
    """One model per actor: embeds the decoded images of each batch it is given."""

    def __init__(self, spec: ModelSpec, device: str, batch_size: int, int8: bool, threads: int) -> None:
        import torch

        from .encoders import load_encoder

        # Ray limits an actor's threads to the one CPU it reserves; decoding needs little, so
        # without GPUs each actor encodes with its share of the cluster's cores.
        torch.set_num_threads(threads)
        self.encoder = load_encoder(spec, device, batch_size, int8)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        batch = dict(batch)
        pixels = torch.from_numpy(np.ascontiguousarray(batch.pop("pixels")))
        batch["vector"] = self.encoder.encode_image_tensors(pixels)
        return batch


def write_shard(batch: dict[str, np.ndarray], folder: str) -> dict[str, np.ndarray]:
    """Write a batch as one shard, named after its files, renamed into place when complete."""
    name = hashlib.sha256("\0".join(map(str, batch["key"])).encode()).hexdigest()[:32]
    final = Path(folder) / f"{name}.npz"
    partial = final.with_name(f".{name}.{os.getpid()}.tmp.npz")
    columns = {column: np.asarray(batch[column]) for column in ("size", "mtime_ns", "vector")}
    columns.update({column: np.asarray(batch[column]).astype(str) for column in ("key", "sha256", "error")})
    np.savez(partial, **columns)
    os.replace(partial, final)
    return {"files": np.array([len(batch["key"])])}


def ray_runner() -> ShardRunner:
    """Fill an on-disk index's shards as Ray tasks, retried when they fail."""
    def run(function: Callable[[ShardJob], str], jobs: Sequence[ShardJob]) -> list[str]:
        import ray

        remote = ray.remote(max_retries=RETRIES)(function)
        return ray.get([remote.remote(job) for job in jobs])
    return run
