"""Caption formats: each caption becomes a text item that names the image it describes.

- sidecar `<image stem>.txt`: one caption per non-empty line;
- Flickr token TSV (`.tsv`, `.token`, or any other suffix): `image.jpg#0<TAB>caption`;
- CSV with a header: an image column (`image`, `file`, `filename`, `file_name`, `path`)
  and a caption column (`caption`, `text`);
- JSONL: one object per line with the same fields;
- COCO captions JSON: `images` (`id`, `file_name`) and `annotations` (`image_id`, `caption`).
"""

from __future__ import annotations

import csv
import io
import json

CAPTION_FILE_NAMES = ("captions.tsv", "captions.csv", "captions.jsonl", "captions.json")
IMAGE_FIELDS = ("image", "file", "filename", "file_name", "path", "image_path")
CAPTION_FIELDS = ("caption", "text")


class CaptionFormatError(ValueError):
    """A captions file that does not parse; the message names the line and the problem."""


def read_caption_pairs(path: str, content: str, sidecar_image: str | None = None
                       ) -> list[tuple[str, str]]:
    """(image reference, caption) pairs from a captions source; the suffix picks the format."""
    if sidecar_image is not None:
        return [(sidecar_image, line.strip()) for line in content.splitlines()]
    suffix = path.rsplit(".", 1)[-1].lower()
    reader = {"csv": _csv_pairs, "jsonl": _jsonl_pairs, "json": _coco_pairs}.get(suffix, _token_pairs)
    return reader(content)


def _token_pairs(content: str) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab:
            raise CaptionFormatError(f"line {number}: expected 'image#n<TAB>caption'")
        pairs.append((name.rsplit("#", 1)[0] if "#" in name else name, caption.strip()))
    return pairs


def _csv_pairs(content: str) -> list[tuple[str, str]]:
    rows = list(csv.DictReader(io.StringIO(content)))
    if not rows:
        return []
    image_field, caption_field = _fields(rows[0].keys(), "header")
    return [(row[image_field] or "", (row[caption_field] or "").strip()) for row in rows]


def _jsonl_pairs(content: str) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CaptionFormatError(f"line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise CaptionFormatError(f"line {number} is not a JSON object")
        image_field, caption_field = _fields(record.keys(), f"line {number}")
        pairs.append((str(record[image_field]), str(record[caption_field]).strip()))
    return pairs


def _coco_pairs(content: str) -> list[tuple[str, str]]:
    try:
        data = json.loads(content)
        names = {image["id"]: image["file_name"] for image in data["images"]}
        return [(names[note["image_id"]], str(note["caption"]).strip())
                for note in data["annotations"]]
    except json.JSONDecodeError as error:
        raise CaptionFormatError(f"not JSON ({error.msg} at line {error.lineno})") from None
    except (KeyError, TypeError) as error:
        raise CaptionFormatError(
            f"not COCO captions JSON (missing {error}); expected 'images' and 'annotations'") from None


def _fields(keys, where: str) -> tuple[str, str]:
    lowered = {key.lower().strip(): key for key in keys if key}
    image = next((lowered[f] for f in IMAGE_FIELDS if f in lowered), None)
    caption = next((lowered[f] for f in CAPTION_FIELDS if f in lowered), None)
    if image is None or caption is None:
        raise CaptionFormatError(
            f"{where} needs an image field ({', '.join(IMAGE_FIELDS)}) and a caption field "
            f"({', '.join(CAPTION_FIELDS)})")
    return image, caption
