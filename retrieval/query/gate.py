"""Attention fusion: a small gate that turns a query into weights over the modalities, trained
on a user's queries (`retrieval.train.fusion`) and kept in the index folder."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UsageError
from ..core.files import read_tensors
from ..core.types import MODALITIES
from ..storage.folder import GATE_NAME


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


def has_gate(folder: Path) -> bool:
    return (folder / GATE_NAME).is_file()


def load_gate(folder: Path) -> AttentionFusion:
    """The gate trained for the index in `folder`."""
    path = folder / GATE_NAME
    if not path.is_file():
        raise UsageError(f"index {folder} has no trained fusion gate; train one with: retrieve "
                         f"train-fusion QUERIES --index {folder}")
    state, meta = read_tensors(path)
    model = AttentionFusion(int(meta["dim"]), int(meta["hidden"]))
    model.load_state_dict(state)
    return model.eval()
