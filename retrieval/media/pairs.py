"""Captioned image sets for evaluation and training: images under a folder, captions from a file.

Every captions format the index reads is accepted (Flickr token TSV, CSV, JSONL, COCO JSON,
Karpathy split JSON). An image named in the captions is found under the folder by its path
relative to the folder or to the captions file, or else by its file name when that is unique.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UsageError
from .captions import CaptionFormatError, read_caption_pairs, read_split_pairs
from .corpus import VIDEO_SUFFIXES, walk_sources
from .tables import read_table, row_error


@dataclass
class CaptionedImages:
    """Distinct images, their captions, and for each caption the index of its image."""

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # int64, one entry per caption
    missing: list[str] = field(default_factory=list)  # image names with no file

    def captions_of(self) -> list[list[int]]:
        """For each image, the indices of its captions."""
        owners: list[list[int]] = [[] for _ in self.images]
        for caption, image in enumerate(self.caption_image.tolist()):
            owners[image].append(caption)
        return owners

    def subset(self, image_indices: list[int]) -> CaptionedImages:
        """These images (in this order) with their captions."""
        position = {old: new for new, old in enumerate(image_indices)}
        keep = [c for c, image in enumerate(self.caption_image.tolist()) if image in position]
        return CaptionedImages([self.images[i] for i in image_indices],
                               [self.captions[c] for c in keep],
                               np.array([position[int(self.caption_image[c])] for c in keep], np.int64))

    def split(self, held_out: int | float, seed: int = 0) -> tuple[CaptionedImages, CaptionedImages]:
        """(training, held-out) by image: `held_out` images, or that share of them."""
        count = round(len(self.images) * held_out) if isinstance(held_out, float) else held_out
        if not 0 <= count < len(self.images):
            raise UsageError(f"cannot hold out {count} of {len(self.images)} images")
        order = list(range(len(self.images)))
        random.Random(seed).shuffle(order)
        return self.subset(sorted(order[count:])), self.subset(sorted(order[:count]))


def read_captioned_images(folder: str | Path, captions_file: str | Path,
                          split: str | None = None) -> CaptionedImages:
    """The images under `folder` that `captions_file` describes, with their captions.

    `split` keeps one split (`train`, `val`, `test`) of a Karpathy JSON file.
    """
    folder, captions_file = Path(folder).expanduser(), Path(captions_file).expanduser()
    if not folder.is_dir():
        raise UsageError(f"image folder {folder}: no such folder")
    try:
        content = captions_file.read_text(encoding="utf-8-sig", errors="replace")
        pairs = (read_split_pairs(str(captions_file), content, split) if split
                 else read_caption_pairs(str(captions_file), content))
    except OSError as error:
        raise UsageError(f"captions file {captions_file}: {error.strerror}") from None
    except CaptionFormatError as error:
        raise UsageError(f"captions file {captions_file}: {error}") from None
    find = _image_finder(folder, captions_file.parent)
    images: dict[Path, int] = {}
    captions, owners, missing = [], [], []
    for reference, caption in pairs:
        path = find(reference)
        if path is None:
            missing.append(reference)
        elif caption:
            captions.append(caption)
            owners.append(images.setdefault(path, len(images)))
    if not captions:
        raise UsageError(f"no caption in {captions_file} names an image under {folder}")
    return CaptionedImages(list(images), captions, np.array(owners, np.int64), sorted(set(missing)))


def _image_finder(folder: Path, captions_folder: Path):
    root = Path(os.path.abspath(folder))
    files = [Path(f.path) for f in walk_sources([root]).files if f.kind == "image"]
    by_relative = {path.relative_to(root).as_posix(): path for path in files}
    by_name: dict[str, Path | None] = {}
    for path in files:
        by_name[path.name] = None if path.name in by_name else path  # ambiguous names find nothing

    def find(reference: str) -> Path | None:
        beside = Path(os.path.relpath(os.path.abspath(captions_folder / reference), root)).as_posix()
        return (by_relative.get(beside) or by_relative.get(reference.replace(os.sep, "/"))
                or by_name.get(os.path.basename(reference)))

    return find


def read_video_pairs(source: str | Path) -> list[tuple[Path, str]]:
    """(video, caption) pairs: a folder where a video has a `.txt` caption of the same stem, or a
    CSV/JSONL file with `video` and `caption` fields (paths relative to the file)."""
    path = Path(source).expanduser()
    if path.is_dir():
        pairs = [(video, caption) for video in sorted(path.rglob("*"))
                 if video.suffix.lower() in VIDEO_SUFFIXES and video.with_suffix(".txt").is_file()
                 for caption in video.with_suffix(".txt").read_text(encoding="utf-8").splitlines()[:1]
                 if caption.strip()]
    elif path.suffix.lower() in (".csv", ".jsonl") and path.is_file():
        pairs = []
        for row in read_table(path, "video pairs"):
            video, caption = row.text("video"), row.text("caption")
            if not video or not caption:
                raise row_error("video pairs", path, row, "needs video and caption fields")
            pairs.append((path.parent / video, caption))
    else:
        raise UsageError(f"video pairs {source}: give a folder, a .csv or a .jsonl file")
    if not pairs:
        raise UsageError(f"video pairs {source}: no video with a caption (clip.mp4 with clip.txt beside it)")
    return pairs
