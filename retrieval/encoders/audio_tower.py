"""Our own audio tower: log-mel spectrogram into a small CNN, projected into the CLIP space.

It is trained (see `audio_training`) to land each sound next to the CLIP vector of its
paired image or caption, so audio sits in the same space as the index's images and texts and
every direction (text, image, audio <-> audio) works through one FAISS search.

The tower lives in the index folder as `audio_tower_<hash>.safetensors` (weights, with its
shape in the file's metadata); `tower:<hash>` is its identity, which the index records beside
the audio vectors it made.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.errors import ModelLoadError
from ..core.files import read_tensors, tensors_bytes, write_atomically

TOWER_PREFIX = "tower:"


@dataclass(frozen=True)
class AudioTowerConfig:
    embed_dim: int
    sample_rate: int = 16000
    n_fft: int = 512       # 32 ms at 16 kHz
    hop: int = 160         # 10 ms frames
    n_mels: int = 64
    channels: tuple[int, ...] = (32, 64, 128)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular filters evenly spaced on the HTK mel scale, shape (n_mels, n_fft // 2 + 1)."""
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)

    def to_hz(mel):
        return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)

    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(to_mel(20.0), to_mel(sample_rate / 2), n_mels + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    return np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)


class LogMel(nn.Module):
    """Waves (B, T) -> log-mel spectrograms (B, n_mels, frames), scaled per clip.

    Each clip's spectrogram is standardised by its own mean and spread, so loudness does not
    change the vector, while the shape across frequencies (pitch, timbre) is kept.
    """

    def __init__(self, config: AudioTowerConfig) -> None:
        super().__init__()
        self.n_fft, self.hop = config.n_fft, config.hop
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)
        filters = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels)
        self.register_buffer("filters", torch.from_numpy(filters), persistent=False)

    def forward(self, waves: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        spectrum = torch.stft(waves, self.n_fft, self.hop, window=self.window, return_complex=True)
        mel = torch.log(self.filters @ spectrum.abs().pow(2) + 1e-6)
        valid = _frame_mask(frames, mel.shape[-1])[:, None, :]
        count = valid.sum(dim=(1, 2), keepdim=True) * mel.shape[1]
        mean = (mel * valid).sum(dim=(1, 2), keepdim=True) / count
        spread = (((mel - mean) * valid).pow(2).sum(dim=(1, 2), keepdim=True) / count).sqrt()
        return (mel - mean) / (spread + 1e-5) * valid


class AudioTower(nn.Module):
    """Log-mel front end, conv blocks halving time and frequency, pooled over valid frames."""

    def __init__(self, config: AudioTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.front = LogMel(config)
        blocks, width = [], 1
        for channels in config.channels:
            blocks += [nn.Conv2d(width, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.GELU(),
                       nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                       nn.GELU(), nn.AvgPool2d(2)]
            width = channels
        self.blocks = nn.Sequential(*blocks)
        # Mean and max over time: mean keeps steady sounds, max keeps short events.
        self.projection = nn.Linear(2 * width, config.embed_dim)
        # every pooling halves time: shorter waves are zero-padded up to a frame per block
        self.min_samples = config.hop * 2 ** len(config.channels) + config.n_fft

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of a padded batch; `lengths` are the samples of each wave."""
        frames = lengths // self.config.hop + 1
        features = self.blocks(self.front(waves, frames)[:, None]).mean(dim=2)  # (B, C, T')
        shrink = 2 ** len(self.config.channels)
        valid = _frame_mask((frames + shrink - 1) // shrink, features.shape[-1])[:, None, :]
        mean = (features * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        peak = features.masked_fill(~valid, -math.inf).amax(-1)
        return self.projection(torch.cat([mean, peak], dim=1))


def _frame_mask(frames: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=frames.device)[None, :] < frames.clamp(min=1)[:, None]


def padded_batch(waves: Sequence[np.ndarray], min_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Waves zero-padded to the longest (at least `min_samples`), and their true lengths."""
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.zeros(len(waves), max(int(lengths.max()), min_samples))
    for row, wave in enumerate(waves):
        batch[row, :len(wave)] = torch.from_numpy(np.asarray(wave, dtype=np.float32))
    return batch, lengths


class AudioTowerEncoder:
    """The trained tower behind the `AudioEncoder` interface: waves in, unit vectors out."""

    def __init__(self, tower: AudioTower, identity: str, device: str = "cpu",
                 batch_size: int = 32) -> None:
        self.tower = tower.eval().to(device)
        self.identity = identity
        self.sample_rate = tower.config.sample_rate
        self.dim = tower.config.embed_dim
        self.device = device
        self.batch_size = batch_size

    @torch.inference_mode()
    def encode_audio(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Embed mono waves at `sample_rate`.

        Only waves of equal length share a batch: padding would reach the last frames through
        the convolutions, and a sound must get the same vector whatever it is batched with
        (as a query, it is encoded alone). A long file's windows all have one length anyway.
        """
        by_length: dict[int, list[int]] = {}
        for position, wave in enumerate(waves):
            by_length.setdefault(len(wave), []).append(position)
        vectors = np.zeros((len(waves), self.dim), np.float32)
        for positions in by_length.values():
            for start in range(0, len(positions), self.batch_size):
                chosen = positions[start:start + self.batch_size]
                batch, lengths = padded_batch([waves[i] for i in chosen], self.tower.min_samples)
                features = self.tower(batch.to(self.device), lengths.to(self.device))
                vectors[chosen] = nn.functional.normalize(features.float(), dim=-1).cpu().numpy()
        return vectors


def save_tower(tower: AudioTower, folder: Path) -> str:
    """Write the tower into an index folder under a name of its own; returns its identity.

    A new tower never overwrites the one the index's audio vectors were made with, so a
    training run killed before the index records the new identity leaves the old one usable.
    """
    data = tensors_bytes(tower.state_dict(), {"config": json.dumps(asdict(tower.config))})
    identity = TOWER_PREFIX + hashlib.sha256(data).hexdigest()[:16]
    write_atomically(tower_path(folder, identity), data)
    return identity


def tower_path(folder: Path, identity: str) -> Path:
    return folder / f"audio_tower_{identity.removeprefix(TOWER_PREFIX)}.safetensors"


def remove_other_towers(folder: Path, keep: str | None) -> None:
    """Delete towers no audio vector was made with (after a newer one is recorded)."""
    for path in folder.glob("audio_tower_*.safetensors"):
        if keep is None or path != tower_path(folder, keep):
            path.unlink(missing_ok=True)


def load_tower(folder: Path, identity: str, device: str = "cpu",
               batch_size: int = 32) -> AudioTowerEncoder:
    """The tower an index recorded, from its folder."""
    path = tower_path(folder, identity)
    try:
        state, metadata = read_tensors(path)
        config = json.loads(metadata["config"])
        config["channels"] = tuple(config["channels"])
        tower = AudioTower(AudioTowerConfig(**config))
        tower.load_state_dict(state)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        raise ModelLoadError(
            f"index {folder}: its audio tower {path.name} cannot be read "
            f"({str(error).splitlines()[0][:160] if str(error) else type(error).__name__}); "
            f"train it again with: retrieve train-audio PAIRS --index {folder}") from None
    return AudioTowerEncoder(tower, identity, device, batch_size)
