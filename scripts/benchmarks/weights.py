"""Models with seeded random weights, written where the engine and the peers load them from.

Speed does not depend on weight values, so every figure is measured on random weights and
nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

DEFAULT_PREPROCESS = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}


def random_model(name: str, seed: int) -> torch.nn.Module:
    """The open_clip architecture `name` with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return open_clip.create_model(name)


def write_random_model(name: str, folder: Path, seed: int, tag: str | None = None) -> str:
    """open_clip model `name` with seeded random weights as a `local-dir:` model; returns its spec.

    The preprocessing recorded is that of the pretrained `tag` (open_clip's own record of it),
    or CLIP's usual one without a tag.
    """
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(name)
    preprocess = dict(DEFAULT_PREPROCESS)
    if tag:
        known = open_clip.get_pretrained_cfg(name, tag)
        preprocess.update({key: list(value) if isinstance(value, tuple) else value
                           for key, value in known.items() if key in DEFAULT_PREPROCESS})
    config = {"model_cfg": model_cfg,
              "preprocess_cfg": {"size": model_cfg["vision_cfg"]["image_size"], **preprocess}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    model = random_model(name, seed)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def write_random_checkpoint(name: str, path: Path, seed: int) -> Path:
    """The same seeded random weights as a plain state-dict file, which any open_clip version
    loads as `pretrained=PATH` (the peers' way in)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_model(name, seed).state_dict(), path)
    return path
