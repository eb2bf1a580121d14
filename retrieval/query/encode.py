"""Turn a query (combined string, text, images, sounds) into one normalised vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image

from ..core.errors import OverCapError, QueryTooLargeError, UsageError
from ..core.paths import existing_file
from ..core.types import DEFAULT_MAX_AUDIO_SECONDS, DEFAULT_MAX_MEGAPIXELS, DEFAULT_MAX_VIDEO_SECONDS
from ..core.vectors import unit_mean
from ..media.images import ImageDecodeError, load_image, to_rgb
from .parse import QueryTerm, parse_query

if TYPE_CHECKING:
    from ..context import Encoders


ImageInput = str | Path | Image.Image | BinaryIO
ImageQuery = ImageInput | Sequence[ImageInput] | None
AudioInput = str | Path | BinaryIO
AudioQuery = AudioInput | Sequence[AudioInput] | None


@dataclass(frozen=True)
class MediaCaps:
    """The largest query image (megapixels) and longest query sound and video (seconds) decoded;
    larger ones raise QueryTooLargeError naming the parameter that sets the cap."""

    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS

    @classmethod
    def given(cls, max_megapixels: float | None = None, max_audio_seconds: float | None = None,
              max_video_seconds: float | None = None) -> MediaCaps:
        """The caps given, the defaults for those left None."""
        chosen = {"max_megapixels": max_megapixels, "max_audio_seconds": max_audio_seconds,
                  "max_video_seconds": max_video_seconds}
        for name, value in chosen.items():
            if value is not None and not value > 0:
                raise UsageError(f"`{name}` must be above 0, not {value:g}")
        return cls(**{name: float(value) for name, value in chosen.items() if value is not None})


def _media_error(kind: str, source: object, error: Exception) -> UsageError:
    """A query medium's decoding error as the engine's: QueryTooLargeError when over a cap."""
    message = f"query {kind} {_name(source)}: {error}"
    if isinstance(error, OverCapError):
        return QueryTooLargeError(message, error.parameter)
    return UsageError(message)


def query_terms(query: str | None, text: str | None = None, image: ImageQuery = None,
                audio: AudioQuery = None, items: Sequence[QueryTerm] = (),
                video: AudioQuery = None) -> list[QueryTerm]:
    """All terms of a search call; at least one is required. `items` are terms that carry
    a vector already (an indexed item's, or one given)."""
    terms = parse_query(query) if query is not None else []
    if text is not None:
        if not text.strip():
            raise UsageError("the text query is empty")
        terms.append(QueryTerm(1.0, text=text))
    terms += [QueryTerm(1.0, image=one) for one in _several(image)]
    terms += [QueryTerm(1.0, audio=one) for one in _several(audio)]
    terms += [QueryTerm(1.0, video=one) for one in _several(video)]
    terms += items
    if not terms:
        raise UsageError("nothing to search for: give a text query, an image, a sound or an item")
    return terms


def _several(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def query_modality(terms: list[QueryTerm]) -> str:
    """What a query mostly is: text when it has words, else image, else audio, else video."""
    kinds = {term.modality for term in terms}
    return next(m for m in ("text", "image", "audio", "video") if m in kinds)


def query_vector(encoders: Encoders, terms: list[QueryTerm], target: str,
                 caps: MediaCaps = MediaCaps()) -> np.ndarray:
    """The normalised weighted sum of the terms' vectors, in the space of `target`'s vectors.

    Images, texts and our own audio tower share the CLIP space. A CLAP audio encoder has a
    space of its own, shared by its sounds and its texts only.
    """
    in_clap = target == "audio" and encoders.audio_is_clap
    parts = []
    for modality in ("text", "image", "audio", "video"):
        chosen = [t for t in terms if t.modality == modality and t.item is None]
        if chosen:
            parts.append(_weighted(_encode(encoders, chosen, modality, in_clap, caps), chosen))
    items = [t for t in terms if t.item is not None]
    for term in items:
        _check_item_space(encoders, term.modality, in_clap)
    if items:
        parts.append(_weighted(np.stack([t.item[1] for t in items]), items))
    total = np.sum(parts, axis=0)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm):
        raise UsageError("the query's weights must be ordinary numbers")
    if norm < 1e-6:
        raise UsageError("the query's terms cancel out; change their weights")
    return total / norm


def _encode(encoders: Encoders, terms: list[QueryTerm], modality: str, in_clap: bool,
            caps: MediaCaps) -> np.ndarray:
    if modality == "text":
        encoder = encoders.audio if in_clap else encoders.text
        return encoder.encode_texts([t.text for t in terms])
    if modality == "video":
        if in_clap:
            raise UsageError("this index's audio is embedded by CLAP, which knows sounds and "
                             "texts only; search its audio with text or a sound")
        return np.stack([_video_vector(encoders, t.video, caps.max_video_seconds) for t in terms])
    if modality == "image":
        if in_clap:
            raise UsageError("this index's audio is embedded by CLAP, which knows sounds and "
                             "texts only; search its audio with text or a sound")
        # A bad path fails before the model loads.
        opened = [_open_image(t.image, caps.max_megapixels) for t in terms]
        return encoders.images.encode_images(opened)
    if encoders.audio_is_clap and not in_clap:
        raise UsageError("this index's audio is embedded by CLAP, whose sounds cannot be compared "
                         "with images or texts of the CLIP model; use `target` audio, or train "
                         "our own audio tower with retrieve train-audio")
    encoder = encoders.audio
    return np.stack([_sound_vector(encoder, t.audio, caps.max_audio_seconds) for t in terms])


def _check_item_space(encoders: Encoders, modality: str, in_clap: bool) -> None:
    """An indexed item's vector joins a query only in the space it was made in."""
    if in_clap != (modality == "audio" and encoders.audio_is_clap):
        raise UsageError("this index's audio is embedded by CLAP, in a space of its own: a sound "
                         "is like other sounds only, and images and texts like images and texts")


def _weighted(vectors: np.ndarray, terms: list[QueryTerm]) -> np.ndarray:
    weights = np.array([t.weight for t in terms], dtype=np.float32)
    return (vectors * weights[:, None]).sum(axis=0)


def _open_image(image: ImageInput, max_megapixels: float) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    source = image if hasattr(image, "read") else existing_file(str(image))  # an upload, or a path
    if source is None:
        raise UsageError(f"query image {image}: no such file")
    try:
        return load_image(source, max_megapixels)
    except ImageDecodeError as error:
        raise _media_error("image", image, error) from None


def _video_vector(encoders: Encoders, video: AudioInput, max_seconds: float) -> np.ndarray:
    """A query video: the normalised mean of its segments' vectors, made as the index makes them."""
    from ..media.video import VideoDecodeError

    try:
        segments = encoders.decode_video(_query_file(video, "video"), max_seconds)
    except VideoDecodeError as error:
        raise _media_error("video", video, error) from None
    return unit_mean(encoders.encode_segments(segments))


def _sound_vector(encoder, audio: AudioInput, max_seconds: float) -> np.ndarray:
    """A query sound of any length: the normalised mean of its windows' vectors."""
    from ..media.audio import AudioDecodeError, load_audio, split_windows

    try:
        wave = load_audio(_query_file(audio, "sound"), encoder.sample_rate, max_seconds)
    except AudioDecodeError as error:
        raise _media_error("sound", audio, error) from None
    windows = split_windows(wave, encoder.sample_rate)
    return unit_mean(encoder.encode_audio([w.samples for w in windows]))


def _query_file(value: AudioInput, kind: str) -> Path | BinaryIO:
    """An existing file for a path, or the upload (a binary file object) as it is."""
    if not isinstance(value, (str, Path)):
        return value
    path = existing_file(str(value))
    if path is None:
        raise UsageError(f"query {kind} {value}: no such file")
    return path


def _name(value: object) -> str:
    return str(value) if isinstance(value, (str, Path)) else getattr(value, "name", "upload")
