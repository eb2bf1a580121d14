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
    """One epoch of any trainer: its mean training loss, its time, and recall on the held-out
    examples (never trained on), both as the headline R@1 and as every measure the trainer takes."""

    epoch: int
    loss: float         # mean over the epoch's batches
    recall_at_1: float  # held-out R@1 (0.0 when nothing is held out); CLIP's: text -> image
    seconds: float = 0.0
    held_out: dict = field(default_factory=dict)  # {"R@1": .., "R@5": ..}; CLIP's per direction


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


Generator = np.random.Generator | torch.Generator


def batch_count(examples: int, size: int) -> int:
    """How many batches `shuffled_batches` makes of this many examples."""
    return examples // size + (examples % size > 1)


def shuffled_batches(examples: np.ndarray, size: int, generator: Generator) -> Iterator[np.ndarray]:
    """The examples shuffled into batches; a last batch of one is dropped (nothing to contrast).
    A torch generator shuffles as torch.randperm does, so a run saved with its state resumes."""
    if isinstance(generator, torch.Generator):
        order = examples[torch.randperm(len(examples), generator=generator).numpy()]
    else:
        order = generator.permutation(examples)
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        if len(batch) > 1:  # one example has no negatives to learn from
            yield batch


@dataclass
class Optimisation:
    """What steps the weights: the optimiser, its learning-rate schedule, and the learnt
    temperature (a log scale) that the loss multiplies cosines by."""

    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    logit_scale: torch.Tensor

    @classmethod
    def one_cycle(cls, model: nn.Module, learning_rate: float, steps: int) -> Optimisation:
        """AdamW with a one-cycle schedule over `steps`, and a new temperature (CLIP's 1/0.07)."""
        logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        optimizer = torch.optim.AdamW([*model.parameters(), logit_scale], lr=learning_rate,
                                      weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=max(1, steps),
                                                       pct_start=0.1)
        return cls(optimizer, schedule, logit_scale)


def train_epochs(model: nn.Module, loss_of: Callable[[np.ndarray, torch.Tensor], torch.Tensor],
                 recall_of: Callable[[], dict], train: np.ndarray, held_out: int,
                 optimisation: Optimisation, generator: Generator, epochs: range, batch_size: int, *,
                 name: str, progress: bool = False, headline: Callable[[dict], float] | None = None,
                 train_mode: Callable[[nn.Module], None] | None = None,
                 after_epoch: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None) -> Iterator[EpochReport]:
    """The one training loop: each epoch, the `train` examples in shuffled batches, one optimiser
    step on each batch's `loss_of(batch, temperature)`; then, in eval mode, `recall_of()` on the
    held-out examples (skipped when none are), `after_epoch(epoch)` (e.g. saving), and a report,
    logged as one line. `headline` picks R@1 out of what `recall_of` measures."""
    headline = headline or (lambda measures: measures.get("R@1", 0.0))
    steps = len(epochs) * batch_count(len(train), batch_size)
    with tqdm(total=steps, unit="step", desc=name, disable=not progress) as bar:
        for epoch in epochs:
            started = time.perf_counter()
            (train_mode or nn.Module.train)(model)
            losses = []
            for batch in shuffled_batches(train, batch_size, generator):
                loss = loss_of(batch, optimisation.logit_scale.exp())
                losses.append(optimise(loss, optimisation.optimizer, optimisation.schedule,
                                       optimisation.logit_scale))
                bar.update()
            model.eval()
            with torch.no_grad():
                measures = recall_of() if held_out else {}
            if after_epoch is not None:
                after_epoch(epoch)
            report = EpochReport(epoch, float(np.mean(losses)) if losses else math.nan,
                                 headline(measures) if measures else 0.0, time.perf_counter() - started,
                                 measures)
            if log is not None:
                log(f"epoch {epoch}/{epochs[-1]}: loss {report.loss:.4f}, {recall_line(measures)} "
                    f"({report.seconds:.1f} s)")
            yield report


def recall_line(measures: dict) -> str:
    """Held-out recall in words: 'held-out R@1 0.950, R@5 1.000', per direction where measured so."""
    if not measures:
        return "no held-out examples"
    if all(isinstance(value, dict) for value in measures.values()):
        return "held-out R@1 " + ", ".join(f"{direction} {scores['R@1']:.3f}"
                                           for direction, scores in measures.items())
    return "held-out " + ", ".join(f"{name} {value:.3f}" for name, value in measures.items())


def fit(model: nn.Module, loss_of: Callable[[np.ndarray, torch.Tensor], torch.Tensor],
        recall_of: Callable[[], dict], train: np.ndarray, held_out: int, options, name: str, *,
        generator: np.random.Generator | None = None, log: Callable[[str], None] | None = None
        ) -> FitReport:
    """Train `model` and a temperature from scratch with AdamW on a one-cycle schedule for
    `options.epochs` (batch size, learning rate, seed and progress from `options` too)."""
    started = time.perf_counter()
    steps = options.epochs * batch_count(len(train), options.batch_size)
    optimisation = Optimisation.one_cycle(model, options.learning_rate, steps)
    generator = generator or np.random.default_rng(options.seed)
    report = FitReport(len(train) + held_out, held_out)
    report.epochs = list(train_epochs(model, loss_of, recall_of, train, held_out, optimisation, generator,
                                      range(1, options.epochs + 1), options.batch_size, name=name,
                                      progress=options.progress, log=log))
    report.seconds = time.perf_counter() - started
    return report
