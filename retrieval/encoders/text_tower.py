"""CLIP's text tower in numpy, so a text query needs neither torch nor open_clip.

Importing torch and open_clip costs seconds before a single token is encoded; a text query
through this module costs a fraction of one. When an index's model has the standard CLIP
text tower (pre-norm causal transformer, GELU or QuickGELU, pooled at the end token) and
open_clip's BPE tokenizer, a writer exports the tower's weights into the index directory
(`text_tower.safetensors`) and readers answer text queries with them. The vectors equal the
torch model's (a test bounds the difference), including the trimming of padding.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.files import map_tensors, write_tensors
from .tokenizer import ClipTokenizer

if TYPE_CHECKING:
    from .clip import ClipEncoder

TOWER_FILE = "text_tower.safetensors"


@dataclass(frozen=True)
class TowerConfig:
    model: str  # the model identity the weights came from
    layers: int
    heads: int
    context_length: int
    activation: str  # "gelu" or "quick_gelu"
    pool: str  # "argmax", "eos" or "first"
    end_id: int
    eps: float


class NumpyTextEncoder:
    """The text half of a ClipEncoder (`encode_texts`, `dim`), computed with numpy."""

    def __init__(self, config: TowerConfig, weights: dict[str, np.ndarray]) -> None:
        self.config = config
        self.weights = weights
        self.tokenizer = ClipTokenizer(context_length=config.context_length)
        self.dim = int(weights["projection"].shape[1])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one per text."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        tokens = self.tokenizer(list(texts))
        length = int(np.flatnonzero(tokens.any(axis=0)).max()) + 1  # padding changes nothing
        tokens = tokens[:, :length]
        w = self.weights
        x = w["token_embedding"][tokens] + w["positional_embedding"][:length]
        mask = np.triu(np.full((length, length), -np.inf, np.float32), k=1)
        for layer in range(self.config.layers):
            x = x + self._attention(self._norm(x, f"{layer}.ln_1"), layer, mask)
            x = x + self._mlp(self._norm(x, f"{layer}.ln_2"), layer)
        x = self._norm(x, "ln_final")
        pooled = x[np.arange(len(tokens)), self._pool_positions(tokens)]
        features = pooled @ w["projection"]
        return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)

    def _pool_positions(self, tokens: np.ndarray) -> np.ndarray:
        if self.config.pool == "first":
            return np.zeros(len(tokens), dtype=np.int64)
        if self.config.pool == "eos":
            return (tokens == self.config.end_id).argmax(axis=1)
        return tokens.argmax(axis=1)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        scaled = (x - mean) / np.sqrt(variance + self.config.eps)
        return scaled * self.weights[f"{name}.weight"] + self.weights[f"{name}.bias"]

    def _attention(self, x: np.ndarray, layer: int, mask: np.ndarray) -> np.ndarray:
        w, heads = self.weights, self.config.heads
        batch, length, width = x.shape
        qkv = x @ w[f"{layer}.in_proj"] + w[f"{layer}.in_proj_bias"]
        qkv = qkv.reshape(batch, length, 3, heads, width // heads).transpose(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        scores = query @ key.transpose(0, 1, 3, 2) / math.sqrt(width // heads) + mask
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        mixed = (scores @ value).transpose(0, 2, 1, 3).reshape(batch, length, width)
        return mixed @ w[f"{layer}.out_proj"] + w[f"{layer}.out_proj_bias"]

    def _mlp(self, x: np.ndarray, layer: int) -> np.ndarray:
        w = self.weights
        hidden = x @ w[f"{layer}.fc"] + w[f"{layer}.fc_bias"]
        if self.config.activation == "quick_gelu":
            hidden = hidden / (1.0 + np.exp(-1.702 * hidden))
        else:
            hidden = 0.5 * hidden * (1.0 + _erf(hidden / math.sqrt(2.0)))
        return hidden @ w[f"{layer}.proj"] + w[f"{layer}.proj_bias"]


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26, absolute error below 1.5e-7: below float32's resolution
    at GELU's scale, and numpy has no erf of its own."""
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
                                                        + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def load_text_tower(folder: Path, model_identity: str) -> NumpyTextEncoder | None:
    """The exported tower of this model in `folder`, or None when there is none."""
    path = folder / TOWER_FILE
    if not path.is_file():
        return None
    try:
        metadata, weights = map_tensors(path)  # a query reads only the token rows it uses
        config = TowerConfig(**json.loads(metadata["config"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None  # damaged or from another version: the torch model still answers
    return NumpyTextEncoder(config, weights) if config.model == model_identity else None


def export_text_tower(encoder: ClipEncoder, folder: Path) -> bool:
    """Write the encoder's text tower for numpy use; False when its architecture is not the
    standard one this module computes, or the disk will not take it."""
    config = _tower_config(encoder)
    if config is None:
        return False
    try:
        write_tensors(folder / TOWER_FILE, _tower_weights(encoder.model, config.layers),
                      {"config": json.dumps(asdict(config))})
    except OSError:  # a full disk costs the fast query path, not the build
        return False
    return True


def _tower_config(encoder: ClipEncoder) -> TowerConfig | None:
    import open_clip
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from open_clip.transformer import QuickGELU

    model, tokenizer = encoder.model, encoder.tokenizer
    if not isinstance(model, open_clip.CLIP) or not isinstance(tokenizer, SimpleTokenizer):
        return None
    if tokenizer.reduction_fn is not None or len(tokenizer.all_special_ids) != 2:
        return None
    if not isinstance(model.text_projection, torch.Tensor) or model.attn_mask is None:
        return None
    if model.text_pool_type not in ("argmax", "eos", "first"):
        return None
    blocks = list(model.transformer.resblocks)
    activations = {type(block.mlp.gelu) for block in blocks if hasattr(block, "mlp")}
    standard = all(
        isinstance(block.attn, torch.nn.MultiheadAttention)
        and isinstance(block.ls_1, torch.nn.Identity) and isinstance(block.ls_2, torch.nn.Identity)
        and isinstance(getattr(block, "ln_attn", torch.nn.Identity()), torch.nn.Identity)
        and [name for name, _ in block.mlp.named_children()] == ["c_fc", "gelu", "c_proj"]
        for block in blocks)
    gelu = activations == {torch.nn.GELU} and all(b.mlp.gelu.approximate == "none" for b in blocks)
    if not standard or not (gelu or activations == {QuickGELU}):
        return None
    return TowerConfig(
        model=encoder.spec.identity, layers=len(blocks), heads=blocks[0].attn.num_heads,
        context_length=tokenizer.context_length, activation="gelu" if gelu else "quick_gelu",
        pool=model.text_pool_type, end_id=tokenizer.eot_token_id, eps=model.ln_final.eps)


def _tower_weights(model, layers: int) -> dict[str, np.ndarray]:
    """Weights as float32 arrays, matrices transposed to multiply from the right."""
    def array(tensor) -> np.ndarray:
        return np.ascontiguousarray(tensor.detach().float().cpu().numpy())

    weights = {
        "token_embedding": array(model.token_embedding.weight),
        "positional_embedding": array(model.positional_embedding),
        "ln_final.weight": array(model.ln_final.weight),
        "ln_final.bias": array(model.ln_final.bias),
        "projection": array(model.text_projection),
    }
    for layer, block in zip(range(layers), model.transformer.resblocks):
        weights.update({
            f"{layer}.ln_1.weight": array(block.ln_1.weight), f"{layer}.ln_1.bias": array(block.ln_1.bias),
            f"{layer}.ln_2.weight": array(block.ln_2.weight), f"{layer}.ln_2.bias": array(block.ln_2.bias),
            f"{layer}.in_proj": array(block.attn.in_proj_weight.T),
            f"{layer}.in_proj_bias": array(block.attn.in_proj_bias),
            f"{layer}.out_proj": array(block.attn.out_proj.weight.T),
            f"{layer}.out_proj_bias": array(block.attn.out_proj.bias),
            f"{layer}.fc": array(block.mlp.c_fc.weight.T), f"{layer}.fc_bias": array(block.mlp.c_fc.bias),
            f"{layer}.proj": array(block.mlp.c_proj.weight.T),
            f"{layer}.proj_bias": array(block.mlp.c_proj.bias),
        })
    return weights
