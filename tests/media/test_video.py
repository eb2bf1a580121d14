"""Tests for retrieval.media.video on clips encoded here with PyAV: a square moving across a plain field."""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from support.sounds import dominant_frequency, rms

from retrieval.media.video import Video, VideoDecodeError, VideoFrame, read_video, split_segments

WIDTH, HEIGHT, FPS, SECONDS = 64, 48, 10, 6.0
FRAMES = round(FPS * SECONDS)
BACKGROUND, BRIGHT = (40, 40, 40), (200, 200, 200)
SHAPE, SIDE, SHAPE_TOP = (230, 40, 40), 10, 19
LOW, HIGH = 440.0, 880.0  # the tone in the first and in the second half
LEFT, RIGHT = 0.6, 0.2  # the tone's amplitude in each channel; the mono mix is their mean
RATE = 16000
CUT_FRAME = 23  # where the background turns bright in the clip with a cut

# container -> (video codec, pixel format, audio codec, audio rate): each rate differs from RATE but one
CONTAINERS = {
    "mp4": ("libx264", "yuv420p", "aac", 22050),
    "webm": ("libvpx-vp9", "yuv420p", "libopus", 48000),
    "mkv": ("mpeg4", "yuv420p", "flac", 44100),
    "mov": ("mjpeg", "yuvj420p", "pcm_s16le", 16000),
}


def shape_left(index: int) -> int:
    return 2 + round(index * 0.8)  # 8 px a second, from x=2 to x=49


def shape_centre(index: int) -> tuple[float, float]:
    return shape_left(index) + (SIDE - 1) / 2, SHAPE_TOP + (SIDE - 1) / 2


def picture(index: int, background: tuple[int, int, int] = BACKGROUND) -> np.ndarray:
    pixels = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    pixels[:] = background
    left = shape_left(index)
    pixels[SHAPE_TOP:SHAPE_TOP + SIDE, left:left + SIDE] = SHAPE
    return pixels


def stereo_tones(rate: int) -> np.ndarray:
    t = np.arange(round(SECONDS * rate)) / rate
    tone = np.sin(2 * np.pi * np.where(t < SECONDS / 2, LOW, HIGH) * t).astype(np.float32)
    return np.stack([LEFT * tone, RIGHT * tone])


def write_clip(path: Path, video_codec: str = "mpeg4", pixel_format: str = "yuv420p",
               audio_codec: str | None = None, audio_rate: int = RATE,
               background: Callable[[int], tuple[int, int, int]] = lambda index: BACKGROUND,
               audio_gap: tuple[float, float] | None = None, container_format: str | None = None) -> Path:
    """Encode the moving square, with the two tones in stereo if `audio_codec` is given.

    Audio packets playing within `audio_gap` (start, end) are left out, leaving a hole in the timestamps.
    """
    with av.open(str(path), "w", format=container_format) as container:
        video = container.add_stream(video_codec, rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, pixel_format
        audio = add_audio(container, audio_codec, audio_rate) if audio_codec else None
        for index in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(picture(index, background(index)), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio:
            container.mux([packet for packet in encode_tones(audio, audio_rate)
                           if not audio_gap or not audio_gap[0] <= packet.pts / audio_rate < audio_gap[1]])
    return path


def add_audio(container: av.container.OutputContainer, codec: str, rate: int) -> av.AudioStream:
    stream = container.add_stream(codec, rate=rate)
    stream.layout = "stereo"
    return stream


def encode_tones(stream: av.AudioStream, rate: int) -> list[av.Packet]:
    tones = stereo_tones(rate)
    packets = []
    for start in range(0, tones.shape[1], 1024):  # PyAV's encoder re-frames to the codec's frame size
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tones[:, start:start + 1024]),
                                           format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        packets += stream.encode(frame)
    return packets + stream.encode(None)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """One clip with sound per container."""
    folder = tmp_path_factory.mktemp("clips")
    return {name: write_clip(folder / f"clip.{name}", *codecs) for name, codecs in CONTAINERS.items()}


@pytest.fixture(scope="module")
def silent_clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("silent") / "silent.mp4")


def coloured_centroid(image: Image.Image) -> tuple[float, float]:
    pixels = np.asarray(image).astype(int)
    ys, xs = np.nonzero((pixels[..., 0] > 150) & (pixels[..., 1] < 110))
    return float(xs.mean()), float(ys.mean())


def stretch(wave: np.ndarray, start: float, end: float) -> np.ndarray:
    return wave[round(start * RATE):round(end * RATE)]


def short_message(error: pytest.ExceptionInfo) -> str:
    # The reason is shown to a user as `skipped PATH: <message>`: one line, no traceback dump.
    message = str(error.value)
    assert message and "\n" not in message and len(message) < 250
    return message


# --- decoding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("container", CONTAINERS)
def test_each_container_decodes_frames_at_their_times_and_the_soundtrack(clips, container):
    video = read_video(clips[container], frame_rate=3, sample_rate=RATE)

    assert abs(video.duration - SECONDS) <= 1 / FPS
    # Each sampling time k/3 s takes the first frame at or after it, on the clip's 0.1 s grid.
    expected = [math.ceil(k * FPS / 3 - 1e-9) / FPS for k in range(round(SECONDS * 3))]
    assert [frame.time for frame in video.frames] == pytest.approx(expected, abs=1e-3)
    for frame in video.frames:
        index = round(frame.time * FPS)
        assert frame.image.mode == "RGB" and frame.image.size == (WIDTH, HEIGHT)
        assert coloured_centroid(frame.image) == pytest.approx(shape_centre(index), abs=1.5)
        pixels = np.asarray(frame.image).astype(int)
        assert np.abs(pixels[2, 2] - BACKGROUND).max() <= 8
        assert np.abs(pixels[24, shape_left(index) + 5] - SHAPE).max() <= 30

    wave = video.audio
    assert video.sample_rate == RATE and wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) == round(video.duration * RATE)  # the soundtrack spans the video exactly
    assert dominant_frequency(stretch(wave, 0.5, 2.5), RATE) == pytest.approx(LOW, abs=2)
    assert dominant_frequency(stretch(wave, 3.5, 5.5), RATE) == pytest.approx(HIGH, abs=2)
    # Channels are averaged, as for audio files (FFmpeg's own downmix would give (L + R) / sqrt(2)).
    assert rms(stretch(wave, 0.5, 2.5)) == pytest.approx((LEFT + RIGHT) / 2 / math.sqrt(2), rel=0.1)


def test_frames_are_taken_every_interval_from_the_first_one(clips):
    video = read_video(clips["mkv"], frame_rate=0.5)

    assert [frame.time for frame in video.frames] == pytest.approx([0.0, 2.0, 4.0], abs=1e-3)


def test_a_scene_cut_between_samples_yields_a_frame(tmp_path):
    path = write_clip(tmp_path / "cut.mp4", "libx264",
                      background=lambda index: BRIGHT if index >= CUT_FRAME else BACKGROUND)

    sampled = read_video(path, frame_rate=0.25)
    with_cuts = read_video(path, frame_rate=0.25, scene_threshold=0.3)

    assert [frame.time for frame in sampled.frames] == pytest.approx([0.0, 4.0], abs=1e-3)
    # The moving square changes each picture a little; only the cut crosses the threshold.
    assert [frame.time for frame in with_cuts.frames] == pytest.approx([0.0, CUT_FRAME / FPS, 4.0], abs=1e-3)
    assert np.abs(np.asarray(with_cuts.frames[1].image)[2, 2].astype(int) - BRIGHT).max() <= 8


def test_frames_are_scaled_down_to_max_side_keeping_their_shape(clips):
    video = read_video(clips["mp4"], max_side=32)

    assert all(frame.image.size == (32, 24) for frame in video.frames)


def test_narrow_pixels_are_stretched_as_a_player_shows_them(tmp_path):
    path = tmp_path / "anamorphic.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH // 2, HEIGHT, "yuv420p"
        stream.codec_context.sample_aspect_ratio = Fraction(2, 1)  # each stored pixel is shown twice as wide
        for index in range(5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture(index)[:, ::2], format="rgb24")))
        container.mux(stream.encode(None))

    assert read_video(path).frames[0].image.size == (WIDTH, HEIGHT)


def test_portrait_phone_video_is_turned_upright(silent_clip, tmp_path):
    # Phones store portrait video as landscape pictures plus a display matrix turning them 90° clockwise
    # (in the track header, 16.16 fixed point: a, b, u, c, d, v, x, y, w).
    data = bytearray(silent_clip.read_bytes())
    header = data.index(b"tkhd")
    assert data[header + 4] == 0  # version 0: the matrix follows 40 bytes of fields
    data[header + 44:header + 80] = struct.pack(">9i", 0, 1 << 16, 0, -1 << 16, 0, 0, 0, 0, 1 << 30)
    path = tmp_path / "portrait.mp4"
    path.write_bytes(data)

    frame = read_video(path).frames[0]

    assert frame.image.size == (HEIGHT, WIDTH)
    x, y = shape_centre(0)  # turned clockwise, (x, y) lands at (HEIGHT - 1 - y, x)
    assert coloured_centroid(frame.image) == pytest.approx((HEIGHT - 1 - y, x), abs=1.5)


def test_a_video_without_audio_has_no_soundtrack(silent_clip):
    video = read_video(silent_clip)

    assert video.audio is None and len(video.frames) == 6


@pytest.mark.parametrize("gap", [(1.0, 1.5), (0.0, 0.5)])  # in the middle; before the audio starts
def test_a_gap_in_the_audio_is_silence_and_keeps_the_sound_under_its_pictures(tmp_path, gap):
    path = write_clip(tmp_path / "gap.mkv", audio_codec="flac", audio_rate=44100, audio_gap=gap)

    wave = read_video(path).audio

    assert rms(stretch(wave, gap[0] + 0.1, gap[1] - 0.1)) < 1e-3 and rms(stretch(wave, 1.6, 2.0)) > 0.1
    # The tone still changes at half time: the audio after the gap was not pulled earlier.
    assert dominant_frequency(stretch(wave, 2.8, 2.95), RATE) == pytest.approx(LOW, abs=10)
    assert dominant_frequency(stretch(wave, 3.05, 3.2), RATE) == pytest.approx(HIGH, abs=10)


def test_damaged_packets_cost_their_frames_not_the_video(clips, tmp_path):
    data = bytearray(clips["mp4"].read_bytes())
    data[len(data) // 3:len(data) // 3 + 2000] = bytes(2000)
    path = tmp_path / "damaged.mp4"
    path.write_bytes(data)

    video = read_video(path)

    assert video.frames[0].time == 0 and video.frames[-1].time >= 5
    assert abs(video.duration - SECONDS) <= 1 / FPS and len(video.audio) == round(video.duration * RATE)


def test_a_raw_stream_without_timestamps_is_timed_by_its_frame_rate(tmp_path):
    # An H.264 elementary stream, whatever its name, has no container clock: frames come untimed.
    path = write_clip(tmp_path / "raw.mp4", "libx264", container_format="h264")

    video = read_video(path, frame_rate=2)

    assert [frame.time for frame in video.frames] == pytest.approx([k / 2 for k in range(12)], abs=1e-3)
    assert video.duration == pytest.approx(SECONDS)


def test_reading_a_file_object_equals_reading_the_path(clips):
    from_path = read_video(clips["webm"], scene_threshold=0.05)
    with open(clips["webm"], "rb") as file:
        from_bytes = read_video(io.BytesIO(file.read()), scene_threshold=0.05)

    assert from_bytes.duration == from_path.duration
    assert [frame.time for frame in from_bytes.frames] == [frame.time for frame in from_path.frames]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image))
               for a, b in zip(from_bytes.frames, from_path.frames))
    assert np.array_equal(from_bytes.audio, from_path.audio)


# --- refusals -----------------------------------------------------------------------------------

def _audio_only_mp4(path: Path) -> None:
    with av.open(str(path), "w") as container:
        container.mux(encode_tones(add_audio(container, "aac", 22050), 22050))


@pytest.mark.parametrize("name,make,reason", [
    ("empty.mp4", lambda path: path.write_bytes(b""), "empty file"),
    ("noise.mp4", lambda path: path.write_bytes(np.random.default_rng(0).bytes(5000)),
     "not a readable video file (Invalid data found when processing input)"),
    ("notes.webm", lambda path: path.write_text("a shopping list, not a video\n" * 20),
     "not a readable video file (Invalid data found when processing input)"),
    ("song.mp4", _audio_only_mp4, "no video stream"),
    ("missing.mp4", lambda path: None, "cannot read (No such file or directory)"),
    ("folder.mp4", os.mkdir, "cannot read (Is a directory)"),
])
def test_unusable_files_are_refused_with_a_reason(tmp_path, name, make, reason):
    path = tmp_path / name
    make(path)

    with pytest.raises(VideoDecodeError) as error:
        read_video(path)

    assert short_message(error) == reason


def test_a_file_cut_short_before_its_index_is_refused(clips, tmp_path):
    # FFmpeg writes the mp4 index (moov) last: without it, nothing can be found in the data.
    path = tmp_path / "cut.mp4"
    path.write_bytes(clips["mp4"].read_bytes()[:20000])

    with pytest.raises(VideoDecodeError) as error:
        read_video(path)

    assert short_message(error).startswith("not a readable video file")


def test_a_video_longer_than_the_limit_is_refused_before_decoding(clips):
    with pytest.raises(VideoDecodeError) as error:
        read_video(clips["mkv"], max_seconds=2)

    assert short_message(error) == "too long (6 s; the limit is 2 s, raise it with `max_video_seconds`)"


def test_a_video_without_a_declared_length_is_refused_once_it_runs_past_the_limit(tmp_path):
    path = write_clip(tmp_path / "raw.mp4", "libx264", container_format="h264")

    with pytest.raises(VideoDecodeError) as error:
        read_video(path, max_seconds=1)

    assert short_message(error) == "too long (runs past the 1 s limit, raise it with `max_video_seconds`)"


@pytest.mark.parametrize("options,message", [
    ({"frame_rate": 0}, "must be positive"),
    ({"max_side": -1}, "must be positive"),
    ({"scene_threshold": 1.5}, "scene_threshold must be within 0..1"),
])
def test_meaningless_options_are_refused(clips, options, message):
    with pytest.raises(ValueError, match=message) as error:
        read_video(clips["mp4"], **options)

    assert not isinstance(error.value, VideoDecodeError)  # a caller's mistake, not a bad file


# --- segments -----------------------------------------------------------------------------------

def synthetic_video(duration: float, times: list[float], rate: int = 100) -> Video:
    """Frames at `times`; the soundtrack's samples count up, so a slice tells where it was cut."""
    image = Image.new("RGB", (4, 4))
    audio = np.arange(round(duration * rate), dtype=np.float32)
    return Video(duration, [VideoFrame(time, image) for time in times], audio, rate)


@pytest.mark.parametrize("duration,bounds", [
    (6.0, [(0, 4), (4, 6)]),
    (1.5, [(0, 1.5)]),
    (8.0004, [(0, 4), (4, 8.0004)]),  # clock rounding makes no sliver of a segment
    (9.5, [(0, 4), (4, 8), (8, 9.5)]),
    (8.5, [(0, 4), (4, 8.5)]),  # a tail under a quarter segment joins the one before
])
def test_segments_are_back_to_back_and_the_last_ends_with_the_video(duration, bounds):
    segments = split_segments(synthetic_video(duration, [0.0]), 4.0)

    # pytest.approx takes a flat sequence of numbers (pytest 9 refuses nested ones).
    ends = [end for segment in segments for end in (segment.start, segment.end)]
    assert ends == pytest.approx([end for pair in bounds for end in pair])


def test_segments_hold_their_own_frames_and_slice_of_sound():
    video = synthetic_video(6.0, [k / 2 for k in range(12)])

    segments = split_segments(video, 4.0)

    assert [[frame.time for frame in segment.frames] for segment in segments] == [
        [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5], [4.0, 4.5, 5.0, 5.5]]
    for segment in segments:
        assert segment.audio[0] == segment.start * 100
        assert len(segment.audio) == (segment.end - segment.start) * 100
        assert np.shares_memory(segment.audio, video.audio)  # a view, not a copy


def test_a_segment_without_a_frame_takes_the_nearest_one():
    segments = split_segments(synthetic_video(6.0, [0.0, 5.0]), 2.0)  # one frame every 5 s

    # [2, 4) is 2 s after the frame at 0 and 1 s before the one at 5.
    assert [[frame.time for frame in segment.frames] for segment in segments] == [[0.0], [5.0], [5.0]]


def test_segments_of_a_decoded_video(clips):
    video = read_video(clips["mov"], frame_rate=2)

    first, second = split_segments(video, 4.0)

    assert (first.start, first.end, second.start, second.end) == (0, 4, 4, pytest.approx(SECONDS))
    assert all(0 <= frame.time < 4 for frame in first.frames) and len(first.frames) == 8
    assert all(4 <= frame.time <= SECONDS for frame in second.frames) and len(second.frames) == 4
    assert dominant_frequency(first.audio, RATE) == pytest.approx(LOW, abs=2)  # 3 s of low, 1 s of high
    assert dominant_frequency(second.audio, RATE) == pytest.approx(HIGH, abs=2)


def test_segment_length_must_be_positive():
    with pytest.raises(ValueError, match="segment_seconds must be positive"):
        split_segments(synthetic_video(6.0, [0.0]), 0)
