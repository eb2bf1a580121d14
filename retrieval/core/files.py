"""Files the engine writes: replaced atomically (readers see the old file or the new one, never
half of one), and model weights in safetensors form, saved and read in one way."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` to write; on success it is synced and renamed over
    `target`, on any failure (a full disk, say) it is removed, leaving `target` as it was."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(target: Path, data: bytes) -> None:
    """Replace `target` with `data` (see `replacing`)."""
    with replacing(target) as temporary:
        temporary.write_bytes(data)


def tensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file's bytes: torch tensors (detached, on the CPU, contiguous) with string
    metadata (what a model needs to be rebuilt before its weights are loaded)."""
    from safetensors.torch import save

    return save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
                metadata=dict(metadata))


def write_tensors(target: Path, tensors: Mapping[str, torch.Tensor | np.ndarray],
                  metadata: Mapping[str, str]) -> None:
    """Replace `target` with a safetensors file of these torch tensors or numpy arrays (all of
    one kind) and string metadata, written straight to disk (a large model is never held twice
    in memory). Any failure, a full disk or safetensors' own, is an OSError."""
    from safetensors import SafetensorError

    arrays = all(isinstance(value, np.ndarray) for value in tensors.values())
    try:
        with replacing(target) as temporary:
            if arrays:
                from safetensors.numpy import save_file

                save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()},
                          str(temporary), metadata=dict(metadata))
            else:
                from safetensors.torch import save_file

                save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
                          str(temporary), metadata=dict(metadata))
            os.chmod(temporary, 0o644)  # safetensors makes the file private; as public as the index
    except SafetensorError as error:
        raise OSError(f"{target}: {error}") from None


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's torch tensors and metadata (OSError, or safetensors' own error,
    when it cannot be read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        return ({name: weights.get_tensor(name) for name in weights.keys()},  # noqa: SIM118
                weights.metadata() or {})


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata alone, without reading its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        return weights.metadata() or {}


def map_tensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """A float32 safetensors file's metadata and arrays, memory-mapped: the arrays are views,
    read from disk as touched (safetensors' own numpy loader copies every tensor). ValueError
    when the file is not such a file, OSError when it cannot be read."""
    with open(path, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        if not 0 < header_size <= os.path.getsize(path) - 8:
            raise ValueError(f"{path} is not a safetensors file")
        header = json.loads(handle.read(header_size))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    metadata = header.pop("__metadata__", {})
    arrays = {}
    for name, entry in header.items():
        if entry["dtype"] != "F32":
            raise ValueError(f"{name} is {entry['dtype']}, not F32")
        start, end = entry["data_offsets"]
        arrays[name] = data[start:end].view(np.float32).reshape(entry["shape"])
    return metadata, arrays
