"""What embeds audio: our own trained tower or a CLAP model, behind one interface; and loading
the one an index records."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from .spec import CLAP_PREFIX


class AudioEncoder(Protocol):
    """What embeds audio: our own trained tower or a CLAP model."""

    identity: str  # recorded by an index, e.g. "tower:<sha>" or "clap:laion/clap-htsat-unfused"
    sample_rate: int  # the rate waves must be given at
    dim: int

    def encode_audio(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Embed mono float32 waves at `sample_rate`: float32 (N, dim), L2-normalised rows."""


def is_clap(identity: str | None) -> bool:
    """Whether an audio model identity names a CLAP model (whose vectors live in a space of
    their own) rather than our tower (in the CLIP model's space)."""
    return (identity or "").startswith(CLAP_PREFIX)


def load_audio_encoder(identity: str, folder: Path, device: str = "auto",
                       batch_size: int = 32) -> AudioEncoder:
    """The audio encoder an index records: a CLAP model by name or folder, or our tower from
    the index `folder`. torch (and transformers) are imported only here."""
    if is_clap(identity):
        from .clap import load_clap

        return load_clap(identity, device)
    from .audio_tower import load_tower
    from .clip import resolve_device

    return load_tower(folder, identity, resolve_device(device), batch_size)
