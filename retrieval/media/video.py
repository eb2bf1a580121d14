"""Decode videos into timed frames and a mono soundtrack, and cut them into segments."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import soxr
from PIL import Image

from ..core.errors import OverCapError
from ..core.types import DEFAULT_MAX_VIDEO_SECONDS

# Private helpers shared with audio decoding: opening sources, spotting empty files, showing lengths.
from .audio import binary_stream, format_duration, format_durations, is_empty_stream

DEFAULT_FRAME_RATE = 1.0  # frames sampled per second
DEFAULT_SEGMENT_SECONDS = 4.0

# Containers store timestamps in coarse units (often milliseconds): a frame stamped 0.333 s is the
# one due at 1/3 s, and a duration a hair over a segment boundary makes no sliver of a segment.
_TIME_TOLERANCE = 1e-3
_THUMBNAIL_SIDE = 32  # scene detection compares thumbnails: cheap, and blind to noise and grain
_FALLBACK_FRAME_RATE = 25  # what FFmpeg assumes for raw streams that carry no rate either
_REASON_CHARS = 200
# Audio timestamps further than this past the audio before them mark a gap, filled with silence so that
# the sound after it stays under its pictures; smaller offsets are clock rounding.
_AUDIO_GAP = 0.01


class VideoDecodeError(ValueError):
    """Why a video file cannot be used, in one line (shown as `skipped PATH: <message>`)."""


class VideoTooLongError(VideoDecodeError, OverCapError):
    """A video longer than the cap."""

    parameter = "max_video_seconds"


@dataclass(frozen=True, eq=False)  # frames compare by identity, not by pixels
class VideoFrame:
    """A sampled picture: `time` in seconds from the start of the video, `image` in RGB."""

    time: float
    image: Image.Image


@dataclass(eq=False)
class Video:
    """Sampled frames in time order and the soundtrack (None without an audio stream).

    The soundtrack is mono float32 at `sample_rate` and spans exactly `duration`: silence fills
    whatever the audio stream does not cover.
    """

    duration: float
    frames: list[VideoFrame]
    audio: np.ndarray | None
    sample_rate: int


@dataclass(eq=False)
class VideoSegment:
    """A stretch [start, end) of a video: its frames and a view into its soundtrack."""

    start: float
    end: float
    frames: list[VideoFrame]
    audio: np.ndarray | None


def read_video(source: str | Path | BinaryIO, frame_rate: float = DEFAULT_FRAME_RATE,
               scene_threshold: float | None = None, sample_rate: int = 16000,
               max_seconds: float = DEFAULT_MAX_VIDEO_SECONDS, max_side: int = 512) -> Video:
    """Decode a video into frames sampled every 1/`frame_rate` seconds and its soundtrack.

    Each sampling time takes the first frame shown at or after it. With `scene_threshold` (0..1), a
    frame is also taken wherever the picture differs from the one before by more than that (mean
    absolute difference of grayscale thumbnails), so that cuts between samples are not missed.
    Frames are shown as a player would (pixel aspect ratio, rotation) and scaled down so that their
    longer side is at most `max_side`. The first audio stream is mixed to mono (channels averaged)
    and resampled with soxr to `sample_rate`.

    `source` is a path or a seekable binary file object holding the whole file (container offsets
    are absolute).
    Raises VideoDecodeError with a one-line reason for anything that is not a usable video.
    """
    _check_options(frame_rate, scene_threshold, sample_rate, max_side)
    try:
        with binary_stream(source) as stream:
            if is_empty_stream(stream):
                raise VideoDecodeError("empty file")
            with _open_container(stream) as container:
                return _decode(container, frame_rate, scene_threshold, sample_rate, max_seconds, max_side)
    except av.FFmpegError as error:  # before OSError: some of PyAV's errors are both
        raise VideoDecodeError(f"corrupt or undecodable video ({_ffmpeg_reason(error)})") from None
    except OSError as error:  # missing, a folder, no permission, or a failing disk
        raise VideoDecodeError(f"cannot read ({error.strerror or type(error).__name__})") from None


def _check_options(frame_rate: float, scene_threshold: float | None, sample_rate: int, max_side: int) -> None:
    if frame_rate <= 0 or sample_rate <= 0 or max_side <= 0:
        raise ValueError(f"frame_rate, sample_rate and max_side must be positive, "
                         f"got {frame_rate}, {sample_rate}, {max_side}")
    if scene_threshold is not None and not 0 <= scene_threshold <= 1:
        raise ValueError(f"scene_threshold must be within 0..1, got {scene_threshold}")


def _open_container(stream: BinaryIO) -> av.container.InputContainer:
    # Given a file object rather than a name, FFmpeg probes the content alone, never the suffix.
    try:
        return av.open(stream, mode="r")
    except av.FFmpegError as error:
        raise VideoDecodeError(f"not a readable video file ({_ffmpeg_reason(error)})") from None


def _decode(container: av.container.InputContainer, frame_rate: float, scene_threshold: float | None,
            sample_rate: int, max_seconds: float, max_side: int) -> Video:
    video = _video_stream(container)
    declared = _declared_seconds(container, video)
    if declared is not None and declared > max_seconds:
        length, limit = format_durations(declared, max_seconds)
        raise VideoTooLongError(f"too long ({length}; the limit is {limit}, raise it with "
                               "`max_video_seconds`)")
    video.codec_context.thread_type = "AUTO"
    audio = container.streams.audio[0] if container.streams.audio else None
    # Times count from the container's start: MPEG-TS clocks, for one, do not begin at zero.
    origin = container.start_time / av.time_base if container.start_time is not None else 0.0
    picker = _FramePicker(video, origin, frame_rate, scene_threshold, max_side)
    soundtrack = _Soundtrack(origin, sample_rate)
    for packet in container.demux(*[stream for stream in (video, audio) if stream is not None]):
        for frame in _decode_packet(packet):
            if isinstance(frame, av.VideoFrame):
                picker.add(frame)
            else:
                soundtrack.add(frame)
            # Headers may lack a duration, or lie: decoded time bounds the work and the memory.
            if max(picker.end, soundtrack.end) > max_seconds:
                raise VideoTooLongError(f"too long (runs past the {format_duration(max_seconds)} limit, "
                                       "raise it with `max_video_seconds`)")
    if not picker.frames:
        raise VideoDecodeError("no decodable video frames")
    duration = max(picker.end, soundtrack.end)
    wave = soundtrack.wave(duration) if audio is not None else None
    return Video(duration, picker.frames, wave, sample_rate)


def _decode_packet(packet: av.Packet) -> list[av.frame.Frame]:
    # A damaged packet costs its own frames, as in FFmpeg's tools, rather than the whole video;
    # the soundtrack stays in sync through the timestamps of the audio that follows.
    try:
        return packet.decode()
    except av.error.InvalidDataError:
        return []


def _video_stream(container: av.container.InputContainer) -> av.VideoStream:
    # Cover art in music files is a one-picture "video" stream; it does not make a video.
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    raise VideoDecodeError("no video stream")


def _declared_seconds(container: av.container.InputContainer, video: av.VideoStream) -> float | None:
    if container.duration is not None:
        return container.duration / av.time_base
    if video.duration is not None and video.time_base:
        return float(video.duration * video.time_base)
    return None


class _FramePicker:
    """Keeps the frames due at each sampling time, and with a scene threshold those after a cut."""

    def __init__(self, stream: av.VideoStream, origin: float, frame_rate: float,
                 scene_threshold: float | None, max_side: int) -> None:
        self.frames: list[VideoFrame] = []
        self.end = 0.0  # when the latest decoded frame stops being shown
        self._origin = origin
        self._rate = frame_rate
        self._threshold = scene_threshold
        self._max_side = max_side
        self._pixel_aspect = _pixel_aspect(stream)
        rate = stream.guessed_rate or stream.average_rate or _FALLBACK_FRAME_RATE
        self._interval = float(1 / rate)
        self._due = 0.0
        self._time: float | None = None
        self._thumbnail: np.ndarray | None = None

    def add(self, frame: av.VideoFrame) -> None:
        time = self._frame_time(frame)
        due = time >= self._due - _TIME_TOLERANCE
        cut = self._threshold is not None and self._is_cut(frame)
        # Decoders may emit frames with times out of order; the kept ones stay strictly increasing.
        if (due or cut) and (not self.frames or time > self.frames[-1].time):
            self.frames.append(VideoFrame(time, _picture(frame, self._pixel_aspect, self._max_side)))
        if due:
            self._due = (math.floor((time + _TIME_TOLERANCE) * self._rate) + 1) / self._rate
        self.end = max(self.end, time + self._frame_duration(frame))

    def _frame_time(self, frame: av.VideoFrame) -> float:
        # Raw streams (H.264 elementary streams, whatever their name) carry no timestamps: such
        # frames follow the one before at the stream's nominal rate.
        if frame.time is None:
            time = 0.0 if self._time is None else self._time + self._interval
        else:
            time = max(0.0, frame.time - self._origin)
        self._time = time
        return time

    def _frame_duration(self, frame: av.VideoFrame) -> float:
        if frame.duration and frame.time_base:
            return float(frame.duration * frame.time_base)
        return self._interval

    def _is_cut(self, frame: av.VideoFrame) -> bool:
        thumbnail = frame.reformat(width=_THUMBNAIL_SIDE, height=_THUMBNAIL_SIDE, format="gray",
                                   interpolation="AREA").to_ndarray().astype(np.int16)
        previous, self._thumbnail = self._thumbnail, thumbnail
        return previous is not None and float(np.abs(thumbnail - previous).mean()) / 255 > self._threshold


def _pixel_aspect(stream: av.VideoStream) -> Fraction:
    # Anamorphic video (DVD, HDV) stores narrow pixels that players stretch; the container's ratio
    # overrides the bitstream's, as in FFmpeg's own guess.
    aspect = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    return aspect if aspect and aspect > 0 else Fraction(1)


def _picture(frame: av.VideoFrame, pixel_aspect: Fraction, max_side: int) -> Image.Image:
    width, height = _display_size(frame.width, frame.height, pixel_aspect, max_side)
    image = frame.reformat(width=width, height=height, format="rgb24", interpolation="AREA").to_image()
    # Phones record portrait video as landscape with a rotation to apply on display. PIL turns
    # counterclockwise, as the display matrix angle counts.
    return image.rotate(frame.rotation, expand=True) if frame.rotation else image


def _display_size(width: int, height: int, pixel_aspect: Fraction, max_side: int) -> tuple[int, int]:
    shown_width = width * float(pixel_aspect)
    scale = min(1.0, max_side / max(shown_width, height))
    return max(1, round(shown_width * scale)), max(1, round(height * scale))


class _Soundtrack:
    """Mixes decoded audio to mono and resamples it as it comes, keeping only the result."""

    def __init__(self, origin: float, sample_rate: int) -> None:
        self.end = 0.0  # where the audio fed so far stops playing
        self._origin = origin
        self._rate = sample_rate
        self._start: float | None = None  # where the first audio frame plays
        self._chunks: list[np.ndarray] = []
        self._resampler: soxr.ResampleStream | None = None
        self._source_rate = 0

    def add(self, frame: av.AudioFrame) -> None:
        time = frame.time - self._origin if frame.time is not None else None
        if self._start is None:
            self._start = self.end = time or 0.0
        if frame.sample_rate != self._source_rate:  # a new resampler where a stream changes its rate
            self._flush()
            self._resampler = soxr.ResampleStream(frame.sample_rate, self._rate, 1, dtype="float32")
            self._source_rate = frame.sample_rate
        if time is not None and time - self.end > _AUDIO_GAP:  # skipped packets, or a paused recorder
            self._feed(np.zeros(round((time - self.end) * frame.sample_rate), np.float32))
        self._feed(_mono(frame))

    def wave(self, duration: float) -> np.ndarray:
        """The soundtrack from time 0 to `duration`: cut or padded with silence at both ends."""
        self._flush()
        wave = np.zeros(round(duration * self._rate), np.float32)
        position = round((self._start or 0.0) * self._rate)  # negative where audio starts before time 0
        for chunk in self._chunks:  # copied in place: no second copy of a long soundtrack at once
            low, high = max(position, 0), min(position + len(chunk), len(wave))
            if high > low:
                wave[low:high] = chunk[low - position:high - position]
            position += len(chunk)
        return wave

    def _feed(self, mono: np.ndarray) -> None:
        self._chunks.append(self._resampler.resample_chunk(mono))
        self.end += len(mono) / self._source_rate

    def _flush(self) -> None:
        if self._resampler is not None:
            self._chunks.append(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True))


def _mono(frame: av.AudioFrame) -> np.ndarray:
    """A frame's channels averaged, as float32 in [-1, 1] whatever the sample format."""
    samples = frame.to_ndarray()
    if not frame.format.is_planar:  # one row, channels interleaved
        samples = samples.reshape(-1, len(frame.layout.channels)).T
    if samples.dtype.kind == "u":  # 8-bit audio is unsigned, centred on 128
        samples = (samples.astype(np.float32) - 128) / 128
    elif samples.dtype.kind == "i":
        samples = samples.astype(np.float32) / 2 ** (8 * samples.itemsize - 1)
    return samples.mean(axis=0, dtype=np.float32)


def _ffmpeg_reason(error: av.FFmpegError) -> str:
    # strerror is FFmpeg's own text, without PyAV's errno and file name around it.
    text = (error.strerror or str(error)).strip()
    return text.splitlines()[0][:_REASON_CHARS] if text else type(error).__name__


def split_segments(video: Video, segment_seconds: float = DEFAULT_SEGMENT_SECONDS) -> list[VideoSegment]:
    """Cut a video into back-to-back segments of `segment_seconds`, the last one ending at its end.

    A tail shorter than a quarter of a segment (an encoder's padding, the last frames of a clip)
    joins the segment before it rather than standing alone. Each segment holds the frames whose
    time falls in it, or else the frame nearest to it, so that
    every segment has a picture; and the matching slice (a view) of the soundtrack.
    """
    if segment_seconds <= 0:
        raise ValueError(f"segment_seconds must be positive, got {segment_seconds}")
    count = max(1, math.ceil((video.duration - _TIME_TOLERANCE) / segment_seconds))
    if count > 1 and video.duration - (count - 1) * segment_seconds < segment_seconds / 4:
        count -= 1
    times = [frame.time for frame in video.frames]
    segments = []
    for index in range(count):
        start = index * segment_seconds
        end = video.duration if index == count - 1 else start + segment_seconds
        first = bisect.bisect_left(times, start)
        stop = len(times) if index == count - 1 else bisect.bisect_left(times, end)
        frames = video.frames[first:stop] or _nearest_frame(video.frames, first, start, end)
        segments.append(VideoSegment(start, end, frames, _audio_slice(video, start, end)))
    return segments


def _nearest_frame(frames: list[VideoFrame], following: int, start: float, end: float) -> list[VideoFrame]:
    """The frame closest to [start, end), which holds none: the one before it or `frames[following]`."""
    candidates = frames[max(0, following - 1):following + 1]
    nearest = min(candidates, key=lambda frame: max(start - frame.time, frame.time - end), default=None)
    return [nearest] if nearest is not None else []


def _audio_slice(video: Video, start: float, end: float) -> np.ndarray | None:
    if video.audio is None:
        return None
    return video.audio[round(start * video.sample_rate):round(end * video.sample_rate)]
