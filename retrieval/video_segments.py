"""Video segments as vectors: a segment's sampled frames, pooled, fused with its soundtrack.

Frames (one a second by default, plus one at every scene cut when the index asks) are embedded
by the index's CLIP image tower and pooled (mean, or max); when the index has our
audio tower (which shares the CLIP space) and the segment has sound, the soundtrack's vector is
fused with the frames' by the normalised mean (early fusion). A CLAP audio model lives in
another space, so its indexes embed video by the frames alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from .audio import MIN_AUDIO_SECONDS, SILENCE_PEAK
from .fusion import early_fuse, pool_frames
from .video import VideoSegment, read_video, split_segments

if TYPE_CHECKING:
    from .index import Index


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
    frames = [frame.image for segment in segments for frame in segment.frames]
    pictures = iter(index.encoder.encode_images(frames))
    pooling = index.video_setting("temporal")
    pooled = [pool_frames(np.stack([next(pictures) for _ in segment.frames]), pooling)
              for segment in segments]
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
