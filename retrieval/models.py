"""Model identity: which open_clip model an index uses, without importing torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CLAP_PREFIX = "clap:"  # an audio model from LAION-CLAP, as `clap:NAME` or `clap:/folder`
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: an open_clip name (or `local-dir:`/`hf-hub:` reference) and weights.

    `pretrained` is a tag such as `laion2b_s34b_b79k` or a checkpoint file; it is ignored
    for `local-dir:` and `hf-hub:` models, which carry their own weights.
    """

    name: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED

    @classmethod
    def parse(cls, name: str | None = None, pretrained: str | None = None) -> ModelSpec:
        """Normalise user input: local paths become absolute so the identity survives a `cd`."""
        name = name or DEFAULT_MODEL
        if name.startswith(LOCAL_DIR):
            path = Path(name[len(LOCAL_DIR):]).expanduser().resolve()
            return cls(f"{LOCAL_DIR}{path}", None)
        if name.startswith(HF_HUB):
            return cls(name, None)
        if pretrained is None and name == DEFAULT_MODEL:
            pretrained = DEFAULT_PRETRAINED
        if pretrained and looks_like_path(pretrained):
            pretrained = str(Path(pretrained).expanduser().resolve())
        return cls(name, pretrained or None)

    @property
    def identity(self) -> str:
        """A stable string an index records to refuse vectors from any other model."""
        return f"{self.name}@{self.pretrained}" if self.pretrained else self.name

    def __str__(self) -> str:
        return self.identity


def looks_like_path(value: str) -> bool:
    """A `pretrained` value that names a checkpoint file rather than a tag."""
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).expanduser().exists()
