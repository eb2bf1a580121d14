"""Tiny versions of the candidate default models' architectures, as `local-dir:` models with
seeded random weights: the real configs shrunk (MobileCLIP's re-parameterisable FastViT image
tower at 64 px with a small text tower; a SigLIP 2-style model with a small timm ViT and a
Hugging Face tokenizer of its own), so every loading route can be tested on them in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from support.tiny_model import CONFIG_NAME, TINY_PREPROCESS_CFG, WEIGHTS_NAME

SMALL_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}

FAMILY_CONFIGS: dict[str, dict] = {
    # MobileCLIP2-S0's image tower itself (timm's fastvit_mci0), at 64 px.
    "mobileclip": {
        "embed_dim": 32, "custom_text": True,
        "vision_cfg": {"timm_model_name": "fastvit_mci0", "timm_model_pretrained": False,
                       "timm_pool": "avg", "timm_proj": None, "image_size": 64},
        "text_cfg": {**SMALL_TEXT, "no_causal_mask": True},
    },
    # ViT-B-16-SigLIP2's layout (attention-pooled timm ViT, last-token text pooling, an HF
    # tokenizer) at the size of timm's smallest ViT, with a tokenizer of a dozen words.
    "siglip2": {
        # embed_dim is the ViT's width: SigLIP's image side has no projection.
        "embed_dim": 192, "init_logit_bias": -10, "custom_text": True,
        "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 64, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP2",
                     "tokenizer_kwargs": {"clean": "canonicalize"}, "width": 64, "heads": 2,
                     "layers": 2, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                     "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}},
    },
}
WORDS = ["<pad>", "<unk>", "<eos>", "a", "dog", "cat", "in", "the", "park", "red", "circle", "on"]


def write_family_config(out_dir: Path, family: str) -> str:
    """open_clip_config.json of a tiny `family` model in `out_dir`: its `local-dir:` spec."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    preprocess = {**TINY_PREPROCESS_CFG, "size": FAMILY_CONFIGS[family]["vision_cfg"]["image_size"]}
    (out_dir / CONFIG_NAME).write_text(json.dumps(
        {"model_cfg": FAMILY_CONFIGS[family], "preprocess_cfg": preprocess}))
    return f"local-dir:{out_dir}"


def write_tokenizer(out_dir: Path) -> None:
    """A word-level Hugging Face tokenizer of WORDS, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({word: n for n, word in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                            eos_token="<eos>").save_pretrained(str(out_dir))


def write_family_model(out_dir: Path, family: str, seed: int = 0, tokenizer: bool = True) -> str:
    """A tiny `family` model with seeded random weights (as trained: nothing folded), and for a
    family with a Hugging Face tokenizer its files unless `tokenizer` is False: its spec."""
    spec = write_family_config(out_dir, family)
    torch.manual_seed(seed)
    model = open_clip.create_model(spec, load_weights=False)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(Path(out_dir) / WEIGHTS_NAME))
    if tokenizer and "hf_tokenizer_name" in FAMILY_CONFIGS[family]["text_cfg"]:
        write_tokenizer(Path(out_dir))
    return spec


def unfolded_model(spec: str) -> torch.nn.Module:
    """The model as open_clip builds it, in eval mode and not re-parameterised."""
    return open_clip.create_model(spec).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
