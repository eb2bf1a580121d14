"""Planted duplicates: the copies a photo library gathers (resized, recompressed, cropped,
brightened or darkened, mirrored, copied byte for byte), made from an original, for the
duplicate-finding tests and benchmark to find again."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

# How each planted copy is made from its original (a PIL image), by the name it is written under.
EDITS = {
    "resized": lambda image: image.resize((max(1, image.width // 2), max(1, image.height // 2)),
                                          Image.Resampling.LANCZOS),
    "jpeg60": lambda image: _recompressed(image, 60),
    "crop90": lambda image: image.crop(_central_box(image.size, 0.9)),
    "brighter": lambda image: ImageEnhance.Brightness(image).enhance(1.1),
    "darker": lambda image: ImageEnhance.Brightness(image).enhance(0.9),
    "flipped": ImageOps.mirror,
}


def plant_copies(original: Path, folder: Path, edits: tuple[str, ...] = (*EDITS, "copy")) -> list[Path]:
    """Write the `edits` of the image file `original` into `folder` as STEM-EDIT files ("copy"
    copies the file's bytes); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with Image.open(original) as opened:
        image = opened.convert("RGB")
    for edit in edits:
        if edit == "copy":
            target = folder / f"{original.stem}-copy{original.suffix}"
            shutil.copyfile(original, target)
        else:
            target = folder / f"{original.stem}-{edit}.png"  # lossless: only the edit changes it
            EDITS[edit](image).save(target)
        written.append(target)
    return written


def _recompressed(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _central_box(size: tuple[int, int], share: float) -> tuple[int, int, int, int]:
    width, height = size
    left, top = round(width * (1 - share) / 2), round(height * (1 - share) / 2)
    return left, top, left + round(width * share), top + round(height * share)
