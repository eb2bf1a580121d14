"""Test support: a tiny open_clip CoCa trained in seconds to caption the synthetic renders of
support.tiny_model ("a red circle", "a blue square", ...), written in local-dir form.

Its vision tower is the trained tiny CLIP's, kept frozen (same architecture, plus CoCa's
attentional pooler): learning to see shapes is what takes the tiny CLIP its seconds, so the
CoCa learns only to pool, to read captions and to write them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from retrieval.encoders.captioner import coca_loss
from support.tiny_model import CLASSES, TINY_MODEL_CFG, caption_for, create_tiny_clip, render_batch

WIDTH = 64  # CoCa's image tokens, text tower and decoder share one width
CONTEXT = 12  # tokens per caption with start and end: the renders' captions take 5
TINY_COCA_CFG: dict = {
    "embed_dim": WIDTH,
    "vision_cfg": {**TINY_MODEL_CFG["vision_cfg"], "attentional_pool": True, "attn_pooler_queries": 8,
                   "attn_pooler_heads": 2, "output_tokens": True},
    # vocab_size must match open_clip's default SimpleTokenizer (49408 BPE tokens).
    "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": WIDTH, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": WIDTH, "heads": 2,
                       "layers": 1, "attn_pooler_heads": 2},
    "custom_text": True,
}


def create_tiny_coca(seed: int = 0, model_cfg: dict = TINY_COCA_CFG
                     ) -> tuple[torch.nn.Module, Callable, Callable]:
    """Seeded, untrained tiny CoCa (TINY_COCA_CFG, or `model_cfg`), its val preprocess and tokenizer."""
    model, preprocess, tokenizer = create_tiny_clip(seed, model_cfg)
    # open_clip leaves the decoder's vocabulary projection uninitialised (torch.empty): whatever
    # the memory held, NaN included, unless it is drawn here too.
    seeded = torch.Generator().manual_seed(seed)
    torch.nn.init.normal_(model.text_decoder.text_projection, std=0.5, generator=seeded)
    return model, preprocess, tokenizer


def with_context(context: int) -> dict:
    """TINY_COCA_CFG with room for captions of `context` tokens, start and end included."""
    return {**TINY_COCA_CFG, "text_cfg": {**TINY_COCA_CFG["text_cfg"], "context_length": context},
            "multimodal_cfg": {**TINY_COCA_CFG["multimodal_cfg"], "context_length": context}}


def train_tiny_coca(clip_visual: torch.nn.Module, seed: int = 0, steps: int = 120, pool_per_class: int = 64,
                    lr: float = 3e-3, projection_lr: float = 3e-2,
                    describe: Callable[[str, str], str] = caption_for) -> torch.nn.Module:
    """Train a tiny CoCa with `coca_loss` on top of a trained tiny CLIP's vision tower.

    Each batch holds one render of every class, so no two pairs share a caption and the
    contrastive part has a single positive per row, as `coca_loss` assumes. `describe` writes
    each class's caption (caption_for: "a red circle").
    """
    model, preprocess, tokenizer = create_tiny_coca(seed)
    # Everything but the projection, whose shape differs (CoCa's pooler works at the text width).
    seen = {name: weight for name, weight in clip_visual.state_dict().items() if name != "proj"}
    model.visual.load_state_dict(seen, strict=False)
    for name, parameter in model.visual.named_parameters():
        # ln_post normalises the pooler's output in CoCa, not the class token as in CLIP: it learns.
        parameter.requires_grad_(name not in seen or name.startswith("ln_post"))
    # As for the tiny CLIP: the 49408-row token table's dense update would dominate every step.
    model.text.token_embedding.requires_grad_(False)
    pool, pool_labels = render_batch(pool_per_class, np.random.default_rng(seed), preprocess)
    class_tokens = tokenizer([describe(color, shape) for color, shape in CLASSES])
    generator = torch.Generator().manual_seed(seed)
    # open_clip leaves the decoder's vocabulary projection uninitialised (torch.empty): start it
    # at zero, and let it learn faster than the rest, or most of the run goes to learning which
    # five of the 49408 tokens captions use at all.
    projection = model.text_decoder.text_projection
    torch.nn.init.zeros_(projection)
    rest = [p for p in model.parameters() if p.requires_grad and p is not projection]
    optimizer = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": [projection], "lr": projection_lr}],
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[lr, projection_lr], total_steps=steps,
                                                   pct_start=0.1)
    model.train()
    for _ in range(steps):
        chosen = torch.randint(pool_per_class, (len(CLASSES),), generator=generator)
        chosen += torch.arange(len(CLASSES)) * pool_per_class
        loss = coca_loss(model, pool[chosen], class_tokens[pool_labels[chosen]]).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()
