"""Test support: synthetic video clips whose segments each show one shape class and play its sound."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from support.sounds import SOUND_RATE, render_sound
from support.tiny_model import render_shape

FPS = 10
SEGMENT = 4.0


def write_clip(path: Path, video_codec: str, audio_codec: str, classes: list[tuple[str, str]],
               seed: int) -> Path:
    """Each class for SEGMENT seconds: its render on screen (a new render every second) and its sound."""
    rng = np.random.default_rng(seed)
    sound = np.concatenate([render_sound(c, s, rng, seconds=SEGMENT) for c, s in classes])
    with av.open(str(path), "w") as container:
        video = container.add_stream(video_codec, rate=FPS)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        audio = container.add_stream(audio_codec, rate=48000 if audio_codec == "libopus" else SOUND_RATE)
        audio.layout = "mono"
        for color, shape in classes:
            for _ in range(int(SEGMENT)):
                picture = np.asarray(render_shape(color, shape, rng))
                for _ in range(FPS):
                    container.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(video.encode(None))
        if audio_codec == "libopus":  # opus takes 48 kHz only
            sound = np.interp(np.arange(len(sound) * 3) / 3, np.arange(len(sound)), sound).astype(np.float32)
        for start in range(0, len(sound), 1024):
            frame = av.AudioFrame.from_ndarray(sound[None, start:start + 1024], format="flt", layout="mono")
            frame.sample_rate = audio.rate
            frame.pts, frame.time_base = start, Fraction(1, audio.rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))
    return path
