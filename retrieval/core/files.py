"""Files the engine writes: replaced atomically (readers see the old file or the new one, never
half of one), and model weights in safetensors form, saved and read in one way."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

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
