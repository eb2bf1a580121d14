"""Captions written by a CoCa model for indexed images: which images get one, and writing them
as a step of a build.

A written caption is a text item of its image's own file (uri `IMAGE#caption`, parent the
image), marked in its metadata as generated, with the model and the way it wrote
(`caption_model`, `caption_method`) and the image content it describes (`image_hash`). So it
is encoded by the index's text tower like any caption, goes when its image goes, follows its
image when the file moves, and is known to be stale when the image changes.

Which images get one (`plan`): every image without a written caption, except, unless
`every_image`, those a human caption points at; every image whose content changed since its
caption was written; and, with `recaption` only, every image captioned by another model or
another way. Captions are committed a batch per transaction, so a killed build resumes with
the images still waiting, and none is written twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ..core.concurrency import prefetch_map
from ..core.errors import UsageError
from ..core.paths import path_from_display
from ..encoders.caption_spec import (
    CaptionOptions,
    caption_model_spec,
    check_coca,
    default_caption_model,
    longest_caption,
    too_long_message,
)
from ..encoders.spec import ModelSpec, check_weights_available
from ..media.corpus import Skipped, text_digest
from ..media.images import ImageDecodeError
from ..storage.store import ImageToCaption, NewItem
from .reading import UnreadableFile, preprocess_bytes, read_source, unexpected
from .report import BuildReport
from .stop_points import batch_committed

if TYPE_CHECKING:
    import torch

    from ..context import IndexContext
    from ..encoders.captioner import Captioner

CAPTION_SUFFIX = "#caption"  # a written caption's uri: its image's, and this


@dataclass(frozen=True)
class CaptionRequest:
    """What captions a build writes: with which model and options, and whether for every
    image (`every_image`) or only those without a human caption. Recorded by the index, so
    later builds caption new and changed images the same way."""

    model: ModelSpec
    options: CaptionOptions = field(default_factory=CaptionOptions)
    every_image: bool = False

    @property
    def writer(self) -> tuple[str, str]:
        """What a caption records of how it was written: the model, and the way."""
        return self.model.identity, self.options.writer

    def to_dict(self) -> dict:
        return {"model": self.model.name, "pretrained": self.model.pretrained,
                "options": asdict(self.options), "every_image": self.every_image}

    @classmethod
    def from_dict(cls, data: dict) -> CaptionRequest:
        return cls(ModelSpec(data["model"], data.get("pretrained")),
                   CaptionOptions(**data.get("options", {})), bool(data.get("every_image")))


def resolve_request(recorded: dict | None, index_model: ModelSpec, *, caption: bool | None,
                    every_image: bool | None, model: str | None, pretrained: str | None,
                    method: str | None, max_length: int | None, beam_width: int | None,
                    top_p: float | None) -> CaptionRequest | None:
    """The request a build runs with: the recorded one changed by what is given. `caption`
    False writes none (and drops the record); None with nothing else given keeps the record.
    A new request's model is `model`, else the index's own when it is a CoCa, else CoCa
    ViT-B-32 with its COCO-finetuned LAION weights."""
    given = {"method": method, "max_length": max_length, "beam_width": beam_width, "top_p": top_p}
    asked = any(value is not None for value in (every_image, model, pretrained, *given.values()))
    if caption is False:
        if asked:
            raise UsageError("`caption` False writes no captions: give no other caption parameter")
        return None
    if not caption and not asked:
        return None if recorded is None else CaptionRequest.from_dict(recorded)
    before = CaptionRequest.from_dict(recorded) if recorded else None
    if model is not None or pretrained is not None:
        spec = caption_model_spec(model or (before.model.name if before else None), pretrained)
    elif before is not None:
        spec = before.model
    else:
        spec = default_caption_model(index_model)
    options = before.options if before is not None else CaptionOptions()
    options = CaptionOptions(**{**asdict(options),
                                **{name: value for name, value in given.items() if value is not None}})
    every = every_image if every_image is not None else bool(before and before.every_image)
    return CaptionRequest(spec, options, every)


def check_request(request: CaptionRequest) -> None:
    """Refuse, in one line and before any image is encoded (or the request is recorded), a
    caption model whose weights cannot be had, that is no CoCa, or whose context cannot hold
    captions of the length asked for."""
    check_weights_available(request.model, parameter_prefix="caption_")
    check_coca(request.model)
    longest = longest_caption(request.model)
    if longest is not None and request.options.max_length > longest:
        raise UsageError(too_long_message(request.model, longest, request.options.max_length,
                                          "`caption_max_length`"))


@dataclass
class Plan:
    """The images to caption, and the written captions to drop without a new one."""

    to_caption: list[ImageToCaption]
    to_drop: list[int]


def plan(images: list[ImageToCaption], request: CaptionRequest | None, recaption: bool) -> Plan:
    """Which images get a caption now (see the module's docstring). Without a request, no
    image gets one, but a caption of an image that has changed since goes."""
    to_caption, to_drop = [], []
    for image in images:
        written = image.caption_id is not None
        current = written and image.captioned_hash == image.content_hash
        if request is None:
            if written and not current:
                to_drop.append(image.caption_id)
            continue
        if current and (not recaption or (image.caption_model, image.caption_method) == request.writer):
            continue
        if not written and image.has_human_caption and not request.every_image:
            continue
        to_caption.append(image)
    return Plan(to_caption, to_drop)


@dataclass
class _Read:
    image: ImageToCaption
    pixels: torch.Tensor | None = None
    error: str | None = None


class CaptionWriter:
    """Writes the captions a build's request asks for, a batch per transaction. `changes`
    collects the text items made and dropped, for the FAISS update at the end of the build;
    `text_vectors` gives vectors by text hash (the builder's: stored ones are reused)."""

    def __init__(self, context: IndexContext, request: CaptionRequest | None, recaption: bool,
                 max_megapixels: float, changes: dict[int, np.ndarray | None], report: BuildReport,
                 text_vectors: Callable[[list[str]], dict[str, np.ndarray]], workers: int,
                 progress: bool = False) -> None:
        self.context = context
        self.store = context.store
        self.request = request
        self.recaption = recaption
        self.max_megapixels = max_megapixels
        self.changes = changes
        self.report = report
        self.text_vectors = text_vectors
        self.workers = workers
        self.progress = progress

    def run(self) -> None:
        images = self.store.images_to_caption()
        todo = plan(images, self.request, self.recaption)
        if todo.to_drop:
            with self.store.conn:
                self.store.delete_items(todo.to_drop)
                self.store.bump_generation("text")
            self.changes.update(dict.fromkeys(todo.to_drop))
        if not todo.to_caption:
            return
        started = time.perf_counter()
        # A caption written by this model this way for the same content elsewhere (a copy).
        known = {image.content_hash: image.caption_text for image in images
                 if image.caption_id is not None and image.captioned_hash == image.content_hash
                 and (image.caption_model, image.caption_method) == self.request.writer}
        fresh = [image for image in todo.to_caption if image.content_hash not in known]
        self._write([(image, known[image.content_hash]) for image in todo.to_caption
                     if image.content_hash in known])
        self.report.captions_reused += len(todo.to_caption) - len(fresh)
        if fresh:
            captioner = self.context.encoders.captioner(self.request.model, self.request.options)
            size = captioner.batch_size
            bar = tqdm(total=len(fresh), unit="img", desc="captions", disable=not self.progress)
            batch: list[_Read] = []
            for read in prefetch_map(lambda image: self._read(image, captioner), fresh, self.workers,
                                     ahead=2 * size):
                if read.error:
                    self.report.skipped.append(Skipped(read.image.path, f"cannot caption: {read.error}"))
                    continue
                batch.append(read)
                if len(batch) == size:
                    self._caption(captioner, batch)
                    bar.update(len(batch))
                    batch = []
            if batch:
                self._caption(captioner, batch)
                bar.update(len(batch))
            bar.close()
        self.report.caption_seconds += time.perf_counter() - started

    def _read(self, image: ImageToCaption, captioner: Captioner) -> _Read:
        try:
            # image.path is stored text (\xNN for bytes that are not UTF-8): read the file it names
            pixels = preprocess_bytes(read_source(path_from_display(image.path)), captioner.preprocess_image,
                                      captioner.encoder.input_side, self.max_megapixels)
            return _Read(image, pixels)
        except (UnreadableFile, ImageDecodeError) as error:
            return _Read(image, error=str(error))
        except Exception as error:  # no single file may stop a build
            return _Read(image, error=unexpected(error))

    def _caption(self, captioner: Captioner, batch: list[_Read]) -> None:
        import torch

        texts = captioner.caption_tensors(torch.stack([read.pixels for read in batch]))
        self._write([(read.image, text) for read, text in zip(batch, texts)])
        self.report.captions_written += len(batch)

    def _write(self, captions: list[tuple[ImageToCaption, str]]) -> None:
        """Each image's caption, replacing the one written before, in one transaction."""
        if not captions:
            return
        vectors = self.text_vectors([text for _, text in captions])
        model, method = self.request.writer
        with self.store.conn:
            for image, text in captions:
                if image.caption_id is not None:
                    self.store.delete_items([image.caption_id])
                    self.changes[image.caption_id] = None
                digest = text_digest(text)
                item = NewItem(image.uri + CAPTION_SUFFIX, "text", vectors[digest], digest, text,
                               meta={"generated": True, "caption_model": model, "caption_method": method,
                                     "image_hash": image.content_hash}, parent_id=image.id)
                self.changes[self.store.insert_items(image.file_id, [item])[0]] = item.vector
            self.store.bump_generation("text")
        batch_committed("caption")
