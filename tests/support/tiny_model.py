"""Test support: a tiny open_clip CLIP, synthetic captioned renders, and a
fast from-scratch trainer, so retrieval tests run offline with real encoders
whose rankings are meaningful (no pretrained weights are ever downloaded)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from retrieval.encoders.clip import encode_trimmed_tokens

TINY_MODEL_CFG: dict = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 64, "head_width": 32},
    # vocab_size must match open_clip's default SimpleTokenizer (49408 BPE tokens).
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# open_clip keeps only PreprocessCfg fields and then overwrites `size` with the
# vision tower's image_size, so `size` here is informational but kept in sync.
TINY_PREPROCESS_CFG: dict = {
    "size": 32,
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CLASSES: list[tuple[str, str]] = [(c, s) for c in COLORS for s in SHAPES]

CONFIG_NAME = "open_clip_config.json"
# First name in open_clip's preferred checkpoint order for local-dir models.
WEIGHTS_NAME = "open_clip_model.safetensors"


def caption_for(color: str, shape: str) -> str:
    """Caption used for a (color, shape) class, e.g. "a red circle"."""
    return f"a {color} {shape}"


def _write_config(out_dir: Path, model_cfg: dict) -> str:
    """Write open_clip_config.json into out_dir; return its local-dir spec."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": TINY_PREPROCESS_CFG}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return f"local-dir:{out_dir}"


def create_tiny_clip(seed: int = 0, model_cfg: dict = TINY_MODEL_CFG
                     ) -> tuple[torch.nn.Module, Callable, Callable]:
    """Seeded, untrained tiny CLIP (or another `model_cfg`) with its val preprocess and tokenizer.

    Built through the same local-dir path used for reloading, so the
    architecture and transforms match a written-and-reloaded model exactly.
    """
    with tempfile.TemporaryDirectory() as tmp:
        spec = _write_config(Path(tmp), model_cfg)
        torch.manual_seed(seed)
        # load_weights=False: random init even if a checkpoint were present.
        model, _, preprocess = open_clip.create_model_and_transforms(spec, load_weights=False)
        tokenizer = open_clip.get_tokenizer(spec)
    return model, preprocess, tokenizer


def write_local_dir_model(out_dir: Path, model: torch.nn.Module | None = None, seed: int = 0,
                          model_cfg: dict = TINY_MODEL_CFG) -> str:
    """Write config + safetensors weights loadable as "local-dir:<abs path>".

    Uses `model`'s weights (built from `model_cfg`), or a freshly seeded untrained one if None.
    Returns the model spec string for open_clip.create_model / get_tokenizer.
    """
    if model is None:
        model, _, _ = create_tiny_clip(seed, model_cfg)
    spec = _write_config(Path(out_dir), model_cfg)
    # safetensors rejects non-contiguous or shared-storage tensors; clone all.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(Path(spec.removeprefix("local-dir:")) / WEIGHTS_NAME))
    return spec


def render_shape(color: str, shape: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Render a filled `color` `shape` at a random position and scale on a
    randomly tinted light/grey noisy background (RGB, size x size)."""
    # Background: grey level plus per-channel tint, kept light enough that all
    # three shape colours contrast with it.
    bg = rng.uniform(150, 235) + rng.uniform(-20, 20, size=3)
    pixels = np.broadcast_to(bg, (size, size, 3)).copy()
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    half = rng.uniform(0.18, 0.32) * size  # half-extent of the shape
    cx, cy = rng.uniform(half, size - half, size=2)
    fill = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLORS[color])
    box = (cx - half, cy - half, cx + half, cy + half)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")

    # Noise after drawing so the shape interior is not perfectly flat either.
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def render_batch(per_class: int, rng: np.random.Generator, preprocess: Callable
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed renders, `per_class` of each class, and their class labels."""
    labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
    images = torch.stack([preprocess(render_shape(*CLASSES[i], rng)) for i in labels.tolist()])
    return images, labels


def _class_tokens(tokenizer: Callable) -> torch.Tensor:
    """Token ids of the 9 class captions, in CLASSES order, cut after the longest one's end:
    the tower is causal, so the padding after it changes nothing but the cost (8 positions
    instead of 77)."""
    tokens = tokenizer([caption_for(c, s) for c, s in CLASSES])
    return tokens[:, :int(tokens.any(dim=0).nonzero().max()) + 1]


def _class_text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """L2-normalised text embeddings of `_class_tokens`."""
    return F.normalize(encode_trimmed_tokens(model, tokens), dim=-1)


def _random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each (N, C, H, W) image left-right with probability 1/2.

    The render distribution is itself left-right symmetric (uniform positions,
    upright triangles), so this doubles the pool without shifting the
    distribution; vertical flips/transposes would create unseen inverted or
    sideways triangles and measurably slowed learning.
    """
    flip = torch.rand(len(images), 1, 1, 1, generator=generator) < 0.5
    return torch.where(flip, images.flip(-1), images)


def train_tiny_clip(
    seed: int = 0,
    steps: int = 400,
    per_class: int = 8,
    pool_per_class: int = 256,
    lr: float = 3e-3,
) -> torch.nn.Module:
    """Train a tiny CLIP from scratch on synthetic renders; returns it in eval mode.

    Deterministic for a given seed (and torch thread count). Defaults take
    about 10 s on 2 CPU cores and give held-out R@1 of ~0.97-1.0.
    """
    model, preprocess, tokenizer = create_tiny_clip(seed)
    # Render and preprocess a fixed pool once: per-step rendering would
    # dominate the runtime, and 256 renders per class already generalise.
    pool, pool_labels = render_batch(pool_per_class, np.random.default_rng(seed), preprocess)
    generator = torch.Generator().manual_seed(seed)
    # Freeze the 49408-row token table: only ~6 caption tokens are ever used,
    # yet its dense gradient and Adam update were ~half of every step. The text
    # transformer learns on top of the (distinct) random token vectors.
    model.token_embedding.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)

    tokens = _class_tokens(tokenizer)
    model.train()
    for _ in range(steps):
        # Balanced batch: per_class random pool images of every class.
        offsets = torch.randint(pool_per_class, (len(CLASSES), per_class), generator=generator)
        idx = (offsets + torch.arange(len(CLASSES))[:, None] * pool_per_class).flatten()
        images, labels = _random_hflip(pool[idx], generator), pool_labels[idx]

        image_features = F.normalize(model.encode_image(images), dim=-1)
        logits = model.logit_scale.exp() * image_features @ _class_text_features(model, tokens).T  # (B, 9)
        # Image side: each image against the 9 captions. Text side: each caption
        # against the batch, with all images of its class as positives (uniform
        # soft target), because a batch holds many images per caption.
        image_loss = F.cross_entropy(logits, labels)
        positives = F.one_hot(labels, len(CLASSES)).T.float()  # (9, B)
        text_loss = F.cross_entropy(logits.T, positives / positives.sum(dim=1, keepdim=True))
        loss = (image_loss + text_loss) / 2

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # same cap as open_clip training
    return model.eval()


@torch.no_grad()
def evaluate_recall(
    model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, seed: int, per_class: int = 4
) -> tuple[float, float]:
    """(text->image R@1, image->text R@1) on renders drawn from `seed`.

    text->image: fraction of the 9 captions whose top-1 image is of their class.
    image->text: fraction of images whose top-1 caption is their own.
    """
    model.eval()
    images, labels = render_batch(per_class, np.random.default_rng(seed), preprocess)
    image_features = F.normalize(model.encode_image(images), dim=-1)
    captions = F.normalize(model.encode_text(tokenizer([caption_for(c, s) for c, s in CLASSES])), dim=-1)
    similarity = image_features @ captions.T  # (N, 9)
    text_to_image = (labels[similarity.argmax(dim=0)] == torch.arange(len(CLASSES))).float().mean().item()
    image_to_text = (similarity.argmax(dim=1) == labels).float().mean().item()
    return text_to_image, image_to_text
