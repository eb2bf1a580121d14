"""e. int8 image encoding against fp32: the encode-only speed-up, and how often the same images
come back."""

from __future__ import annotations

import argparse

import numpy as np

from .context import Context
from .data import generated_captions
from .engine import load_encoder, load_image
from .images import measure_encode_only
from .measure import log
from .report import table

NAME = "int8"
TITLE = "e. int8 encoding against fp32"
SUMMARY = "int8 image encoding: speed-up over fp32 and top-10 agreement with it"
NEEDS = {"encoder", "corpus"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--int8-images", type=int, default=300,
                        help="images encoded both ways for the int8 agreement [default: 300]")


def top10_overlap(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean share of each query's top-10 under the `reference` scores (a row per query) that
    the `other` scores also rank in their top 10."""
    def top(scores: np.ndarray) -> np.ndarray:
        return np.argsort(-scores, axis=1)[:, :10]

    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top(reference), top(other))]))


def run(context: Context) -> tuple[dict, str]:
    """Agreement is the mean top-10 overlap over caption queries (fp32 text vectors) searched
    among the first `--int8-images` images encoded both ways; image queries likewise."""
    args, encoder, corpus = context.args, context.encoder, context.corpus
    log("int8: encode-only and agreement")
    quantised = load_encoder(context.spec, args.device, args.batch_size, int8=True)
    full_speed = measure_encode_only(encoder, args.encode_batches, args.seed)["images_per_s"]
    int8_speed = measure_encode_only(quantised, args.encode_batches, args.seed)["images_per_s"]
    images = [load_image(path, min_side=2 * encoder.input_side)
              for path in corpus.images[:args.int8_images]]
    full, int8 = encoder.encode_images(images), quantised.encode_images(images)
    texts = corpus.texts[:args.int8_images] or generated_captions(args.int8_images, args.seed)
    text_queries = encoder.encode_texts(texts)
    data = {"images": len(images), "text_queries": len(texts),
            "fp32_images_per_s": full_speed, "int8_images_per_s": int8_speed,
            "speedup": int8_speed / full_speed,
            "text_to_image_top10_overlap": top10_overlap(text_queries @ full.T, text_queries @ int8.T),
            "image_to_image_top10_overlap": top10_overlap(full @ full.T, full @ int8.T),
            "min_cosine_fp32_int8": float((full * int8).sum(axis=1).min())}
    rows = [["encode-only, fp32", f"{full_speed:.1f} img/s"],
            ["encode-only, int8", f"{int8_speed:.1f} img/s ({data['speedup']:.2f}x)"],
            ["text→image top-10 overlap with fp32", f"{data['text_to_image_top10_overlap']:.3f}"],
            ["image→image top-10 overlap with fp32", f"{data['image_to_image_top10_overlap']:.3f}"],
            ["lowest cosine, same image fp32 vs int8", f"{data['min_cosine_fp32_int8']:.4f}"]]
    return data, table(["int8 dynamic quantisation", f"{len(images)} images"], rows)
