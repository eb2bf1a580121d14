"""What the engine's trainers share: the symmetric InfoNCE loss over soft positives, one
optimiser step that keeps the learnt temperature within CLIP's bound, the held-out split, and
the loop over epochs and batches that reports each epoch the same way."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..core.errors import UsageError

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


@dataclass
class EpochReport:
    epoch: int
    loss: float
    recall_at_1: float  # on the held-out examples


@dataclass
class FitReport:
    examples: int = 0
    held_out: int = 0
    epochs: list[EpochReport] = field(default_factory=list)
    seconds: float = 0.0


def split_examples(count: int, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) example numbers, drawn from the seed."""
    if not 0 <= held_out < 1:
        raise UsageError(f"held_out is a fraction from 0 to below 1, not {held_out}")
    held = round(count * held_out)
    if count - held < 2:
        raise UsageError(f"training needs at least 2 examples besides the {held} held out, found {count}")
    order = np.random.default_rng(seed).permutation(count)
    return order[held:], order[:held]


def shuffled_batches(examples: np.ndarray, size: int, generator: np.random.Generator
                     ) -> Iterator[np.ndarray]:
    """The examples shuffled into batches; a last batch of one is dropped (nothing to contrast)."""
    order = generator.permutation(examples)
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        if len(batch) > 1:  # one example has no negatives to learn from
            yield batch


def fit(model: nn.Module, loss_of: Callable[[np.ndarray, torch.Tensor], torch.Tensor],
        recall_of: Callable[[], float], train: np.ndarray, held_out: int, options, name: str
        ) -> FitReport:
    """AdamW with a one-cycle schedule and a learnt temperature; held-out R@1 after each epoch."""
    started = time.perf_counter()
    report = FitReport(len(train) + held_out, held_out)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    optimizer = torch.optim.AdamW([*model.parameters(), logit_scale], lr=options.learning_rate,
                                  weight_decay=1e-4)
    steps = options.epochs * math.ceil(len(train) / options.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, options.learning_rate, total_steps=steps,
                                                   pct_start=0.1)
    generator = np.random.default_rng(options.seed)
    for epoch in tqdm(range(1, options.epochs + 1), unit="epoch", desc=name, disable=not options.progress):
        model.train()
        losses = []
        for batch in shuffled_batches(train, options.batch_size, generator):
            losses.append(optimise(loss_of(batch, logit_scale.exp()), optimizer, schedule, logit_scale))
        model.eval()
        with torch.no_grad():
            recall = recall_of() if held_out else 0.0
        report.epochs.append(EpochReport(epoch, float(np.mean(losses)), recall))
    report.seconds = time.perf_counter() - started
    return report
