"""The one place the benchmark names the engine's modules.

Sections import the engine's names from here, never from `retrieval` themselves, and every name
here is the package's public API (`from retrieval import ...`), never a module inside it. Names
are looked up on first use, so a child process that needs one small module (the on-disk probe)
does not import torch with it.
"""

from __future__ import annotations

import importlib
from typing import Any

# Only the package's public API: every name here is exported by `retrieval` itself.
_NAMES = ("AudioTrainingOptions", "CAPTION_FILE_NAMES", "CaptionOptions", "Captioner", "ClipEncoder",
          "INDEX_TYPES", "Index", "MEMORY_INDEX_TYPES", "ModelSpec", "NewItem", "OnnxImageEncoder",
          "OnnxTextEncoder", "OnDiskIndex", "SearchKnobs", "Store", "VectorIndex",
          "build_on_disk", "connect_ray", "connected_groups", "default_workers", "export_towers",
          "load_captioner", "load_encoder", "load_image", "load_text_tower", "prefetch_map", "read_items",
          "score_captions", "similar_pairs", "walk_sources")

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module("retrieval"), name)
    globals()[name] = value  # looked up once
    return value
