"""The one place the benchmark names the engine's modules.

Sections import the engine's names from here, never from `retrieval.*` themselves, so when the
package's modules move only the table below changes. Names are looked up on first use, so a
child process that needs one small module (the on-disk probe) does not import torch with it.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute there). Top-level `retrieval` names are its public API; the rest
# are the deeper modules the benchmark measures directly.
_WHERE: dict[str, tuple[str, str]] = {
    **{name: ("retrieval", name) for name in ("ClipEncoder", "Index", "ModelSpec", "load_encoder")},
    "AudioTrainingOptions": ("retrieval.audio_training", "AudioTrainingOptions"),
    "CAPTION_FILE_NAMES": ("retrieval.captions", "CAPTION_FILE_NAMES"),
    "read_items": ("retrieval.corpus", "read_items"),
    "walk_sources": ("retrieval.corpus", "walk_sources"),
    "load_image": ("retrieval.images", "load_image"),
    "OnDiskIndex": ("retrieval.ondisk", "OnDiskIndex"),
    "build_on_disk": ("retrieval.ondisk", "build_on_disk"),
    "default_workers": ("retrieval.pipeline", "default_workers"),
    "prefetch_map": ("retrieval.pipeline", "prefetch_map"),
    "Store": ("retrieval.store", "Store"),
    "NumpyTextEncoder": ("retrieval.text_tower", "NumpyTextEncoder"),
    "export_text_tower": ("retrieval.text_tower", "export_text_tower"),
    "load_text_tower": ("retrieval.text_tower", "load_text_tower"),
    "MEMORY_KINDS": ("retrieval.vectors", "MEMORY_KINDS"),
    "SearchKnobs": ("retrieval.vectors", "SearchKnobs"),
    "VectorIndex": ("retrieval.vectors", "VectorIndex"),
    "connect_ray": ("retrieval.distributed", "connect"),
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _WHERE[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # looked up once
    return value
