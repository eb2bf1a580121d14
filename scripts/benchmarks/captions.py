"""q. Captioning: CoCa ViT-B-32 captions/s against the image tower's encode rate, and how well
a tiny CoCa trained in seconds captions renders it never saw (BLEU-1..4, CIDEr)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .context import Context
from .data import synthetic_image
from .engine import Captioner, CaptionOptions, ModelSpec, load_captioner, load_encoder, score_captions
from .measure import REPO, log, timed
from .report import table

NAME = "captions"
TITLE = "q. Captioning"
SUMMARY = ("(only with --only captions) CoCa ViT-B-32 captions/s (random weights) against image\n"
           "encoding; BLEU-4 and CIDEr of a tiny CoCa trained on renders")
NEEDS: set[str] = set()
OPT_IN = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--captions-images", type=int, default=64,
                        help="images captioned and encoded for the speeds [default: 64; --quick: 4]")
    parser.add_argument("--captions-batch-size", type=int, default=16, help="their batch [default: 16]")


def describe(color: str, shape: str) -> str:
    """The renders' captions here: long enough for BLEU-4 to count 4-grams (the test suite's
    "a red circle" has none, so its BLEU-4 is 0 whatever the captions)."""
    return f"a photo of a {color} {shape}"


def caption_speed(images: int, max_length: int, batch_size: int, device: str, seed: int) -> dict:
    """Images/s of CoCa ViT-B-32 captioning (beam 3 and top-p), and of ViT-B-32 encoding the
    same preprocessed images; random weights for both (no pretrained weights here: the speeds
    are real, the captions gibberish that runs to the maximum length, the slow case)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    captioner = load_captioner(ModelSpec("coca_ViT-B-32", None), CaptionOptions(max_length=max_length),
                               device=device, batch_size=batch_size)
    # open_clip leaves the decoder's vocabulary projection uninitialised (torch.empty).
    torch.nn.init.normal_(captioner.model.text_decoder.text_projection, std=0.02)
    encoder = load_encoder(ModelSpec("ViT-B-32", None), device=device, batch_size=batch_size)
    pixels = torch.stack([captioner.preprocess_image(synthetic_image(rng)) for _ in range(images)])
    batches = [pixels[start:start + batch_size] for start in range(0, images, batch_size)]
    figures = {"images": images, "max_length": max_length, "batch_size": batch_size,
               "threads": torch.get_num_threads()}
    for name, options in (("beam", CaptionOptions(max_length=max_length)),
                          ("top-p", CaptionOptions(method="top-p", max_length=max_length))):
        writer = Captioner(captioner.encoder, options)
        written, seconds = timed(lambda writer=writer: [text for batch in batches
                                                        for text in writer.caption_tensors(batch)])
        figures[f"caption_{name}_images_per_s"] = images / seconds
        figures[f"caption_{name}_mean_words"] = float(np.mean([len(text.split()) for text in written]))
    _, seconds = timed(lambda: [encoder.encode_image_tensors(batch) for batch in batches])
    figures["encode_images_per_s"] = images / seconds
    figures["encode_over_beam"] = figures["encode_images_per_s"] / figures["caption_beam_images_per_s"]
    return figures


def tiny_coca_quality(workdir: Path, held_out_per_class: int, clip_steps: int, coca_steps: int,
                      seed: int) -> dict:
    """BLEU-1..4 and CIDEr of a tiny CoCa trained on renders, on renders it never saw."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.tiny_coca import TINY_COCA_CFG, train_tiny_coca
    from support.tiny_model import CLASSES, render_shape, train_tiny_clip, write_local_dir_model

    def train() -> str:
        clip = train_tiny_clip(seed=seed, steps=clip_steps)
        coca = train_tiny_coca(clip.visual, seed=seed, steps=coca_steps, describe=describe)
        return write_local_dir_model(workdir / "tiny-coca", coca, model_cfg=TINY_COCA_CFG)

    spec, trained_s = timed(train)
    captioner = load_captioner(ModelSpec.parse(spec), CaptionOptions(max_length=10), device="cpu")
    rng = np.random.default_rng(12345)
    pairs = [(render_shape(color, shape, rng), describe(color, shape))
             for color, shape in CLASSES for _ in range(held_out_per_class)]
    written, caption_s = timed(lambda: captioner.caption_images([image for image, _ in pairs]))
    scores = score_captions({i: text for i, text in enumerate(written)},
                            {i: [truth] for i, (_, truth) in enumerate(pairs)},
                            metrics=["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"])
    return {"held_out": len(pairs), "train_s": trained_s, "clip_steps": clip_steps, "coca_steps": coca_steps,
            "exact_match": float(np.mean([text == truth for text, (_, truth) in zip(written, pairs)])),
            "images_per_s": len(pairs) / caption_s, **dict(scores)}


def run(context: Context) -> tuple[dict, str]:
    args = context.args
    log("captions: CoCa ViT-B-32 against ViT-B-32 encoding")
    if args.quick:
        speed = caption_speed(4, 5, 4, args.device, args.seed)
        log("captions: training a tiny CoCa (a few steps)")
        quality = tiny_coca_quality(context.workdir, 1, 5, 5, args.seed)
    else:
        speed = caption_speed(args.captions_images, 20, args.captions_batch_size, args.device, args.seed)
        log("captions: training a tiny CoCa")
        quality = tiny_coca_quality(context.workdir, 4, 400, 120, args.seed)
    data = {"coca_vit_b32_speed": speed, "tiny_coca_quality": quality}
    rows = [("CoCa ViT-B-32 captions, beam 3", f"{speed['caption_beam_images_per_s']:.2f} images/s"),
            ("CoCa ViT-B-32 captions, top-p", f"{speed['caption_top-p_images_per_s']:.2f} images/s"),
            ("ViT-B-32 image encoding", f"{speed['encode_images_per_s']:.1f} images/s "
             f"({speed['encode_over_beam']:.0f}x beam captioning)"),
            (f"tiny CoCa on {quality['held_out']} held-out renders (trained in {quality['train_s']:.0f} s)",
             f"BLEU-4 {quality['BLEU-4']:.3f}, CIDEr {quality['CIDEr']:.3f}, BLEU-1 {quality['BLEU-1']:.3f}, "
             f"exact {quality['exact_match']:.3f}")]
    return data, "\n".join([
        f"Random weights (no pretrained weights here): {speed['images']} synthetic 500x375 images, up to "
        f"{speed['max_length']} tokens, batch {speed['batch_size']}, {speed['threads']} threads.", "",
        table(("measurement", "result"), rows)])
