"""Tests for retrieval.media.audio and the sounds of tests/support/sounds.py; all files made in tmp_path."""

from __future__ import annotations

import io
import itertools
import os
import struct

import numpy as np
import pytest
import soundfile as sf
from support.sounds import PITCHES, SOUND_RATE, dominant_frequency, render_sound, rms, write_sound

from retrieval.media.audio import (
    AudioDecodeError,
    _without_decoder_chatter,
    format_durations,
    load_audio,
    split_windows,
)

TONE = 440.0
SOURCE_RATE = 22050
RATE = 16000
LEFT, RIGHT = 0.6, 0.3  # amplitudes of the same tone in each channel; their mix is 0.45
SHAPES = ("circle", "square", "triangle")


def sine(frequency: float, seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * frequency * t)).astype(np.float32)


def stereo_tone(seconds: float = 1.0) -> np.ndarray:
    tone = sine(TONE, seconds, SOURCE_RATE, amplitude=1.0)
    return np.stack([LEFT * tone, RIGHT * tone], axis=1)


def short_message(error: pytest.ExceptionInfo) -> str:
    # The reason is shown to a user as `skipped PATH: <message>`: one line, no traceback dump.
    message = str(error.value)
    assert message and "\n" not in message and len(message) < 250
    return message


# --- formats ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext,length_tolerance", [
    ("wav", 0.005), ("flac", 0.005), ("ogg", 0.005),
    ("mp3", 0.06),  # encoder padding the decoder may not strip
])
def test_each_format_decodes_to_mono_at_the_asked_rate(tmp_path, ext, length_tolerance):
    path = write_sound(tmp_path / "nested" / f"tone.{ext}", stereo_tone(), SOURCE_RATE)

    wave = load_audio(path, RATE)

    assert wave.dtype == np.float32 and wave.ndim == 1 and wave.flags.c_contiguous
    assert abs(len(wave) / RATE - 1.0) <= length_tolerance
    assert dominant_frequency(wave, RATE) == pytest.approx(TONE, rel=0.02)
    # Channels are averaged, not one of them taken: a sine of amplitude A has RMS A / sqrt(2).
    assert rms(wave) == pytest.approx((LEFT + RIGHT) / 2 / np.sqrt(2), rel=0.1)
    np.testing.assert_array_equal(load_audio(io.BytesIO(path.read_bytes()), RATE), wave)


def test_resampling_keeps_the_pitch(tmp_path):
    path = tmp_path / "high.wav"
    sf.write(path, sine(1000.0, 1.0, 48000), 48000)

    wave = load_audio(path, RATE)

    assert len(wave) == RATE
    assert dominant_frequency(wave, RATE) == pytest.approx(1000.0, rel=0.01)


def test_a_file_at_the_asked_rate_is_returned_unchanged(tmp_path):
    written = np.random.default_rng(0).uniform(-0.5, 0.5, RATE).astype(np.float32)
    path = tmp_path / "native.wav"
    sf.write(path, written, RATE, subtype="FLOAT")

    np.testing.assert_array_equal(load_audio(path, RATE), written)


# --- windows ------------------------------------------------------------------------------------

def test_long_wave_windows_are_full_length_with_the_last_aligned_to_the_end():
    wave = np.arange(12 * RATE, dtype=np.float32)

    windows = split_windows(wave, RATE, window_seconds=5.0)

    assert [(w.start, w.end) for w in windows] == [(0.0, 5.0), (5.0, 10.0), (7.0, 12.0)]
    for window in windows:
        start, end = round(window.start * RATE), round(window.end * RATE)
        np.testing.assert_array_equal(window.samples, wave[start:end])


def test_an_exact_multiple_has_no_extra_window():
    windows = split_windows(np.ones(10 * RATE, dtype=np.float32), RATE, window_seconds=5.0)

    assert [(w.start, w.end) for w in windows] == [(0.0, 5.0), (5.0, 10.0)]


def test_a_wave_shorter_than_a_window_is_one_window():
    wave = np.ones(3 * RATE, dtype=np.float32)

    [window] = split_windows(wave, RATE, window_seconds=5.0)

    assert (window.start, window.end) == (0.0, 3.0)
    np.testing.assert_array_equal(window.samples, wave)


def test_an_empty_wave_has_no_windows_and_a_window_must_have_length():
    assert split_windows(np.zeros(0, dtype=np.float32), RATE) == []
    with pytest.raises(ValueError, match="window_seconds"):
        split_windows(np.ones(RATE, dtype=np.float32), RATE, window_seconds=0.0)


# --- unusable audio -----------------------------------------------------------------------------

def wav_with_format_tag(tag: int) -> bytes:
    """A well-formed RIFF/WAVE file written by hand, declaring codec `tag` for its data."""
    data = bytes(3200)
    fmt = struct.pack("<HHIIHH", tag, 1, RATE, 2 * RATE, 2, 16)
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return kind + struct.pack("<I", len(payload)) + payload

    return chunk(b"RIFF", b"WAVE" + chunk(b"fmt ", fmt) + chunk(b"data", data))


def wav_bytes(wave: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def flac_bytes(wave: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, rate, format="FLAC")
    return buffer.getvalue()


def with_nan(wave: np.ndarray) -> np.ndarray:
    wave = wave.copy()
    wave[100] = np.nan
    return wave


TONE_1S = sine(TONE, 1.0, RATE)
BAD_FILES = {  # name -> (file name, bytes, max_seconds, expected message)
    "empty": ("empty.wav", b"", 3600, "empty file"),
    "random bytes": ("noise.wav", np.random.default_rng(1).bytes(4000), 3600,
                     "not a readable audio file or unsupported codec ("),
    "text named mp3": ("notes.mp3", b"shopping list: milk, eggs, bread\n" * 20, 3600,
                       "not a readable audio file or unsupported codec (Format not recognised.)"),
    "truncated header": ("cut.wav", wav_bytes(TONE_1S)[:20], 3600,
                         "not a readable audio file or unsupported codec (Error in WAV/W64/RF64 file."),
    "unknown codec": ("odd.wav", wav_with_format_tag(0x1234), 3600,
                      "not a readable audio file or unsupported codec ("),
    "truncated in the middle": ("half.flac", (lambda b: b[:len(b) // 2])(flac_bytes(TONE_1S)), 3600,
                                "corrupt or truncated audio ("),
    "silent": ("quiet.wav", wav_bytes(np.zeros(RATE, dtype=np.float32)), 3600,
               "silent (nothing above -80 dBFS)"),
    "too short": ("blip.wav", wav_bytes(sine(TONE, 0.02, RATE)), 3600,
                  "too short (0.02 s; needs at least 0.1 s)"),
    "no frames": ("nothing.wav", wav_bytes(np.zeros(0, dtype=np.float32)), 3600,
                  "too short (0 s; needs at least 0.1 s)"),
    "too long": ("long.wav", wav_bytes(sine(TONE, 3.0, RATE)), 1.0,
                 "too long (3 s; the limit is 1 s, raise it with `max_audio_seconds`)"),
    "NaN samples": ("nan.wav", wav_bytes(with_nan(TONE_1S), subtype="FLOAT"), 3600,
                    "damaged samples (NaN or infinite values)"),
}


@pytest.mark.parametrize("from_bytes", [False, True], ids=["path", "BytesIO"])
@pytest.mark.parametrize("case", BAD_FILES)
def test_unusable_audio_is_refused_with_its_reason(tmp_path, case, from_bytes):
    name, content, max_seconds, expected = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(content)
    source = io.BytesIO(content) if from_bytes else path

    with pytest.raises(AudioDecodeError) as error:
        load_audio(source, RATE, max_seconds=max_seconds)

    assert short_message(error).startswith(expected)


@pytest.mark.parametrize("make,expected", [
    (lambda tmp: tmp / "missing.wav", "cannot read (No such file or directory)"),
    (lambda tmp: tmp, "cannot read (Is a directory)"),
])
def test_paths_that_cannot_be_read(tmp_path, make, expected):
    with pytest.raises(AudioDecodeError) as error:
        load_audio(make(tmp_path), RATE)

    assert short_message(error) == expected


def claim_length(flac: bytes, frames: int) -> bytes:
    """Rewrite the total-samples field of FLAC's STREAMINFO, leaving the audio itself as it was."""
    assert flac[:4] == b"fLaC"
    offset = 4 + 4 + 10  # marker, metadata block header, then block sizes and frame sizes
    packed = int.from_bytes(flac[offset:offset + 8], "big")  # rate:20 channels:3 bits:5 total:36
    packed = (packed >> 36 << 36) | frames
    return flac[:offset] + packed.to_bytes(8, "big") + flac[offset + 8:]


@pytest.mark.parametrize("claimed_seconds,max_seconds,expected", [
    (10 * 3600, 3600.0, "too long (10.0 h; the limit is 1.0 h, raise it with `max_audio_seconds`)"),
    (90, 60.0, "too long (1.5 min; the limit is 1.0 min, raise it with `max_audio_seconds`)"),
    # Once "too long (1.0 h; the limit is 1.0 h)": a length just over the limit reads as equal.
    (3601, 3600.0, "too long (3601 s; the limit is 3600 s, raise it with `max_audio_seconds`)"),
    (61, 60.0, "too long (61 s; the limit is 60 s, raise it with `max_audio_seconds`)"),
])
def test_length_is_refused_from_the_header_before_decoding(tmp_path, claimed_seconds, max_seconds, expected):
    # The file holds 1 s of audio but claims far more: only a header check can call it too long.
    path = tmp_path / "claims.flac"
    path.write_bytes(claim_length(flac_bytes(TONE_1S), claimed_seconds * RATE))
    assert sf.info(path).frames == claimed_seconds * RATE

    with pytest.raises(AudioDecodeError) as error:
        load_audio(path, RATE, max_seconds=max_seconds)

    assert short_message(error) == expected


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_damaged_files_give_audio_or_a_decode_error_and_nothing_else(tmp_path, ext):
    clean = write_sound(tmp_path / f"clean.{ext}", stereo_tone(), SOURCE_RATE).read_bytes()
    rng = np.random.default_rng(2)
    for _ in range(25):
        damaged = bytearray(clean)
        for position in rng.integers(0, len(damaged), size=rng.integers(1, 20)):
            damaged[position] = int(rng.integers(256))
        cut = int(rng.integers(len(damaged) // 4, len(damaged) + 1))
        try:
            wave = load_audio(io.BytesIO(bytes(damaged[:cut])), RATE)
        except AudioDecodeError as error:
            assert "\n" not in str(error)
        else:
            assert wave.dtype == np.float32 and np.isfinite(wave).all()


# --- synthetic sounds ---------------------------------------------------------------------------

def _filterbank(bands: int = 16, frame: int = 512, rate: int = SOUND_RATE) -> np.ndarray:
    """Overlapping triangular bands, evenly spaced in log frequency, so pitch jitter moves little energy."""
    frequencies = np.fft.rfftfreq(frame, 1 / rate)
    edges = np.geomspace(150.0, 7800.0, bands + 2)
    low, middle, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (frequencies - low) / (middle - low)
    falling = (high - frequencies) / (high - middle)
    return np.clip(np.minimum(rising, falling), 0.0, None)


FILTERBANK = _filterbank()


def sound_features(wave: np.ndarray, frame: int = 512) -> np.ndarray:
    """Band energies over time, averaged (pitch, timbre) and their spread (pulsing, sweeping)."""
    wave = wave[SOUND_RATE // 10:]  # past the latest onset a render may have
    wave = wave / np.sqrt(np.mean(np.square(wave)))  # loudness is not part of the class
    frames = wave[:len(wave) // frame * frame].reshape(-1, frame) * np.hanning(frame)
    bands = np.log10(np.abs(np.fft.rfft(frames, axis=1)) ** 2 @ FILTERBANK.T + 0.1)
    return np.concatenate([bands.mean(axis=0), bands.std(axis=0)])


def test_each_sound_class_is_closer_to_itself_than_to_any_other():
    rng = np.random.default_rng(3)
    classes = list(itertools.product(PITCHES, SHAPES))
    renders = {label: [sound_features(render_sound(*label, rng)) for _ in range(3)] for label in classes}

    for label in classes:
        within = max(np.linalg.norm(a - b) for a, b in itertools.combinations(renders[label], 2))
        between = min(np.linalg.norm(a - b) for other in classes if other != label
                      for a in renders[label] for b in renders[other])
        assert within < between, label


def test_renders_are_deterministic_varied_and_in_range():
    first = render_sound("green", "triangle", np.random.default_rng(4), seconds=0.5)
    again = render_sound("green", "triangle", np.random.default_rng(4), seconds=0.5)
    other = render_sound("green", "triangle", np.random.default_rng(5), seconds=0.5)

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32 and first.shape == (SOUND_RATE // 2,)
    assert np.abs(first).max() <= 1.0


def test_written_sounds_load_back(tmp_path):
    wave = render_sound("red", "circle", np.random.default_rng(6))

    loaded = load_audio(write_sound(tmp_path / "a" / "b" / "red_circle.flac", wave), SOUND_RATE)

    assert dominant_frequency(loaded, SOUND_RATE) == pytest.approx(PITCHES["red"], rel=0.04)


def test_durations_that_differ_read_differently():
    assert format_durations(3600.25, 3600) == ["3600.2 s", "3600 s"]
    assert format_durations(0.0999, 0.1) == ["0.0999 s", "0.1 s"]
    assert format_durations(7200, 3600) == ["2.0 h", "1.0 h"]


def test_libmpg123_says_nothing_on_stderr(tmp_path, capfd):
    """Its notes on a damaged MP3 ("Warning: Xing stream size off by more than 1%") once reached
    the terminal, beside the engine's own one-line warning."""
    clean = write_sound(tmp_path / "tone.mp3", sine(TONE, 2.0, SOURCE_RATE), SOURCE_RATE).read_bytes()
    rng = np.random.default_rng(0)
    damaged = [clean[: len(clean) // 2]]
    for _ in range(3):
        noisy = np.frombuffer(clean, np.uint8).copy()
        noisy[rng.integers(0, len(noisy), 20)] = rng.integers(0, 256, 20)
        damaged.append(noisy.tobytes())
    for data in damaged:
        try:
            load_audio(io.BytesIO(data), RATE)
        except AudioDecodeError:
            pass
    assert capfd.readouterr().err == ""


def test_other_output_passes_while_audio_decodes(capfd):
    with _without_decoder_chatter():
        os.write(2, b"Note: Trying to resync...\n")
        os.write(2, b"progress 50%\r")  # a progress bar drawn from another thread, say
        os.write(2, b"something else\n")
    assert capfd.readouterr().err == "progress 50%\rsomething else\n"
