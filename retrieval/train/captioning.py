"""How well a CoCa model captions a captioned image set (`retrieve evaluate --captioning`): its
captions scored against the references (BLEU-1..4, METEOR, ROUGE-L, CIDEr, via
`caption_metrics`), the captioning throughput, and CLIP-score, the mean cosine between each
image and its written caption under the retrieval model (what a search would see)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UsageError
from ..encoders.caption_spec import CaptionOptions, default_caption_model
from ..encoders.spec import ModelSpec
from ..media.pairs import read_captioned_images
from .caption_metrics import METRICS, score_captions
from .evaluation import encode_pixels, preprocess_captioned


@dataclass
class CaptioningEvaluation:
    caption_model: str           # what wrote the captions
    method: str                  # how (CaptionOptions.writer)
    model: str                   # what CLIP-score is measured under
    images: int
    references: int
    scores: dict[str, float]     # METRICS, less any skipped
    skipped: dict[str, str]      # metric -> why it was not scored, and what to do
    clip_score: float
    images_per_second: float     # captioning alone: decoding and preprocessing left out
    seconds: dict[str, float] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)  # image -> its written caption
    unreadable: list[str] = field(default_factory=list)    # images dropped, with their captions

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table of the scores, CLIP-score and throughput."""
        names = [name for name in METRICS if name in self.scores]
        head = [*names, "CLIP-score", "images/s"]
        row = [*(f"{self.scores[name]:.3f}" for name in names), f"{self.clip_score:.3f}",
               f"{self.images_per_second:.1f}"]
        lines = [head, ["---"] * len(head), row]
        return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def evaluate_captioning(folder: str | Path, captions_file: str | Path, split: str | None = None, *,
                        model: ModelSpec | None = None, caption_model: ModelSpec | None = None,
                        options: CaptionOptions | None = None, device: str = "auto",
                        batch_size: int = 32, progress: bool = False) -> CaptioningEvaluation:
    """Caption every image of a captioned folder and score the captions against its captions.

    `model` is the retrieval model CLIP-score is measured under (default: the engine's);
    `caption_model` writes the captions (default: `model` when it is a CoCa, else CoCa
    ViT-B-32). Images that cannot be decoded are left out with their captions.
    """
    from ..encoders.captioner import Captioner, load_captioner
    from ..encoders.clip import load_encoder

    model = model or ModelSpec.parse()
    caption_model = caption_model or default_caption_model(model)
    options = options or CaptionOptions()
    data = read_captioned_images(folder, captions_file, split)
    if not data.images:
        raise UsageError(f"no captioned images in {folder} to caption")
    scorer = load_encoder(model, device, batch_size)
    captioner = (Captioner(scorer, options) if caption_model.identity == model.identity
                 else load_captioner(caption_model, options, device, batch_size))
    data, pixels, unreadable = preprocess_captioned(captioner.preprocess_image, captioner.encoder.input_side,
                                                    data, batch_size, progress)
    import torch

    started = time.perf_counter()
    written: list[str] = []
    for start in range(0, len(pixels), captioner.batch_size):
        written += captioner.caption_tensors(torch.stack(pixels[start:start + captioner.batch_size]))
    caption_seconds = time.perf_counter() - started
    names = [str(path) for path in data.images]
    references = {name: [data.captions[c] for c in owned] for name, owned in zip(names, data.captions_of())}
    scores = score_captions(dict(zip(names, written)), references)
    if captioner.encoder is not scorer:  # the retrieval model may see the images otherwise
        data, pixels, _ = preprocess_captioned(scorer.preprocess_image, scorer.input_side, data,
                                               batch_size, progress)
    cosines = np.sum(encode_pixels(scorer, pixels) * scorer.encode_texts(written), axis=1)
    return CaptioningEvaluation(
        caption_model.identity, options.writer, model.identity, len(names), len(data.captions),
        dict(scores), scores.skipped, float(np.mean(cosines)),
        len(names) / caption_seconds if caption_seconds else 0.0, {"caption": caption_seconds},
        dict(zip(names, written)), unreadable)
