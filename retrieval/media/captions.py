"""Caption formats: each caption becomes a text item that names the image it describes.

- sidecar `<image stem>.txt`: one caption per non-empty line;
- Flickr token TSV (`.tsv`, `.token`, or any other suffix): `image.jpg#0<TAB>caption`;
- CSV with a header: an image column (`image`, `file`, `filename`, `file_name`, `path`)
  and a caption column (`caption`, `text`);
- JSONL: one object per line with the same fields;
- COCO captions JSON: `images` (`id`, `file_name`) and `annotations` (`image_id`, `caption`);
- Karpathy split JSON: `images` with `filename`, `split` and `sentences` (`raw`).
"""

from __future__ import annotations

import os
import re

from .tables import FormatError, csv_header, parse_json, parse_rows, split_lines

CAPTION_FILE_NAMES = ("captions.tsv", "captions.csv", "captions.jsonl", "captions.json")
IMAGE_FIELDS = ("image", "file", "filename", "file_name", "path", "image_path")
CAPTION_FIELDS = ("caption", "text")
_CAPTION_NUMBER = re.compile(r"#\d+$")


# A captions file that does not parse; the message names the line and the problem. Captions are
# rows like any other table's, so their errors are the table reader's.
CaptionFormatError = FormatError


def read_caption_pairs(path: str, content: str, sidecar_image: str | None = None
                       ) -> list[tuple[str, str]]:
    """(image reference, caption) pairs from a captions source; the suffix picks the format."""
    content = content.removeprefix("\ufeff")
    if sidecar_image is not None:
        return [(sidecar_image, line.strip()) for line in split_lines(content) if line.strip()]
    suffix = path.rsplit(".", 1)[-1].lower()
    reader = {"csv": _csv_pairs, "jsonl": _jsonl_pairs, "json": _json_pairs}.get(suffix, _token_pairs)
    return reader(content)


def read_split_pairs(path: str, content: str, split: str) -> list[tuple[str, str]]:
    """(image, caption) pairs of one split (`train`, `val`, `test`...) of a Karpathy JSON file."""
    data = parse_json(content.removeprefix("\ufeff"), "the file") if path.lower().endswith(".json") else None
    if not _is_karpathy(data):
        raise CaptionFormatError(f"{path} is not a Karpathy split JSON (images with 'split' and "
                                 "'sentences'), so it has no splits to choose from")
    splits = {str(image["split"]) for image in data["images"]
              if isinstance(image, dict) and "split" in image}
    if split not in splits:
        raise CaptionFormatError(f"no image is in split {split!r}; its splits are "
                                 f"{', '.join(sorted(splits))}")
    return _karpathy_pairs(data, split)


def _json_pairs(content: str) -> list[tuple[str, str]]:
    data = parse_json(content, "the file")
    return _karpathy_pairs(data) if _is_karpathy(data) else _coco_pairs(data)


def _is_karpathy(data) -> bool:
    images = data.get("images") if isinstance(data, dict) else None
    return isinstance(images, list) and bool(images) and isinstance(images[0], dict) \
        and "sentences" in images[0]


def _karpathy_pairs(data: dict, split: str | None = None) -> list[tuple[str, str]]:
    try:
        return [_strings(os.path.join(image.get("filepath", ""), image["filename"]), sentence["raw"],
                         f"image {number}")
                for number, image in enumerate(data["images"], 1)
                if split is None or image.get("split") == split
                for sentence in image["sentences"]]
    except (KeyError, TypeError) as error:
        raise CaptionFormatError(f"not Karpathy split JSON (missing {error}); expected images with "
                                 "'filename' and 'sentences' holding 'raw'") from None


def _token_pairs(content: str) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(split_lines(content), 1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab:
            raise CaptionFormatError(f"line {number}: expected 'image#n<TAB>caption'")
        pairs.append((_CAPTION_NUMBER.sub("", name), caption.strip()))
    return pairs


def _csv_pairs(content: str) -> list[tuple[str, str]]:
    header = csv_header(content)
    if header is None:
        return []
    image_field, caption_field = _fields(header, "header")
    rows = parse_rows(content, "csv")
    return [(row.fields[image_field] or "", (row.fields[caption_field] or "").strip()) for row in rows]


def _jsonl_pairs(content: str) -> list[tuple[str, str]]:
    pairs = []
    for row in parse_rows(content, "jsonl"):
        image_field, caption_field = _fields(row.fields, f"line {row.line}")
        pairs.append(_strings(row.fields[image_field], row.fields[caption_field], f"line {row.line}"))
    return pairs


def _coco_pairs(data) -> list[tuple[str, str]]:
    try:
        names = {image["id"]: image["file_name"] for image in data["images"]}
        return [_strings(names[note["image_id"]], note["caption"], f"annotation {number}")
                for number, note in enumerate(data["annotations"], 1)]
    except (KeyError, TypeError) as error:
        raise CaptionFormatError(
            f"not COCO captions JSON (missing {error}); expected 'images' and 'annotations'") from None


def _strings(image, caption, where: str) -> tuple[str, str]:
    if not isinstance(image, str) or not isinstance(caption, str):
        raise CaptionFormatError(f"{where}: image and caption must be strings")
    return image, caption.strip()


def _fields(keys, where: str) -> tuple[str, str]:
    lowered = {key.lower().strip(): key for key in keys if key}
    image = next((lowered[f] for f in IMAGE_FIELDS if f in lowered), None)
    caption = next((lowered[f] for f in CAPTION_FIELDS if f in lowered), None)
    if image is None or caption is None:
        raise CaptionFormatError(
            f"{where} needs an image field ({', '.join(IMAGE_FIELDS)}) and a caption field "
            f"({', '.join(CAPTION_FIELDS)})")
    return image, caption
