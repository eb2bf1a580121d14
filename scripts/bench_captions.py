"""Captioning benchmark (issue 17): how fast a CoCa ViT-B-32 writes captions on this machine,
against how fast the index's image tower encodes, and how well a tiny CoCa trained in seconds
captions held-out synthetic renders (BLEU-1..4, CIDEr).

    python3 scripts/bench_captions.py            # 64 images; the tiny CoCa trained fully (minutes)
    python3 scripts/bench_captions.py --quick    # a smoke run: 4 images, a few training steps
    python3 scripts/bench_captions.py --json captions.json

No pretrained weights exist here, so ViT-B-32 and coca_ViT-B-32 run with random weights: the
speeds are real, the captions gibberish (a random decoder rarely ends early: every caption runs
to the maximum length, the slow case). The tiny models come from the test suite's support code
(tests/support), trained on coloured-shape renders. Uses only the engine's public API
(`retrieval`). `run(args)` returns the figures as a dict, for scripts/benchmark.py to include.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from retrieval import Captioner, CaptionOptions, ModelSpec, load_captioner, load_encoder, score_captions

TESTS = Path(__file__).resolve().parents[1] / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.tiny_coca import TINY_COCA_CFG, train_tiny_coca  # noqa: E402
from support.tiny_model import CLASSES, render_shape, train_tiny_clip, write_local_dir_model  # noqa: E402


def describe(color: str, shape: str) -> str:
    """The renders' captions for this benchmark: long enough for BLEU-4 to count 4-grams (the
    test suite's "a red circle" has none, so its BLEU-4 is 0 whatever the captions)."""
    return f"a photo of a {color} {shape}"


def caption_speed(images: int, max_length: int, batch_size: int, seed: int = 0) -> dict:
    """Images/s of CoCa ViT-B-32 captioning (beam 3 and top-p), and of ViT-B-32 encoding the
    same preprocessed images; random weights for both."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    captioner = load_captioner(ModelSpec("coca_ViT-B-32", None), CaptionOptions(max_length=max_length),
                               device="cpu", batch_size=batch_size)
    # open_clip leaves the decoder's vocabulary projection uninitialised (torch.empty).
    torch.nn.init.normal_(captioner.model.text_decoder.text_projection, std=0.02)
    encoder = load_encoder(ModelSpec("ViT-B-32", None), device="cpu", batch_size=batch_size)
    from PIL import Image

    photos = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)) for _ in range(images)]
    pixels = torch.stack([captioner.preprocess_image(photo) for photo in photos])
    figures = {"images": images, "max_length": max_length, "batch_size": batch_size,
               "threads": torch.get_num_threads()}
    for name, options in (("beam", CaptionOptions(max_length=max_length)),
                          ("top-p", CaptionOptions(method="top-p", max_length=max_length))):
        writer = Captioner(captioner.encoder, options)
        started = time.perf_counter()
        written = [caption for start in range(0, images, batch_size)
                   for caption in writer.caption_tensors(pixels[start:start + batch_size])]
        figures[f"caption_{name}_images_per_s"] = images / (time.perf_counter() - started)
        figures[f"caption_{name}_mean_words"] = float(np.mean([len(text.split()) for text in written]))
    started = time.perf_counter()
    for start in range(0, images, batch_size):
        encoder.encode_image_tensors(pixels[start:start + batch_size])
    figures["encode_images_per_s"] = images / (time.perf_counter() - started)
    figures["encode_over_beam"] = figures["encode_images_per_s"] / figures["caption_beam_images_per_s"]
    return figures


def tiny_coca_quality(workdir: Path, held_out_per_class: int, clip_steps: int, coca_steps: int,
                      seed: int = 0) -> dict:
    """BLEU-1..4 and CIDEr of a tiny CoCa trained on renders, on renders it never saw."""
    started = time.perf_counter()
    clip = train_tiny_clip(seed=seed, steps=clip_steps)
    coca = train_tiny_coca(clip.visual, seed=seed, steps=coca_steps, describe=describe)
    spec = write_local_dir_model(workdir / "tiny-coca", coca, model_cfg=TINY_COCA_CFG)
    trained_s = time.perf_counter() - started
    captioner = load_captioner(ModelSpec.parse(spec), CaptionOptions(max_length=10), device="cpu")
    rng = np.random.default_rng(12345)
    pairs = [(render_shape(color, shape, rng), describe(color, shape))
             for color, shape in CLASSES for _ in range(held_out_per_class)]
    started = time.perf_counter()
    written = captioner.caption_images([image for image, _ in pairs])
    caption_s = time.perf_counter() - started
    scores = score_captions({i: text for i, text in enumerate(written)},
                            {i: [truth] for i, (_, truth) in enumerate(pairs)},
                            metrics=["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"])
    return {"held_out": len(pairs), "train_s": trained_s, "clip_steps": clip_steps, "coca_steps": coca_steps,
            "exact_match": float(np.mean([text == truth for text, (_, truth) in zip(written, pairs)])),
            "images_per_s": len(pairs) / caption_s, **dict(scores)}


def run(args: argparse.Namespace) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        if args.quick:
            speed = caption_speed(images=4, max_length=5, batch_size=4)
            quality = tiny_coca_quality(Path(workdir), held_out_per_class=1, clip_steps=5, coca_steps=5)
        else:
            speed = caption_speed(images=args.images, max_length=20, batch_size=args.batch_size)
            quality = tiny_coca_quality(Path(workdir), held_out_per_class=4, clip_steps=400, coca_steps=120)
    return {"coca_vit_b32_speed": speed, "tiny_coca_quality": quality}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds, figures meaningless")
    parser.add_argument("--images", type=int, default=64, help="images captioned and encoded for the speeds")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = run(args)
    speed, quality = figures["coca_vit_b32_speed"], figures["tiny_coca_quality"]
    print(f"CoCa ViT-B-32 (random weights), {speed['images']} images, up to {speed['max_length']} tokens, "
          f"{speed['threads']} threads:")
    print(f"  captions, beam 3: {speed['caption_beam_images_per_s']:.2f} images/s; "
          f"top-p: {speed['caption_top-p_images_per_s']:.2f} images/s")
    print(f"  ViT-B-32 image encoding: {speed['encode_images_per_s']:.1f} images/s "
          f"({speed['encode_over_beam']:.0f}x beam captioning)")
    print(f"tiny CoCa trained in {quality['train_s']:.0f} s, {quality['held_out']} held-out renders: "
          f"exact {quality['exact_match']:.3f}, BLEU-4 {quality['BLEU-4']:.3f}, CIDEr {quality['CIDEr']:.3f} "
          f"(BLEU-1 {quality['BLEU-1']:.3f})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
