"""An index's encoders that note what they are asked to encode: the real (tiny) model does the
work, so a builder test sees which files and texts reached it without timing anything."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.context import Encoders


class RecordingClip:
    """A CLIP encoder that counts the images and keeps the texts it encodes."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.images = 0
        self.texts: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)

    def encode_image_tensors(self, pixels) -> np.ndarray:
        self.images += len(pixels)
        return self.encoder.encode_image_tensors(pixels)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += texts
        return self.encoder.encode_texts(texts)


class RecordingEncoders(Encoders):
    """`Encoders` whose CLIP model records its work (see RecordingClip)."""

    recording: RecordingClip | None = None

    @property
    def clip(self) -> RecordingClip:
        if self.recording is None:
            self.recording = RecordingClip(super().clip)
        return self.recording


def record_encoding(context) -> RecordingEncoders:
    """Give an index's context encoders that record what they encode; returns them."""
    old = context.encoders
    context.encoders = RecordingEncoders(old.folder, old.spec, old.settings, old.device,
                                         old.batch_size, old.int8, old.readonly)
    return context.encoders
