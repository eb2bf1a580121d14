"""Fuse per-modality evidence into entry scores, at the vector level.

An entry groups parts of several modalities (a product: photo and description; a video segment:
frames, soundtrack and subtitle), each part a unit vector in the shared space. Evidence is fused
in one of four places:

- early: an entry's part vectors become one entry vector (mean, weighted, concat), indexed as is;
- late: each modality is searched on its own and the result lists are merged (sum, max, rrf);
- attention: a small learnt gate turns the query into weights over modalities, so a query about
  a sound leans on soundtracks and one about a look leans on photos;
- temporal: a sequence of frame vectors becomes one vector, by pooling (order-blind) or by a
  trained BiLSTM or transformer (order-aware).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..core.errors import UsageError
from ..train.loop import optimise, symmetric_info_nce

MODALITIES = ("image", "text", "audio", "video")
EARLY = ("mean", "weighted", "concat")
LATE = ("sum", "max", "rrf")
STRATEGIES = (*EARLY, *LATE, "attention")
TEMPORAL = ("mean", "max", "bilstm", "transformer")


def _choose(name: str, choices: tuple[str, ...], what: str) -> str:
    if name not in choices:
        raise UsageError(f"unknown {what} {name!r}: choose one of {', '.join(choices)}")
    return name


def _weights(weights: dict[str, float] | None) -> dict[str, float]:
    """Every modality's weight: 1 unless named."""
    chosen = dict.fromkeys(MODALITIES, 1.0)
    for modality, weight in (weights or {}).items():
        _choose(modality, MODALITIES, "modality")
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"weight of {modality} must be a finite number >= 0, not {weight}")
        chosen[modality] = float(weight)
    return chosen


def _unit(vector: np.ndarray, what: str) -> np.ndarray:
    """`vector` scaled to length 1 along its last axis."""
    norm = np.linalg.norm(vector, axis=-1, keepdims=True)
    if not np.all(norm > 0):
        raise UsageError(f"{what} is the zero vector, which has no direction to normalise")
    return (vector / norm).astype(np.float32)


# -- early fusion ------------------------------------------------------------------------------

def early_fuse(parts: dict[str, np.ndarray], strategy: str = "mean",
               weights: dict[str, float] | None = None) -> np.ndarray:
    """One unit entry vector from the entry's unit part vectors (a missing modality: no key).

    mean: the normalised mean (weights are ignored); weighted: the normalised weighted sum;
    concat: [w_image*image, w_text*text, w_audio*audio], zeros for a missing part, normalised, of
    3x the dimension. Against a query from `early_fuse_query(q, "concat", query_weights)` the inner
    product is sum_m weights[m] * query_weights[m] * cos(q, part_m) over both vectors' norms, so
    weighting one side (the query, say, to change weights without re-indexing) is enough.
    """
    _choose(strategy, EARLY, "early fusion strategy")
    if not parts:
        raise UsageError("early fusion needs at least one part")
    vectors = {_choose(m, MODALITIES, "modality"): np.asarray(v, np.float32) for m, v in parts.items()}
    shapes = {v.shape for v in vectors.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise UsageError(f"parts must be vectors of one length, got shapes {sorted(shapes)}")
    weight = _weights(None if strategy == "mean" else weights)
    if strategy == "concat":
        (dim,) = shapes.pop()
        fused = np.concatenate([weight[m] * vectors[m] if m in vectors else np.zeros(dim, np.float32)
                                for m in MODALITIES])
    else:
        fused = sum(weight[m] * vector for m, vector in vectors.items())
    return _unit(fused, "the fused entry (are its parts all weighted 0?)")


def early_fuse_query(vector: np.ndarray, strategy: str, weights: dict[str, float] | None = None
                     ) -> np.ndarray:
    """The query to search an index of `early_fuse(..., strategy)` entries with, from a query
    vector (d,) or rows (n, d): the unit vector itself for mean and weighted, and for concat the
    vector repeated once per modality, each copy times that modality's weight, normalised."""
    _choose(strategy, EARLY, "early fusion strategy")
    vector = np.asarray(vector, np.float32)
    if strategy != "concat":
        return _unit(vector, "the query")
    weight = _weights(weights)
    return _unit(np.concatenate([weight[m] * vector for m in MODALITIES], axis=-1),
                 "the query (are all modalities weighted 0?)")


# -- late fusion -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedHit:
    entry: int
    score: float
    contributions: dict[str, float]  # each counted modality's share; the shares add up to score


def late_fuse(rankings: dict[str, list[tuple[int, float]]], strategy: str = "rrf",
              weights: dict[str, float] | None = None, k: int = 10, rrf_k: int = 60) -> list[FusedHit]:
    """Merge per-modality result lists [(entry, cosine), ...], best first, into the best k entries.

    sum: the weighted sum of an entry's scores (a list it is absent from adds nothing); max: its
    best weighted score, credited to that one modality; rrf: the sum of weight / (rrf_k + rank),
    ranks from 1, which needs no comparable scores across modalities. Ties go to the lower id.
    """
    _choose(strategy, LATE, "late fusion strategy")
    if k < 1 or rrf_k < 0:
        raise UsageError(f"late fusion needs k >= 1 and rrf_k >= 0, got k={k}, rrf_k={rrf_k}")
    shares = _shares(rankings, strategy, _weights(weights), rrf_k)
    hits = [_hit(entry, by_modality, strategy) for entry, by_modality in shares.items()]
    hits.sort(key=lambda hit: (-hit.score, hit.entry))
    return hits[:k]


def _shares(rankings: dict[str, list[tuple[int, float]]], strategy: str, weight: dict[str, float],
            rrf_k: int) -> dict[int, dict[str, float]]:
    """entry -> modality -> that modality's weighted evidence for the entry."""
    shares: dict[int, dict[str, float]] = {}
    for modality, ranking in rankings.items():
        _choose(modality, MODALITIES, "modality")
        for rank, (entry, score) in enumerate(ranking, 1):
            share = weight[modality] / (rrf_k + rank) if strategy == "rrf" else weight[modality] * score
            # an entry listed twice by one modality (two frames of one video) counts once, at its best
            shares.setdefault(int(entry), {}).setdefault(modality, float(share))
    return shares


def _hit(entry: int, by_modality: dict[str, float], strategy: str) -> FusedHit:
    if strategy == "max":
        best = max(by_modality, key=by_modality.__getitem__)
        return FusedHit(entry, by_modality[best], {best: by_modality[best]})
    return FusedHit(entry, sum(by_modality.values()), by_modality)


# -- training, shared --------------------------------------------------------------------------

@dataclass
class FusionTrainingOptions:
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    held_out: float = 0.2  # fraction of queries (or sequences) measured each epoch, never trained on
    seed: int = 0
    progress: bool = False


@dataclass
class FusionEpoch:
    epoch: int
    loss: float
    recall_at_1: float  # on the held-out examples


@dataclass
class FusionReport:
    examples: int = 0
    held_out: int = 0
    epochs: list[FusionEpoch] = field(default_factory=list)
    seconds: float = 0.0


def _split(count: int, options: FusionTrainingOptions) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) example numbers, drawn from the seed."""
    if not 0 <= options.held_out < 1:
        raise UsageError(f"held_out is a fraction from 0 to below 1, not {options.held_out}")
    held = round(count * options.held_out)
    if count - held < 2:
        raise UsageError(f"training needs at least 2 examples besides the {held} held out, found {count}")
    order = np.random.default_rng(options.seed).permutation(count)
    return order[held:], order[:held]


def _batches(examples: np.ndarray, size: int, generator: np.random.Generator) -> Iterator[np.ndarray]:
    order = generator.permutation(examples)
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        if len(batch) > 1:  # one example has no negatives to learn from
            yield batch


def _fit(model: nn.Module, loss_of: Callable[[np.ndarray, torch.Tensor], torch.Tensor],
         recall_of: Callable[[], float], train: np.ndarray, held_out: int,
         options: FusionTrainingOptions, name: str) -> FusionReport:
    """AdamW with a one-cycle schedule and a learnt temperature; held-out R@1 after each epoch."""
    started = time.perf_counter()
    report = FusionReport(len(train) + held_out, held_out)
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
        for batch in _batches(train, options.batch_size, generator):
            losses.append(optimise(loss_of(batch, logit_scale.exp()), optimizer, schedule, logit_scale))
        model.eval()
        with torch.no_grad():
            recall = recall_of() if held_out else 0.0
        report.epochs.append(FusionEpoch(epoch, float(np.mean(losses)), recall))
    report.seconds = time.perf_counter() - started
    return report


def _soft_positives(groups: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Rows summing to 1 over the candidates that share each example's group."""
    positives = (groups[:, None] == candidates[None, :]).float()
    return positives / positives.sum(dim=1, keepdim=True)


# -- attention fusion --------------------------------------------------------------------------

class AttentionFusion(nn.Module):
    """Scores entries by sum_m weight_m(query) * cos(query, part_m), the weights a softmax over
    MODALITIES from a small gate on the query, renormalised over the parts an entry has (an entry
    with none scores 0)."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, len(MODALITIES)))
        # a zero last layer gives equal weights: training starts from mean fusion of cosines
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)

    def weights(self, query: torch.Tensor) -> torch.Tensor:
        """(B, d) queries -> (B, M) modality weights, each row summing to 1."""
        return torch.softmax(self.gate(F.normalize(query, dim=-1)), dim=-1)

    def forward(self, query: torch.Tensor, parts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query (B, d), parts (N, M, d), mask (N, M) true where a part exists -> scores (B, N)."""
        query = F.normalize(query, dim=-1)
        weights = self.weights(query)[:, None, :] * mask[None].to(query.dtype)  # (B, N, M)
        cosines = torch.einsum("bd,nmd->bnm", query, parts)
        # renormalised so that a missing part neither adds nor costs anything
        return (weights * cosines).sum(-1) / weights.sum(-1).clamp_min(1e-12)


def train_attention(queries: np.ndarray, parts: np.ndarray, mask: np.ndarray, answers: np.ndarray,
                    options: FusionTrainingOptions | None = None, *, groups: np.ndarray | None = None
                    ) -> tuple[AttentionFusion, dict]:
    """Train a gate on queries (Q, d) whose right entries are `answers` (Q,), among all entries'
    parts (N, M, d) (zeros where `mask` (N, M) is false), with InfoNCE over all entries.

    `groups` (N,), optional, says which entries are interchangeable (same group): all of an
    answer's group are positives, and held-out R@1 counts any of them as right.
    """
    options = options or FusionTrainingOptions()
    query_t, parts_t, mask_t, answers_t, groups_t = _attention_tensors(queries, parts, mask, answers, groups)
    torch.manual_seed(options.seed)
    model = AttentionFusion(query_t.shape[1])
    train, test = _split(len(query_t), options)

    def loss_of(batch: np.ndarray, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * model(query_t[batch], parts_t, mask_t)
        return F.cross_entropy(logits, _soft_positives(groups_t[answers_t[batch]], groups_t))

    def recall_of() -> float:
        top = model(query_t[test], parts_t, mask_t).argmax(dim=1)
        return float((groups_t[top] == groups_t[answers_t[test]]).float().mean())

    report = _fit(model, loss_of, recall_of, train, len(test), options, "attention fusion")
    return model.eval(), asdict(report)


def _attention_tensors(queries: np.ndarray, parts: np.ndarray, mask: np.ndarray, answers: np.ndarray,
                       groups: np.ndarray | None) -> tuple[torch.Tensor, ...]:
    """The inputs as tensors, after checking their shapes agree; groups default to one per entry."""
    queries, parts = np.asarray(queries, np.float32), np.asarray(parts, np.float32)
    mask, answers = np.asarray(mask, bool), np.asarray(answers, np.int64)
    groups = np.arange(len(parts)) if groups is None else np.asarray(groups, np.int64)
    entries = parts.shape[0] if parts.ndim == 3 else -1
    if (queries.ndim != 2 or parts.shape[1:] != (len(MODALITIES), queries.shape[1])
            or mask.shape != parts.shape[:2] or answers.shape != queries.shape[:1]
            or groups.shape != (entries,)):
        raise UsageError(f"attention training needs queries (Q, d), parts (N, {len(MODALITIES)}, d), "
                         "mask (N, M), answers (Q,) and groups (N,)")
    if answers.size and (answers.min() < 0 or answers.max() >= entries):
        raise UsageError(f"answers must be entry numbers from 0 to {entries - 1}")
    return tuple(torch.from_numpy(array) for array in (queries, parts, mask, answers, groups))


# -- temporal fusion ---------------------------------------------------------------------------

def pool_frames(frames: np.ndarray, strategy: str = "mean") -> np.ndarray:
    """A unit vector from frame vectors (T, d) by mean or max pooling: blind to frame order."""
    if strategy in TEMPORAL[2:]:
        raise UsageError(f"{strategy} pooling is learnt: use a TemporalEncoder from train_temporal")
    _choose(strategy, TEMPORAL[:2], "frame pooling")
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 2 or not len(frames):
        raise UsageError(f"frame pooling needs a (frames, dim) array with a frame, not {frames.shape}")
    return _unit(frames.mean(axis=0) if strategy == "mean" else frames.max(axis=0), "the pooled frames")


def _sinusoids(length: int, width: int) -> torch.Tensor:
    """(length, width) position codes: what lets attention, blind to order, tell first from last."""
    angles = torch.arange(length)[:, None] * torch.exp(torch.arange(0, width, 2) * (-math.log(1e4) / width))
    codes = torch.zeros(length, width)
    codes[:, 0::2] = torch.sin(angles)
    codes[:, 1::2] = torch.cos(angles[:, :width // 2])
    return codes


def _padded(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences])
    return nn.utils.rnn.pad_sequence(sequences, batch_first=True), lengths


class TemporalEncoder(nn.Module):
    """Frame vectors (B, T, d) -> unit vectors (B, d), reading frame order: a bidirectional LSTM
    ("bilstm") or a small transformer with sinusoidal positions ("transformer"), projected back to
    d and averaged over each sequence's frames."""

    def __init__(self, dim: int, kind: str = "bilstm", width: int = 64, layers: int = 1):
        super().__init__()
        self.kind = _choose(kind, TEMPORAL[2:], "temporal encoder")
        if kind == "bilstm":
            self.lstm = nn.LSTM(dim, width, num_layers=layers, batch_first=True, bidirectional=True)
            self.out = nn.Linear(2 * width, dim)
        else:
            self.embed = nn.Linear(dim, width)
            layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                               batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.out = nn.Linear(width, dim)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        lengths = lengths.to(frames.device)
        present = torch.arange(frames.shape[1], device=frames.device)[None, :] < lengths[:, None]  # (B, T)
        if self.kind == "bilstm":
            packed = nn.utils.rnn.pack_padded_sequence(frames, lengths.cpu(), batch_first=True,
                                                       enforce_sorted=False)
            states, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                                         total_length=frames.shape[1])
        else:
            codes = _sinusoids(frames.shape[1], self.embed.out_features).to(frames.device)
            states = self.transformer(self.embed(frames) + codes, src_key_padding_mask=~present)
        pooled = (self.out(states) * present[..., None]).sum(dim=1) / lengths[:, None]
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def encode(self, sequences: list[np.ndarray]) -> np.ndarray:
        """Unit vectors (N, d) of frame sequences, each (T_i, d)."""
        frames, lengths = _padded([torch.from_numpy(np.ascontiguousarray(s, np.float32)) for s in sequences])
        return self(frames, lengths).numpy()


def train_temporal(sequences: list[np.ndarray], targets: np.ndarray, kind: str = "bilstm",
                   options: FusionTrainingOptions | None = None) -> tuple[TemporalEncoder, dict]:
    """Train an encoder to put each frame sequence (T_i, d) next to its unit target (d,), e.g. its
    caption's vector, with a symmetric InfoNCE loss in which sequences with equal targets are all
    positives for each other; held-out R@1 (sequence -> its target among the held-out targets)."""
    options = options or FusionTrainingOptions()
    frames, target_t, groups = _temporal_tensors(sequences, targets)
    torch.manual_seed(options.seed)
    model = TemporalEncoder(target_t.shape[1], kind)
    train, test = _split(len(frames), options)

    def loss_of(batch: np.ndarray, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * model(*_padded([frames[i] for i in batch])) @ target_t[batch].T
        return symmetric_info_nce(logits, (groups[batch][:, None] == groups[batch][None, :]).float())

    def recall_of() -> float:
        kept = sorted(set(groups[test].tolist()))  # equal held-out targets count as one candidate
        candidates = torch.stack([target_t[groups == g][0] for g in kept])
        top = (model(*_padded([frames[i] for i in test])) @ candidates.T).argmax(dim=1)
        return float((torch.tensor(kept)[top] == groups[test]).float().mean())

    report = _fit(model, loss_of, recall_of, train, len(test), options, f"{kind} encoder")
    return model.eval(), asdict(report)


def _temporal_tensors(sequences: list[np.ndarray], targets: np.ndarray
                      ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Frame tensors, target tensor and target groups (equal targets share one), after checks."""
    targets = np.asarray(targets, np.float32)
    frames = [torch.from_numpy(np.ascontiguousarray(s, np.float32)) for s in sequences]
    if targets.ndim != 2 or len(frames) != len(targets):
        raise UsageError(f"temporal training needs one (d,) target per sequence: {len(frames)} "
                         f"sequences, targets of shape {targets.shape}")
    if any(f.ndim != 2 or not len(f) or f.shape[1] != targets.shape[1] for f in frames):
        raise UsageError(f"each sequence must be a (frames, {targets.shape[1]}) array of at least one frame")
    _, groups = np.unique(targets, axis=0, return_inverse=True)
    return frames, torch.from_numpy(targets), torch.from_numpy(groups.reshape(-1))
