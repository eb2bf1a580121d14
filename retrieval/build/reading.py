"""Reading a source file, as a local build and a distributed job both do: its bytes, and an
image's bytes as the model's input tensor."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..media.images import ImageFacts, load_image, load_image_with_size, measure_image

if TYPE_CHECKING:
    import torch


class UnreadableFile(Exception):
    """A source file that cannot be read, or is empty; the message says which."""


class EmptyFile(UnreadableFile):
    """A source file with no bytes: skipped until it changes (an unreadable one is retried)."""


def read_source(path: str) -> bytes:
    """A source file's bytes, for hashing and decoding."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise UnreadableFile(f"cannot read ({error.strerror})") from None
    if not data:
        raise EmptyFile("empty file")
    return data


def unexpected(error: Exception) -> str:
    """The warning for an error no check foresaw: its kind and message, on one line."""
    return " ".join(f"unexpected error ({type(error).__name__}: {error})".split())


def preprocess_bytes(data: bytes, preprocess: Callable, input_side: int, max_megapixels: float
                     ) -> torch.Tensor:
    """An image file's bytes as the model's input tensor; raises ImageDecodeError."""
    # Twice the input side: the resize that follows smooths away draft decoding's
    # differences (vectors agree to ~1e-3), at a fraction of the decoding cost.
    image = load_image(io.BytesIO(data), max_megapixels, min_side=2 * input_side)
    return preprocess(image)


def preprocess_and_measure(data: bytes, preprocess: Callable, input_side: int, max_megapixels: float
                           ) -> tuple[torch.Tensor, ImageFacts]:
    """`preprocess_bytes`, and the image's facts (size, perceptual hashes) from the same decode."""
    image, size = load_image_with_size(io.BytesIO(data), max_megapixels, min_side=2 * input_side)
    return preprocess(image), measure_image(image, size)


# The shorter side an image is decoded at (at least) to be measured alone: pHash reads 128x128.
MEASURE_SIDE = 256


def measure_bytes(data: bytes, max_megapixels: float) -> ImageFacts:
    """An image file's facts alone, for an image indexed before they were recorded: no model
    is needed for them."""
    image, size = load_image_with_size(io.BytesIO(data), max_megapixels, min_side=MEASURE_SIDE)
    return measure_image(image, size)
