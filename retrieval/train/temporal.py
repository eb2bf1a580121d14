"""Training a temporal encoder (see `retrieval.encoders.temporal`): every segment of a captioned
video learns to land next to its video's caption vector, so the encoder reads frame order where
mean and max pooling cannot."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..context import IndexContext
from ..core.errors import UsageError
from ..encoders.temporal import TemporalEncoder, padded, save_temporal
from ..media.pairs import read_video_pairs
from ..media.video import DEFAULT_MAX_VIDEO_SECONDS, VideoDecodeError
from .fusion import FusionTrainingOptions
from .loop import fit, split_examples, symmetric_info_nce


def train_temporal(sequences: list[np.ndarray], targets: np.ndarray, architecture: str = "bilstm",
                   options: FusionTrainingOptions | None = None) -> tuple[TemporalEncoder, dict]:
    """Train an encoder to put each frame sequence (T_i, d) next to its unit target (d,), e.g. its
    caption's vector, with a symmetric InfoNCE loss in which sequences with equal targets are all
    positives for each other; held-out R@1 (sequence -> its target among the held-out targets)."""
    options = options or FusionTrainingOptions()
    frames, target_t, groups = _temporal_tensors(sequences, targets)
    torch.manual_seed(options.seed)
    model = TemporalEncoder(target_t.shape[1], architecture)
    train, test = split_examples(len(frames), options.held_out, options.seed)

    def loss_of(batch: np.ndarray, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * model(*padded([frames[i] for i in batch])) @ target_t[batch].T
        return symmetric_info_nce(logits, (groups[batch][:, None] == groups[batch][None, :]).float())

    def recall_of() -> dict:
        kept = sorted(set(groups[test].tolist()))  # equal held-out targets count as one candidate
        candidates = torch.stack([target_t[groups == g][0] for g in kept])
        top = (model(*padded([frames[i] for i in test])) @ candidates.T).argmax(dim=1)
        return {"R@1": float((torch.tensor(kept)[top] == groups[test]).float().mean())}

    report = fit(model, loss_of, recall_of, train, len(test), options, f"{architecture} encoder")
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


def train_temporal_encoder(context: IndexContext, pairs: str | Path, architecture: str = "bilstm",
                           options: FusionTrainingOptions | None = None) -> tuple[str, dict]:
    """Train a temporal encoder on every segment of captioned videos (each segment towards its
    video's caption vector) and save it in the index folder; returns (identity, report)."""
    encoders = context.encoders
    sequences, captions = [], []
    for video, caption in read_video_pairs(pairs):
        try:
            segments = encoders.decode_video(os.fspath(video), DEFAULT_MAX_VIDEO_SECONDS)
        except VideoDecodeError as error:
            raise UsageError(f"training video {video}: {error}") from None
        frames = encoders.clip.encode_images([f.image for s in segments for f in s.frames])
        start = 0
        for segment in segments:
            sequences.append(frames[start:start + len(segment.frames)])
            start += len(segment.frames)
            captions.append(caption)
    targets = encoders.text.encode_texts(captions)
    model, report = train_temporal(sequences, targets, architecture, options)
    return save_temporal(model, context.folder), report
