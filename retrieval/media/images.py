"""Decode image files into plain RGB, whatever mode, orientation or container they come in."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import OverCapError
from ..core.types import DEFAULT_MAX_MEGAPIXELS

# Our own megapixel cap is checked before decoding; PIL's bomb check would only duplicate it
# with a different message, so it is lifted to let the cap be the one rule.
Image.MAX_IMAGE_PIXELS = None


# EXIF orientations that turn the picture a quarter: its width and height trade places.
QUARTER_TURNS = {5, 6, 7, 8}


class ImageDecodeError(Exception):
    """A file that cannot become an image; the message is the reason shown to the user."""


class ImageTooLargeError(ImageDecodeError, OverCapError):
    """An image of more megapixels than the cap."""

    parameter = "max_megapixels"


@dataclass(frozen=True)
class ImageFacts:
    """What duplicate finding needs to know of an image's content, measured once when it is
    decoded: its full size as shown (after EXIF orientation), and its perceptual hashes (64-bit,
    hex; None where `imagehash` is not installed or the image could not be read)."""

    width: int
    height: int
    phash: str | None = None
    dhash: str | None = None


def load_image(path: str | Path | BinaryIO, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
               min_side: int | None = None) -> Image.Image:
    """Open, check the size of, orient and convert an image to RGB.

    With `min_side`, a JPEG is decoded at the smallest of 1/2, 1/4 or 1/8 scale that keeps
    both sides at least that long (PIL draft mode): the DCT does the downscaling, several
    times faster than decoding every pixel only to throw most away.
    Raises ImageDecodeError with a short reason for anything that is not a usable image.
    """
    return load_image_with_size(path, max_megapixels, min_side)[0]


def load_image_with_size(path: str | Path | BinaryIO, max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
                         min_side: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """`load_image`, and the image's full (width, height) as shown, which a draft decode at a
    smaller scale no longer tells."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the image is still fine
            with Image.open(path) as image:
                _check_size(image, max_megapixels)
                width, height = image.size
                if _orientation(image) in QUARTER_TURNS:
                    width, height = height, width
                if min_side and image.format == "JPEG":
                    image.draft("RGB", _draft_request(image.size, min_side))
                image.seek(0)  # first frame of animations
                image.load()
                oriented = _apply_orientation(image)
                return to_rgb(oriented), (width, height)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image PIL can read") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as error:
        raise ImageDecodeError(f"cannot read ({error.strerror})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageDecodeError(f"corrupt or truncated image ({_first_line(error)})") from None


def _draft_request(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The (width, height) to ask draft for so that the shorter side stays >= min_side."""
    width, height = size
    scale = min_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _check_size(image: Image.Image, max_megapixels: float) -> None:
    width, height = image.size
    megapixels = width * height / 1e6
    if megapixels > max_megapixels:
        raise ImageTooLargeError(
            f"{width}x{height} is {megapixels:.1f} megapixels, over the {max_megapixels:g} MP cap "
            "(raise it with `max_megapixels`)")


def perceptual_hashes(image: Image.Image) -> tuple[str | None, str | None]:
    """The image's pHash and dHash (64 bits each, as hex), or (None, None) without `imagehash`."""
    try:
        import imagehash  # imports scipy: only where hashes are made
    except ImportError:
        return None, None
    return str(imagehash.phash(image)), str(imagehash.dhash(image))


def hashing_available() -> bool:
    """Whether perceptual hashes can be made here (`imagehash` is installed)."""
    from importlib.util import find_spec

    return find_spec("imagehash") is not None


def measure_image(image: Image.Image, size: tuple[int, int]) -> ImageFacts:
    """The facts of a decoded image whose full size as shown is `size`."""
    return ImageFacts(size[0], size[1], *perceptual_hashes(image))


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # garbage EXIF: taken as upright, as _apply_orientation leaves it
        return 1


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # garbage EXIF must not cost the image itself
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: 16-bit and float scaled to 8 bits, transparency on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _wide_to_8bit(image)
    if image.mode == "La":  # premultiplied; PIL converts it to nothing but LA
        image = image.convert("LA")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """Scale wide pixels to 8 bits, where PIL's own convert would clip them to white.

    16-bit values map by the 16-bit range; floats and out-of-range integers by their own
    finite range (NaN and infinities, often 'no data' markers, become black).
    """
    pixels = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(pixels)
    low = float(pixels[finite].min()) if finite.any() else 0.0
    high = float(pixels[finite].max()) if finite.any() else 0.0
    if image.mode != "F" and low >= 0 and high <= 65535:
        low, high = 0.0, 65535.0
    scaled = (pixels - low) * (255.0 / (high - low) if high > low else 0.0)
    scaled = np.where(finite, scaled, 0.0)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:120] if text else type(error).__name__
