"""Decode audio files into mono waves at an encoder's rate, and cut them into fixed windows."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

from ..core.errors import OverCapError
from ..core.types import DEFAULT_MAX_AUDIO_SECONDS

MIN_AUDIO_SECONDS = 0.1
DEFAULT_WINDOW_SECONDS = 5.0
SILENCE_PEAK = 1e-4  # -80 dBFS

_BLOCK_SAMPLES = 1 << 18  # per read over all channels (1 MiB), whatever channel count a header claims
_REASON_CHARS = 200
# libsndfile's MPEG decoder reports "mpg123 found no stream" as SFE_BAD_FILE, whose text ("File does
# not exist or is not a regular file") would mislead: the file was opened, by us, before libsndfile saw it.
_SFE_BAD_FILE = 7


class AudioDecodeError(ValueError):
    """Why an audio file cannot be used, in one line (shown as `skipped PATH: <message>`)."""


class AudioTooLongError(AudioDecodeError, OverCapError):
    """A sound longer than the cap."""

    parameter = "max_audio_seconds"


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; windows compare by identity
class AudioWindow:
    """A stretch of a wave: `start` and `end` in seconds, `samples` a view into the wave."""

    start: float
    end: float
    samples: np.ndarray


def load_audio(source: str | Path | BinaryIO, sample_rate: int,
               max_seconds: float = DEFAULT_MAX_AUDIO_SECONDS) -> np.ndarray:
    """Decode to mono float32 at `sample_rate` (channels averaged, resampled with soxr).

    `source` is a path or a seekable binary file object read from its current position.
    Raises AudioDecodeError with a one-line reason for anything that is not usable audio.
    """
    try:
        with binary_stream(source) as stream, _without_decoder_chatter():
            mono, rate = _decode_mono(stream, max_seconds)
    except OSError as error:  # missing, a folder, no permission, or a failing disk
        raise AudioDecodeError(f"cannot read ({error.strerror or type(error).__name__})") from None
    _check_samples(mono, rate)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate)
    return np.ascontiguousarray(mono, dtype=np.float32)


# libmpg123, inside libsndfile, writes its notes on damaged MP3 frames ("Note: Trying to resync...",
# "[src/libmpg123/layer3.c:...] error: ...", "Warning: Xing stream size off...") straight to file
# descriptor 2, with no switch to turn them off; the decode error or the wave is what counts.
_CHATTER = (b"[src/libmpg123/", b"Note: ", b"Warning: ")
_chatter_lock = threading.Lock()
_chatter_filter: list = []  # [decodes running, saved stderr fd, read end, forwarding thread]


@contextlib.contextmanager
def _without_decoder_chatter() -> Iterator[None]:
    """While any thread decodes, route file descriptor 2 through a filter that drops libmpg123's
    lines and passes everything else (a progress bar, other warnings) on, as it comes."""
    with _chatter_lock:
        if not _chatter_filter:
            with contextlib.suppress(OSError):  # no stderr to filter: nothing to hide either
                _chatter_filter[:] = [0, *_start_filter()]
        filtering = bool(_chatter_filter)
        if filtering:
            _chatter_filter[0] += 1
    try:
        yield
    finally:
        if filtering:
            with _chatter_lock:
                _chatter_filter[0] -= 1
                if not _chatter_filter[0]:
                    _stop_filter(*_chatter_filter[1:])
                    _chatter_filter.clear()


def _start_filter() -> tuple[int, int, threading.Thread]:
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    thread = threading.Thread(target=_forward, args=(read_end, saved), daemon=True)
    thread.start()
    return saved, read_end, thread


def _stop_filter(saved: int, read_end: int, thread: threading.Thread) -> None:
    import sys

    sys.stderr.flush()
    os.dup2(saved, 2)  # closes the pipe's last write end: the thread drains it, then stops
    thread.join()
    os.close(read_end)
    os.close(saved)


def _forward(read_end: int, target: int) -> None:
    pending = b""
    while chunk := os.read(read_end, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not line.startswith(_CHATTER))
        if pending and not any(p.startswith(pending) or pending.startswith(p) for p in _CHATTER):
            kept, pending = kept + pending, b""  # a progress bar redraws without a newline
        if kept:
            os.write(target, kept)
    if pending and not pending.startswith(_CHATTER):
        os.write(target, pending)


def binary_stream(source: str | Path | BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    # Paths are opened here rather than by libsndfile: Python's errors name the real cause, and
    # libsndfile then probes the content alone instead of trusting the file's suffix.
    if isinstance(source, str | os.PathLike):
        return open(source, "rb")
    return contextlib.nullcontext(source)  # the caller's object: not ours to close


def _decode_mono(stream: BinaryIO, max_seconds: float) -> tuple[np.ndarray, int]:
    """Read the header, refuse long files before decoding them, then decode and mix to mono."""
    if is_empty_stream(stream):
        raise AudioDecodeError("empty file")
    with _open_sound(stream) as sound:
        _check_duration(sound.frames / sound.samplerate, max_seconds)
        try:
            return _read_mono(sound), sound.samplerate
        except (RuntimeError, ValueError) as error:
            raise AudioDecodeError(f"corrupt or truncated audio ({_libsndfile_reason(error)})") from None


def is_empty_stream(stream: BinaryIO) -> bool:
    start = stream.tell()
    end = stream.seek(0, io.SEEK_END)
    stream.seek(start)
    return end == start


def _open_sound(stream: BinaryIO) -> sf.SoundFile:
    try:
        return sf.SoundFile(stream)
    except RuntimeError as error:  # soundfile.LibsndfileError and its kin
        reason = _libsndfile_reason(error)
        raise AudioDecodeError(f"not a readable audio file or unsupported codec ({reason})") from None


def _read_mono(sound: sf.SoundFile) -> np.ndarray:
    # Mixing block by block keeps only the mono wave in memory, not every channel of the whole file.
    # soundfile never reads past the frame count in the header, so the duration check bounds memory too.
    # A truncated file whose decoder simply stops early yields what it decoded; that is checked like any
    # other wave (length, silence, finiteness), and a decoder error in the middle raises instead.
    blocks = [block.mean(axis=1, dtype=np.float32) for block in _blocks(sound)]
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def _blocks(sound: sf.SoundFile) -> Iterator[np.ndarray]:
    # Not SoundFile.blocks: on a short read it yields stale buffer contents instead of stopping.
    frames = max(1, _BLOCK_SAMPLES // sound.channels)
    while len(block := sound.read(frames, dtype="float32", always_2d=True)):
        yield block


def _check_duration(seconds: float, max_seconds: float) -> None:
    if seconds > max_seconds:
        length, limit = format_durations(seconds, max_seconds)
        raise AudioTooLongError(f"too long ({length}; the limit is {limit}, raise it with "
                               "`max_audio_seconds`)")


def _check_samples(mono: np.ndarray, rate: int) -> None:
    seconds = len(mono) / rate
    if seconds < MIN_AUDIO_SECONDS:
        length, least = format_durations(seconds, MIN_AUDIO_SECONDS)
        raise AudioDecodeError(f"too short ({length}; needs at least {least})")
    if not np.isfinite(mono).all():
        raise AudioDecodeError("damaged samples (NaN or infinite values)")
    if float(np.max(np.abs(mono))) < SILENCE_PEAK:
        raise AudioDecodeError("silent (nothing above -80 dBFS)")


def format_duration(seconds: float) -> str:
    """A duration as a person reads it: '0.02 s', '12.5 s', '3.5 min', '2.0 h'."""
    if seconds < 1:
        return f"{seconds:.2g} s"
    if seconds < 60:
        return f"{round(seconds, 1):g} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_durations(*seconds: float) -> list[str]:
    """Durations as `format_duration` shows them, unless it shows two that differ alike ("1.0 h;
    the limit is 1.0 h"): then all in seconds, with as many decimals as tell them apart."""
    shown = [format_duration(s) for s in seconds]
    places = 0
    while len(set(shown)) < len(set(seconds)) and places <= 6:
        shown = [_in_seconds(s, places) for s in seconds]
        places += 1
    return shown


def _in_seconds(seconds: float, places: int) -> str:
    text = f"{seconds:.{places}f}"
    return (text.rstrip("0").rstrip(".") if "." in text else text) + " s"


def _libsndfile_reason(error: Exception) -> str:
    if getattr(error, "code", None) == _SFE_BAD_FILE:
        return "no decodable audio stream found"
    # error_string is libsndfile's own text, without soundfile's "Error opening <object repr>: " prefix.
    text = getattr(error, "error_string", None) or str(error)
    return _first_line(text.removeprefix("Error : "))


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:_REASON_CHARS] if lines else "no details"


def split_windows(wave: np.ndarray, sample_rate: int,
                  window_seconds: float = DEFAULT_WINDOW_SECONDS) -> list[AudioWindow]:
    """Cut a wave into back-to-back windows of `window_seconds`.

    A wave no longer than one window is one window. Otherwise a shorter tail is not a window of
    its own: the last window is aligned to the end of the wave, overlapping the one before, so that
    every window has full length (uniform batches, no near-empty tail embeddings).
    """
    if window_seconds <= 0:
        raise ValueError(f"window_seconds must be positive, got {window_seconds}")
    size = max(1, round(window_seconds * sample_rate))
    total = len(wave)
    if total <= size:
        return [_window(wave, 0, total, sample_rate)] if total else []
    starts = list(range(0, total - size + 1, size))
    if starts[-1] + size < total:
        starts.append(total - size)
    return [_window(wave, start, start + size, sample_rate) for start in starts]


def _window(wave: np.ndarray, start: int, end: int, sample_rate: int) -> AudioWindow:
    return AudioWindow(round(start / sample_rate, 3), round(end / sample_rate, 3), wave[start:end])
