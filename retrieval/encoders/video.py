"""Video segments as vectors: a segment's sampled frames, pooled, fused with its soundtrack.

Frames (one a second by default, plus one at every scene cut when the index asks) are embedded
by the CLIP image tower and pooled: mean or max, or a trained temporal encoder that reads frame
order (see `temporal`). When the index has our audio tower (which shares the CLIP space) and a
segment has sound, the soundtrack's vector joins the frames' in their normalised mean (early
fusion). A CLAP audio model lives in another space, so its indexes embed video by frames alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from ..core.errors import UsageError
from ..core.types import FRAME_POOLINGS, TEMPORAL_ARCHITECTURES
from ..core.vectors import unit, unit_mean
from ..media.audio import MIN_AUDIO_SECONDS, SILENCE_PEAK
from ..media.video import VideoSegment, read_video, split_segments
from .audio import AudioEncoder

ANY_SAMPLE_RATE = 16000  # soundtracks no encoder will hear are decoded at this rate


@dataclass(frozen=True)
class VideoSampling:
    """How an index samples a video's frames, and at which rate its soundtrack is decoded."""

    frame_rate: float
    scene_threshold: float | None
    sample_rate: int = ANY_SAMPLE_RATE


def decode_segments(source: str | BinaryIO, sampling: VideoSampling, max_seconds: float
                    ) -> list[VideoSegment]:
    """The segments of a video file, sampled as `sampling` says (VideoDecodeError when the
    file cannot be used)."""
    video = read_video(source, frame_rate=sampling.frame_rate, scene_threshold=sampling.scene_threshold,
                       sample_rate=sampling.sample_rate, max_seconds=max_seconds)
    return split_segments(video)


def pool_frames(frames: np.ndarray, strategy: str = "mean") -> np.ndarray:
    """A unit vector from frame vectors (T, d) by mean or max pooling: blind to frame order."""
    if strategy in TEMPORAL_ARCHITECTURES:
        raise UsageError(f"{strategy} pooling is learnt: use a TemporalEncoder from train_temporal")
    if strategy not in FRAME_POOLINGS:
        raise UsageError(f"unknown frame pooling {strategy!r}: choose one of {', '.join(FRAME_POOLINGS)}")
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 2 or not len(frames):
        raise UsageError(f"frame pooling needs a (frames, dim) array with a frame, not {frames.shape}")
    return unit(frames.mean(axis=0) if strategy == "mean" else frames.max(axis=0), "the pooled frames")


class VideoEncoder:
    """Segments -> one unit vector each, in the CLIP space: frames through `images` (a CLIP
    encoder), pooled by `pool` (frame sequences -> one vector each), fused with the soundtrack's
    vector from `sound` (our audio tower; None: frames alone)."""

    def __init__(self, images, pool: Callable[[list[np.ndarray]], Sequence[np.ndarray]],
                 sound: AudioEncoder | None) -> None:
        self.images = images
        self.pool = pool
        self.sound = sound

    def encode_segments(self, segments: list[VideoSegment]) -> np.ndarray:
        frames = [frame.image for segment in segments for frame in segment.frames]
        pictures = iter(self.images.encode_images(frames))
        sequences = [np.stack([next(pictures) for _ in segment.frames]) for segment in segments]
        sounds = self._sound_vectors(segments)
        return np.stack([unit_mean([picture, sounds[i]]) if i in sounds else unit(picture)
                         for i, picture in enumerate(self.pool(sequences))]).astype(np.float32)

    def _sound_vectors(self, segments: list[VideoSegment]) -> dict[int, np.ndarray]:
        if self.sound is None:
            return {}
        shortest = MIN_AUDIO_SECONDS * self.sound.sample_rate
        audible = [i for i, s in enumerate(segments) if s.audio is not None and len(s.audio) >= shortest
                   and float(np.abs(s.audio).max()) >= SILENCE_PEAK]
        if not audible:
            return {}
        return dict(zip(audible, self.sound.encode_audio([segments[i].audio for i in audible])))
