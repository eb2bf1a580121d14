"""Temporal encoders: frame vectors (T, d) of a video segment -> one unit vector, reading frame
order (a Bi-LSTM or a small transformer), where mean and max pooling cannot.

A trained encoder lives in the index folder as `temporal_<architecture>_<hash>.safetensors`;
`<architecture>:<hash>` is its identity, which the index records as its frame pooling.
"""

from __future__ import annotations

import hashlib
import math
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ModelLoadError, UsageError
from ..core.files import read_tensors, tensors_bytes, write_atomically
from ..core.types import TEMPORAL_ARCHITECTURES


def _sinusoids(length: int, width: int) -> torch.Tensor:
    """(length, width) position codes: what lets attention, blind to order, tell first from last."""
    angles = torch.arange(length)[:, None] * torch.exp(torch.arange(0, width, 2) * (-math.log(1e4) / width))
    codes = torch.zeros(length, width)
    codes[:, 0::2] = torch.sin(angles)
    codes[:, 1::2] = torch.cos(angles[:, :width // 2])
    return codes


def padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame sequences zero-padded to the longest, and their lengths: a TemporalEncoder's input."""
    lengths = torch.tensor([len(s) for s in sequences])
    return nn.utils.rnn.pad_sequence(sequences, batch_first=True), lengths


class TemporalEncoder(nn.Module):
    """Frame vectors (B, T, d) -> unit vectors (B, d), reading frame order: a bidirectional LSTM
    ("bilstm") or a small transformer with sinusoidal positions ("transformer"), projected back to
    d and averaged over each sequence's frames."""

    def __init__(self, dim: int, architecture: str = "bilstm", width: int = 64, layers: int = 1):
        super().__init__()
        if architecture not in TEMPORAL_ARCHITECTURES:
            raise UsageError(f"unknown temporal encoder {architecture!r}: choose one of "
                             f"{', '.join(TEMPORAL_ARCHITECTURES)}")
        self.architecture = architecture
        self.width, self.layers = width, layers
        if architecture == "bilstm":
            self.lstm = nn.LSTM(dim, width, num_layers=layers, batch_first=True, bidirectional=True)
            self.out = nn.Linear(2 * width, dim)
        else:
            self.embed = nn.Linear(dim, width)
            layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                               batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.out = nn.Linear(width, dim)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.to(frames.device)
        present = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]  # (B, T)
        if self.architecture == "bilstm":
            packed = nn.utils.rnn.pack_padded_sequence(frames, lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            states, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                                         total_length=frames.shape[1])
        else:
            codes = _sinusoids(frames.shape[1], self.embed.out_features).to(frames.device)
            states = self.transformer(self.embed(frames) + codes, src_key_padding_mask=~present)
        pooled = (self.out(states) * present[..., None]).sum(dim=1) / lengths[:, None]
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def encode(self, sequences: list[np.ndarray]) -> np.ndarray:
        """Unit vectors (N, d) of frame sequences, each (T_i, d)."""
        frames, lengths = padded([torch.from_numpy(np.ascontiguousarray(s, np.float32)) for s in sequences])
        return self(frames, lengths).numpy()


def save_temporal(model: TemporalEncoder, folder: Path) -> str:
    """Write a trained encoder into an index folder under a name of its own; returns its identity."""
    data = tensors_bytes(model.state_dict(), {"kind": model.architecture, "dim": str(model.out.out_features),
                                              "width": str(model.width), "layers": str(model.layers)})
    identity = f"{model.architecture}:{hashlib.sha256(data).hexdigest()[:16]}"
    write_atomically(folder / _file_name(identity), data)
    return identity


@cache
def load_temporal(folder: Path, identity: str) -> TemporalEncoder:
    """The trained encoder an index records, from its folder (read once per process)."""
    path = folder / _file_name(identity)
    try:
        state, meta = read_tensors(path)
        model = TemporalEncoder(int(meta["dim"]), meta["kind"], int(meta["width"]), int(meta["layers"]))
        model.load_state_dict(state)
    except (OSError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"index {folder}: its temporal encoder {path.name} cannot be read "
                             f"({error}); train it again with retrieve train-temporal") from None
    return model.eval()


def _file_name(identity: str) -> str:
    architecture, digest = identity.split(":", 1)
    return f"temporal_{architecture}_{digest}.safetensors"
