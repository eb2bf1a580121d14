"""e. int8 image encoding against fp32, as `retrieve index --int8` does it (the ONNX image
tower's 8-bit twin): the encode-only speed-up, and how often the same images come back."""

from __future__ import annotations

import argparse

import numpy as np

from .context import Context
from .data import generated_captions
from .engine import Index, OnnxImageEncoder, load_image
from .images import measure_tower_encode_only
from .measure import log
from .report import table

NAME = "int8"
TITLE = "e. int8 encoding against fp32"
SUMMARY = "int8 image encoding (the image tower's 8-bit twin): speed-up over fp32, top-10 agreement"
NEEDS = {"model", "corpus"}


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
    """Agreement is the mean top-10 overlap over caption queries (the fp32 text tower's vectors)
    searched among the first `--int8-images` images encoded both ways; image queries likewise.
    Speeds are the towers' on those images' pixels, batch `--batch-size`."""
    args, corpus = context.args, context.corpus
    log("int8: the image tower against its 8-bit twin, encode-only and agreement")
    folder = context.workdir / "int8-towers"
    with context.open_index(folder) as index:
        index.image_encoder  # noqa: B018 - exports the towers, twins with them, into the index
    with Index.open(folder, readonly=True) as exact, \
            Index.open(folder, readonly=True, int8=True) as eight_bit:
        towers = exact.image_encoder, eight_bit.image_encoder
        if not all(isinstance(tower, OnnxImageEncoder) for tower in towers):
            return {"failed": "no ONNX image tower"}, "int8: no ONNX image tower for this model"
        pixels = np.stack([towers[0].preprocess(load_image(path, min_side=2 * towers[0].input_side))
                           for path in corpus.images[:args.int8_images]])
        full, int8 = (np.concatenate([tower.encode_pixels(pixels[start:start + args.batch_size])
                                      for start in range(0, len(pixels), args.batch_size)])
                      for tower in towers)
        full_speed, int8_speed = (measure_tower_encode_only(tower, pixels, args.batch_size)["images_per_s"]
                                  for tower in towers)
        texts = corpus.texts[:args.int8_images] or generated_captions(args.int8_images, args.seed)
        text_queries = exact.text_encoder.encode_texts(texts)
    data = {"images": len(pixels), "text_queries": len(texts), "twin": not np.array_equal(full, int8),
            "fp32_images_per_s": full_speed, "int8_images_per_s": int8_speed,
            "speedup": int8_speed / full_speed,
            "text_to_image_top10_overlap": top10_overlap(text_queries @ full.T, text_queries @ int8.T),
            "image_to_image_top10_overlap": top10_overlap(full @ full.T, full @ int8.T),
            "min_cosine_fp32_int8": float((full * int8).sum(axis=1).min())}
    rows = [["encode-only, fp32 tower", f"{full_speed:.1f} img/s"],
            ["encode-only, 8-bit twin" if data["twin"] else "encode-only, no twin: the fp32 tower",
             f"{int8_speed:.1f} img/s ({data['speedup']:.2f}x)"],
            ["text→image top-10 overlap with fp32", f"{data['text_to_image_top10_overlap']:.3f}"],
            ["image→image top-10 overlap with fp32", f"{data['image_to_image_top10_overlap']:.3f}"],
            ["lowest cosine, same image fp32 vs int8", f"{data['min_cosine_fp32_int8']:.5f}"]]
    return data, table(["`--int8` image encoding", f"{len(pixels)} images"], rows)
