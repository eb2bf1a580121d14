"""What the engine's trainers share: the symmetric InfoNCE loss over soft positives, and one
optimiser step that keeps the learnt temperature within CLIP's bound."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100)  # open_clip training's cap on the learnt temperature


def symmetric_info_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy both ways of a square logits matrix against row-normalised positives.

    `positives` must be symmetric (a pair is positive for the other exactly when the other is
    for it), so its row-normalised form serves as the target in both directions.
    """
    targets = positives / positives.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def optimise(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule,
             logit_scale: torch.Tensor) -> float:
    """Back-propagate `loss`, step the optimiser and its schedule, clamp the temperature."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()
    with torch.no_grad():
        logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.detach().item()
