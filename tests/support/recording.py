"""An index's encoders that note what they are asked to encode: the real (tiny) encoders do the
work, so a builder test sees which files and texts reached them without timing anything.

Whatever encodes (the ONNX towers `Encoders.images` and `Encoders.text` choose, or the CLIP
model where they do not serve), the work is noted in one `Recording`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from retrieval.context import Encoders


@dataclass
class Recording:
    """How many images and which texts an index's encoders encoded."""

    images: int = 0
    texts: list[str] = field(default_factory=list)


class RecordingEncoder:
    """An image or text encoder (model or tower) that notes its work in a `Recording`; the
    calls it forwards run on the wrapped encoder, so its own inner calls are not counted twice."""

    def __init__(self, encoder, recording: Recording) -> None:
        self.encoder = encoder
        self.recording = recording

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)

    def encode_image_tensors(self, pixels) -> np.ndarray:
        self.recording.images += len(pixels)
        return self.encoder.encode_image_tensors(pixels)

    def encode_preprocessed(self, images: Sequence) -> np.ndarray:
        self.recording.images += len(images)
        return self.encoder.encode_preprocessed(images)

    def encode_images(self, images: Sequence) -> np.ndarray:
        self.recording.images += len(images)
        return self.encoder.encode_images(images)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.recording.texts += texts
        return self.encoder.encode_texts(texts)


class RecordingEncoders(Encoders):
    """`Encoders` whose image and text encoders, whichever they are, record their work."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.recording = Recording()

    def _recorded(self, encoder) -> RecordingEncoder:
        if isinstance(encoder, RecordingEncoder):  # the model, already wrapped by `clip`
            return encoder
        return RecordingEncoder(encoder, self.recording)

    @property
    def clip(self) -> RecordingEncoder:
        return self._recorded(super().clip)

    @property
    def text(self) -> RecordingEncoder:
        return self._recorded(super().text)

    @property
    def images(self) -> RecordingEncoder:
        return self._recorded(super().images)


def record_encoding(context) -> RecordingEncoders:
    """Give an index's context encoders that record what they encode; returns them."""
    old = context.encoders
    context.encoders = RecordingEncoders(old.folder, old.spec, old.settings, old.device,
                                         old.batch_size, old.int8, old.readonly, old.one_shot)
    return context.encoders
