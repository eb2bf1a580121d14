"""Synthetic captioned sounds for the 9 test classes: the colour sets the pitch, the shape the pattern.

circle = a steady tone, square = the tone pulsed on and off, triangle = a chirp from the pitch up an
octave. Each render draws its own pitch jitter, loudness, phase, onset and noise, so held-out renders
differ from training ones while every class stays recognisable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SOUND_RATE = 16000
PITCHES = {"red": 330.0, "green": 880.0, "blue": 2200.0}  # colour -> base frequency (Hz)

_HARMONIC_WEIGHTS = (1.0, 0.5, 0.25)
_NOISE_DB = -35.0
_MAX_ONSET_FRACTION = 0.1
_CHIRP_RATIO = 2.0  # a triangle sweeps from its pitch to twice it
_WRITE_BLOCK_FRAMES = 1 << 15


def render_sound(color: str, shape: str, rng: np.random.Generator, seconds: float = 1.0,
                 sample_rate: int = SOUND_RATE) -> np.ndarray:
    """One render of "a <color> <shape>" as float32 in [-1, 1]; deterministic for a given rng state."""
    pitch = PITCHES[color] * rng.uniform(0.97, 1.03)
    amplitude = rng.uniform(0.3, 0.8)
    phase = rng.uniform(0.0, 2 * np.pi)
    onset = rng.uniform(0.0, _MAX_ONSET_FRACTION * seconds)
    pulse_rate = rng.uniform(4.0, 6.0)
    total = round(seconds * sample_rate)
    t = np.arange(total) / sample_rate - onset  # time since the sound began; negative before it
    sounding = seconds - onset
    tone = _pattern(shape, t, pitch, phase, pulse_rate, sounding, sample_rate)
    wave = amplitude * np.where(t >= 0, tone, 0.0)
    wave += rng.normal(0.0, amplitude * 10 ** (_NOISE_DB / 20), total)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _pattern(shape: str, t: np.ndarray, pitch: float, phase: float, pulse_rate: float,
             sounding: float, sample_rate: int) -> np.ndarray:
    if shape == "circle":
        return _harmonics(2 * np.pi * pitch * t + phase, pitch, sample_rate)
    if shape == "square":
        gate = (pulse_rate * t) % 1.0 < 0.5
        return gate * _harmonics(2 * np.pi * pitch * t + phase, pitch, sample_rate)
    if shape == "triangle":
        # Linear sweep: instantaneous frequency pitch * (1 + (ratio - 1) * t / sounding).
        sweep = (_CHIRP_RATIO - 1) / (2 * sounding)
        angle = 2 * np.pi * pitch * (t + sweep * t**2) + phase
        return _harmonics(angle, pitch * _CHIRP_RATIO, sample_rate)
    raise ValueError(f"unknown shape {shape!r}")


def _harmonics(angle: np.ndarray, top_frequency: float, sample_rate: int) -> np.ndarray:
    """A tone with a few overtones, normalised to peak 1; those past Nyquist are left out (no aliasing)."""
    kept = [(k, w) for k, w in enumerate(_HARMONIC_WEIGHTS, start=1) if k * top_frequency < sample_rate / 2]
    return sum(w * np.sin(k * angle) for k, w in kept) / sum(w for _, w in kept)


def write_sound(path: Path, wave: np.ndarray, sample_rate: int = SOUND_RATE) -> Path:
    """Write `wave` in the format its suffix names (wav, flac, ogg, mp3), creating folders as needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 1 if wave.ndim == 1 else wave.shape[1]
    with sf.SoundFile(path, "w", samplerate=sample_rate, channels=channels) as sound:
        # Written a block at a time: libvorbis sizes a stack buffer by the frames handed to it in one
        # call, and a long OGG written whole overflows the stack (a segfault, not an exception).
        for start in range(0, len(wave), _WRITE_BLOCK_FRAMES):
            sound.write(wave[start:start + _WRITE_BLOCK_FRAMES])
    return path


def write_captioned_sounds(root: Path, seed: int = 1, per_class: int = 10) -> Path:
    """Training pairs in folder layout: each class's sounds, each with its caption file beside it."""
    from support.tiny_model import CLASSES, caption_for

    rng = np.random.default_rng(seed)
    for color, shape in CLASSES:
        for copy in range(per_class):
            stem = root / f"{color}_{shape}_{copy}"
            write_sound(stem.with_suffix(".wav"), render_sound(color, shape, rng))
            stem.with_suffix(".txt").write_text(caption_for(color, shape) + "\n")
    return root


def dominant_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[np.argmax(spectrum)])


def rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
