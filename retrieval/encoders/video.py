"""Video segments as vectors: a segment's sampled frames, pooled, fused with its soundtrack.

Frames (one a second by default, plus one at every scene cut when the index asks) are embedded
by the index's CLIP image tower and pooled (mean, or max); when the index has our
audio tower (which shares the CLIP space) and the segment has sound, the soundtrack's vector is
fused with the frames' by the normalised mean (early fusion). A CLAP audio model lives in
another space, so its indexes embed video by the frames alone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from ..core.errors import ModelLoadError, UsageError
from ..core.files import replacing
from ..media.audio import MIN_AUDIO_SECONDS, SILENCE_PEAK
from ..media.video import (
    DEFAULT_MAX_VIDEO_SECONDS,
    VideoDecodeError,
    VideoSegment,
    read_video,
    split_segments,
)

if TYPE_CHECKING:
    from ..index import Index
    from ..query.fusion import FusionTrainingOptions, TemporalEncoder

# .fusion imports torch, so it is imported where it is used: a build with no video to encode
# (a re-index with nothing to do) must not pay for torch.


# What an index records of how it samples videos (`Index.configure`), and the defaults.
VIDEO_SETTINGS = {"frame_rate": "1.0", "scene_threshold": "", "temporal": "mean"}


def decode_segments(index: Index, source: str | BinaryIO, max_seconds: float) -> list[VideoSegment]:
    """The segments of a video file, sampled as the index records (VideoDecodeError when the
    file cannot be used)."""
    threshold = index.video_setting("scene_threshold")
    video = read_video(source, frame_rate=float(index.video_setting("frame_rate")),
                       scene_threshold=float(threshold) if threshold else None,
                       sample_rate=audio_rate(index), max_seconds=max_seconds)
    return split_segments(video)


def segment_vectors(index: Index, segments: list[VideoSegment]) -> np.ndarray:
    """One unit vector per segment, in the CLIP space."""
    from ..query.fusion import early_fuse

    frames = [frame.image for segment in segments for frame in segment.frames]
    pictures = iter(index.encoder.encode_images(frames))
    sequences = [np.stack([next(pictures) for _ in segment.frames]) for segment in segments]
    pooled = _pooled(index, sequences)
    sounds = _sound_vectors(index, segments)
    return np.stack([early_fuse({"image": picture, **({"audio": sounds[i]} if i in sounds else {})})
                     for i, picture in enumerate(pooled)]).astype(np.float32)


def audio_rate(index: Index) -> int:
    """The rate to decode soundtracks at: the audio tower's, or any when there is none."""
    encoder = index.audio_encoder_or_none()
    return encoder.sample_rate if encoder is not None and not index.audio_is_clap else 16000


def _sound_vectors(index: Index, segments: list[VideoSegment]) -> dict[int, np.ndarray]:
    encoder = index.audio_encoder_or_none()
    if encoder is None or index.audio_is_clap:
        return {}
    shortest = MIN_AUDIO_SECONDS * encoder.sample_rate
    audible = [i for i, s in enumerate(segments) if s.audio is not None and len(s.audio) >= shortest
               and float(np.abs(s.audio).max()) >= SILENCE_PEAK]
    if not audible:
        return {}
    return dict(zip(audible, encoder.encode_audio([segments[i].audio for i in audible])))


def _pooled(index: Index, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """Each segment's frame vectors as one: mean or max pooling, or the trained temporal encoder."""
    from ..query.fusion import pool_frames

    pooling = index.video_setting("temporal")
    if ":" not in pooling:
        return [pool_frames(sequence, pooling) for sequence in sequences]
    return list(_temporal_encoder(index.path, pooling).encode(sequences))


# -- the trained temporal encoder ---------------------------------------------------------------

_ENCODERS: dict[tuple[Path, str], TemporalEncoder] = {}


def _temporal_encoder(folder: Path, identity: str) -> TemporalEncoder:
    from safetensors import safe_open

    from ..query.fusion import TemporalEncoder

    key = (folder, identity)
    if key not in _ENCODERS:
        path = folder / _encoder_name(identity)
        try:
            with safe_open(str(path), framework="pt") as weights:
                meta = weights.metadata()
                model = TemporalEncoder(int(meta["dim"]), meta["kind"], int(meta["width"]),
                                        int(meta["layers"]))
                model.load_state_dict({name: weights.get_tensor(name) for name in weights.keys()})  # noqa: SIM118
        except (OSError, KeyError, RuntimeError) as error:
            raise ModelLoadError(f"index {folder}: its temporal encoder {path.name} cannot be read "
                                 f"({error}); train it again with retrieve train-temporal") from None
        _ENCODERS[key] = model.eval()
    return _ENCODERS[key]


def _encoder_name(identity: str) -> str:
    kind, digest = identity.split(":", 1)
    return f"temporal_{kind}_{digest}.safetensors"


def read_video_pairs(source: str | Path) -> list[tuple[Path, str]]:
    """(video, caption) pairs: a folder where a video has a `.txt` caption of the same stem, or a
    CSV/JSONL file with `video` and `caption` fields (paths relative to the file)."""
    from ..media.corpus import VIDEO_SUFFIXES

    path = Path(source).expanduser()
    if path.is_dir():
        pairs = [(video, caption) for video in sorted(path.rglob("*"))
                 if video.suffix.lower() in VIDEO_SUFFIXES and video.with_suffix(".txt").is_file()
                 for caption in video.with_suffix(".txt").read_text(encoding="utf-8").splitlines()[:1]
                 if caption.strip()]
    elif path.suffix.lower() in (".csv", ".jsonl") and path.is_file():
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        try:
            rows = ([json.loads(line) for line in lines if line.strip()] if path.suffix.lower() == ".jsonl"
                    else list(csv.DictReader(lines)))
            pairs = [(path.parent / str(row["video"]), str(row["caption"]).strip()) for row in rows]
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"video pairs {path}: needs video and caption fields ({error})") from None
    else:
        raise UsageError(f"video pairs {source}: give a folder, a .csv or a .jsonl file")
    if not pairs:
        raise UsageError(f"video pairs {source}: no video with a caption (clip.mp4 with clip.txt beside it)")
    return pairs


def train_temporal_encoder(index: Index, pairs: str | Path, kind: str = "bilstm",
                           options: FusionTrainingOptions | None = None) -> tuple[str, dict]:
    """Train a temporal encoder on every segment of captioned videos (each segment towards its
    video's caption vector) and save it in the index folder; returns (identity, report)."""
    from safetensors.torch import save

    from ..query.fusion import train_temporal

    sequences, captions = [], []
    for video, caption in read_video_pairs(pairs):
        try:
            segments = decode_segments(index, os.fspath(video), DEFAULT_MAX_VIDEO_SECONDS)
        except VideoDecodeError as error:
            raise UsageError(f"training video {video}: {error}") from None
        frames = index.encoder.encode_images([f.image for s in segments for f in s.frames])
        start = 0
        for segment in segments:
            sequences.append(frames[start:start + len(segment.frames)])
            start += len(segment.frames)
            captions.append(caption)
    targets = index.text_encoder.encode_texts(captions)
    model, report = train_temporal(sequences, targets, kind, options)
    width = model.out.in_features // (2 if kind == "bilstm" else 1)
    layers = model.lstm.num_layers if kind == "bilstm" else len(model.transformer.layers)
    data = save({k: v.contiguous() for k, v in model.state_dict().items()},
                metadata={"kind": kind, "dim": str(targets.shape[1]), "width": str(width),
                          "layers": str(layers)})
    identity = f"{kind}:{hashlib.sha256(data).hexdigest()[:16]}"
    with replacing(index.path / _encoder_name(identity)) as temporary:
        temporary.write_bytes(data)
    return identity, report
