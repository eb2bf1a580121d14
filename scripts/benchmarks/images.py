"""a. Image throughput: the encode-only ceiling, decoding alone, the end-to-end build, an
unchanged re-index, and a whole `retrieve index` process with its peak memory."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .context import Context, model_args
from .data import limited_view
from .engine import ClipEncoder, OnnxImageEncoder, default_workers, load_image, prefetch_map
from .measure import log, run_measured, timed
from .report import table

NAME = "images"
TITLE = "a. Image throughput"
SUMMARY = "encode-only ceiling, decode+preprocess, end-to-end build, unchanged re-index"
NEEDS = {"encoder", "corpus"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encode-batches", type=int, default=8,
                        help="timed batches for the encode-only ceiling [default: 8]")
    parser.add_argument("--rss-images", type=int, default=200,
                        help="images in the subprocess build that measures peak RSS; 0 skips it")


def measure_encode_only(encoder: ClipEncoder, batches: int, seed: int) -> dict:
    """`encode_image_tensors` on pre-made random pixels, after two warm-up batches."""
    shape = encoder.preprocess_image(Image.new("RGB", (64, 64))).shape
    pixels = torch.randn((encoder.batch_size, *shape), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):  # the first passes pay for allocation and page faults of fresh weights
        encoder.encode_image_tensors(pixels)
    _, seconds = timed(lambda: [encoder.encode_image_tensors(pixels) for _ in range(batches)])
    images = batches * encoder.batch_size
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def measure_tower_encode_only(tower: OnnxImageEncoder, pixels: np.ndarray, size: int) -> dict:
    """An ONNX image tower on pre-decoded `pixels`, `size` at a time after a warm-up batch:
    images per wall second and CPU seconds per image (which hardly depend on what else the
    machine runs)."""
    tower.encode_pixels(pixels[:size])
    started, cpu_started, done = time.perf_counter(), time.process_time(), 0
    for start in range(0, len(pixels) - size + 1, size):
        tower.encode_pixels(pixels[start:start + size])
        done += size
    return {"images_per_s": done / (time.perf_counter() - started),
            "cpu_s_per_image": (time.process_time() - cpu_started) / max(1, done)}


def measure_decode(encoder: ClipEncoder, paths: Sequence[Path]) -> dict:
    """`load_image` + `preprocess_image` on the build's thread pool, nothing encoded.

    `min_side` is what a build asks for: JPEG draft decoding down to twice the model's input.
    """
    workers = default_workers()
    min_side = 2 * encoder.input_side
    _, seconds = timed(lambda: sum(1 for _ in prefetch_map(
        lambda path: encoder.preprocess_image(load_image(path, min_side=min_side)), paths,
        workers, ahead=encoder.batch_size * 4)))
    return {"images": len(paths), "workers": workers, "seconds": seconds,
            "images_per_s": len(paths) / seconds}


def measure_build(context: Context) -> dict:
    """A fresh index: model load, then `index.add` of the image files, then of the whole folder
    (images unchanged by stat; its captions and texts are encoded), then once more unchanged.

    Splitting the build in two incremental calls times the image work on its own; the two
    calls together do exactly the work of one `index.add(folder)`.
    """
    corpus = context.corpus
    with context.open_index(context.workdir / "index-build") as index:
        _, load_s = timed(lambda: index.encoder)
        images, images_s = timed(lambda: index.add(*corpus.images))
        rest, rest_s = timed(lambda: index.add(corpus.folder))
        again, reindex_s = timed(lambda: index.add(corpus.folder))
    return {"model_load_s": load_s,
            "image_phase": {**images.to_dict(), "wall_s": images_s,
                            "images_per_s": images.images_encoded / images_s},
            "text_phase": {**rest.to_dict(), "wall_s": rest_s,
                           "texts_per_s": rest.texts_encoded / rest_s if rest.texts_encoded else None},
            "whole_wall_s": images_s + rest_s,
            "images_per_s_over_whole_wall": images.images_encoded / (images_s + rest_s),
            "reindex": {**again.to_dict(), "wall_s": reindex_s}}


def measure_cli_build(context: Context) -> dict:
    """`python -m retrieval.cli index FOLDER` in a subprocess over the first `--rss-images`
    images of the corpus and their captions: its wall time and peak RSS."""
    args, corpus, workdir = context.args, context.corpus, context.workdir
    folder = corpus.folder if len(corpus.images) <= args.rss_images \
        else limited_view(corpus.folder, args.rss_images, workdir / "rss-view")
    command = [sys.executable, "-m", "retrieval.cli", "index", str(folder),
               "--index", str(workdir / "index-cli-build"), *model_args(context.spec),
               "--device", args.device, "--batch-size", str(args.batch_size), "--quiet", "--json",
               *(["--int8"] if args.int8 else [])]
    wall, output, rss = run_measured(command)
    return {"wall_s": wall, "peak_rss_bytes": rss, "report": json.loads(output)}


def run(context: Context) -> tuple[dict, str]:
    args, corpus = context.args, context.corpus
    log("images: encode-only")
    encode = measure_encode_only(context.encoder, args.encode_batches, args.seed)
    log("images: decode + preprocess")
    decode = measure_decode(context.encoder, corpus.images)
    log(f"images: end-to-end build of {len(corpus.images)} images, {len(corpus.texts)} texts")
    build = measure_build(context)
    data = {"corpus": corpus.origin, "encode_only": encode, "decode_preprocess": decode,
            "build": build,
            "ratio_e2e_to_encode_only": build["image_phase"]["images_per_s"] / encode["images_per_s"]}
    if args.rss_images:
        log("images: build in a subprocess (peak RSS)")
        data["cli_build"] = measure_cli_build(context)
    return data, render(data, args)


def render(data: dict, args: argparse.Namespace) -> str:
    encode, decode, build = data["encode_only"], data["decode_preprocess"], data["build"]
    image, text, reindex = build["image_phase"], build["text_phase"], build["reindex"]
    rows = [
        ("encode-only ceiling (`encode_image_tensors`, random pixels)",
         f"{encode['images']} images, batch {args.batch_size}", f"{encode['seconds']:.2f}",
         f"{encode['images_per_s']:.1f}"),
        (f"decode + preprocess only (`load_image(min_side=2 x input)` + `preprocess_image`, "
         f"{decode['workers']} threads)",
         f"{decode['images']} images", f"{decode['seconds']:.2f}", f"{decode['images_per_s']:.1f}"),
        ("build, image phase (`index.add(*image files)`)", f"{image['images_encoded']} images",
         f"{image['wall_s']:.2f}", f"{image['images_per_s']:.1f}"),
        ("build, rest of the folder (`index.add(folder)`: captions/texts)",
         f"{text['texts_encoded']} texts", f"{text['wall_s']:.2f}",
         f"{text['texts_per_s']:.1f} texts/s" if text["texts_per_s"] else "-"),
        ("build, whole wall (both phases)", f"{image['images_encoded']} images + "
         f"{text['texts_encoded']} texts", f"{build['whole_wall_s']:.2f}",
         f"{build['images_per_s_over_whole_wall']:.1f}"),
        ("unchanged re-index (`index.add(folder)` again)", f"{reindex['unchanged']} files unchanged",
         f"{reindex['wall_s']:.3f}", "-"),
    ]
    lines = [f"Corpus: {data['corpus']}. `index.encoder` (model load and text-tower export) "
             f"before the build: {build['model_load_s']:.2f} s, not in the build times.", "",
             table(("measurement", "work", "seconds", "images/s"), rows), "",
             f"End-to-end ÷ encode-only: **{data['ratio_e2e_to_encode_only']:.2f}** "
             "(build image phase images/s over encode-only images/s)."]
    if "cli_build" in data:
        cli = data["cli_build"]
        report = cli["report"]
        lines.append(f"`python -m retrieval.cli index` in a subprocess ({report['images_encoded']} "
                     f"images, {report['texts_encoded']} texts; interpreter start, imports and model "
                     f"load included): {cli['wall_s']:.1f} s wall, peak RSS "
                     f"**{cli['peak_rss_bytes'] / 2**20:.0f} MiB**.")
    return "\n".join(lines)
