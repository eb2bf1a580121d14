"""Training the attention gate of entry search: on queries and the entries that answer them, the
gate learns which modalities to trust for each query (see `retrieval.query.gate`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..context import IndexContext
from ..core.errors import UsageError
from ..core.files import tensors_bytes, write_atomically
from ..core.types import MODALITIES
from ..query.entries import check_answers, entry_members, part_arrays, read_entry_queries, resolve_grouping
from ..query.gate import AttentionFusion
from ..storage.folder import GATE_NAME
from .loop import fit, split_examples


@dataclass
class FusionTrainingOptions:
    """How to train the fusion gate or a temporal encoder."""

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 3e-3
    held_out: float = 0.2  # fraction of queries (or sequences) measured each epoch, never trained on
    seed: int = 0
    progress: bool = False


def soft_positives(groups: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Rows summing to 1 over the candidates that share each example's group."""
    positives = (groups[:, None] == candidates[None, :]).float()
    return positives / positives.sum(dim=1, keepdim=True)


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
    train, test = split_examples(len(query_t), options.held_out, options.seed)

    def loss_of(batch: np.ndarray, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * model(query_t[batch], parts_t, mask_t)
        return F.cross_entropy(logits, soft_positives(groups_t[answers_t[batch]], groups_t))

    def recall_of() -> dict:
        top = model(query_t[test], parts_t, mask_t).argmax(dim=1)
        return {"R@1": float((groups_t[top] == groups_t[answers_t[test]]).float().mean())}

    report = fit(model, loss_of, recall_of, train, len(test), options, "attention fusion")
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


def train_fusion_gate(context: IndexContext, queries: str | Path, grouping: str = "stem",
                      options: FusionTrainingOptions | None = None) -> dict:
    """Train the attention gate on queries and the entries that answer them (see
    `read_entry_queries`), among all the index's entries; save it in the index folder.
    The caller holds the index's write lock."""
    resolved = resolve_grouping(grouping)
    members = entry_members(context, None, resolved)
    names = sorted(members)
    position = {name: row for row, name in enumerate(names)}
    answers = read_entry_queries(queries, resolved)
    check_answers(context, answers, set(position), queries)
    examples = [(query, position[entry]) for query, right in answers
                for entry in sorted(right) if entry in position]
    dim = context.settings.dim
    parts, mask = part_arrays(members, names, dim)
    vectors = context.encoders.text.encode_texts([query for query, _ in examples])
    model, report = train_attention(vectors, parts, mask, np.array([row for _, row in examples]), options)
    report["queries"] = len({query for query, _ in examples})  # a query may name several entries
    write_atomically(context.folder / GATE_NAME, tensors_bytes(
        model.state_dict(), {"dim": str(dim), "hidden": str(model.gate[0].out_features)}))
    return report
