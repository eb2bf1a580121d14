#!/usr/bin/env python3
"""Benchmark the retrieval engine through its own code paths and print Markdown tables.

    python3 scripts/benchmark.py                    # full run (5-10 min on 2 CPU cores)
    python3 scripts/benchmark.py --quick            # tiny model, 100 images, N=10k (~1 min)
    python3 scripts/benchmark.py --only ann --sizes 10000 --json ann.json

Sections (pick with --only / --skip):
  images  encode-only ceiling, decode+preprocess, end-to-end build, unchanged re-index
  text    single-query latency and batch throughput of the text encoder
  ann     every FAISS kind in retrieval.vectors: build time, size, latency, recall@10, knobs
  cli     cold `python -m retrieval.cli` search, warm Index.search, warm vector search
  int8    int8 image encoding: speed-up over fp32 and top-10 agreement with it
  audio   audio tower training (time, held-out recall) and audio indexing rate on synthetic sounds
  serve   `retrieve serve` over the corpus: warm HTTP query latency, and requests/s with 8 clients
  video   video indexing rate (seconds of video per second) on a synthetic 640x360 H.264 clip
  scale   (only with --scale) a 10M-vector on-disk IVF-PQ index from synthetic 512-d vectors:
          build time, RAM and disk per vector, query latency and recall@10; metadata lookups
          in SQLite against a columnar Arrow file at the same row count
  ray     (only with --only ray) a whole build on a local Ray beside the same build run locally
  noop    an unchanged re-index as a whole process (`python -m retrieval.cli index`), beside
          rclip's re-run over the same unchanged folder when rclip is installed (--rclip)
  breakeven (only with --only breakeven) whole `retrieve index` processes over the first N
          images on the local engine and on Ray: the corpus size from which Ray pays off

The default model is ViT-B-32 with seeded random weights written as a `local-dir:` model
(speed does not depend on weight values, and nothing is downloaded).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import av
import faiss
import httpx
import numpy as np
import open_clip
import soundfile
import torch
from PIL import Image
from safetensors.torch import save_file

from retrieval import ClipEncoder, Index, ModelSpec, load_encoder
from retrieval.core.concurrency import default_workers, prefetch_map
from retrieval.core.types import MEMORY_INDEX_TYPES
from retrieval.encoders.text_tower import NumpyTextEncoder, export_text_tower, load_text_tower
from retrieval.media.captions import CAPTION_FILE_NAMES
from retrieval.media.corpus import read_items, walk_sources
from retrieval.media.images import load_image
from retrieval.storage.ondisk import build_on_disk
from retrieval.storage.store import Store
from retrieval.storage.vectors import SearchKnobs, VectorIndex
from retrieval.train.audio import AudioTrainingOptions

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flickr8k-test"
SECTIONS = ("images", "text", "ann", "cli", "int8", "audio", "serve", "video", "noop", "scale", "ray",
            "breakeven")
OPT_IN_SECTIONS = ("scale", "ray", "breakeven")  # run only when named in --only
RCLIP_GRAPH = "ViT-B-32-256"  # the open_clip graph rclip 3.x runs, as ONNX
RCLIP_MODEL_DIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where in its data folder rclip looks for it
QUERY = "a dog in the park"
TEXT_BATCH = 256  # batch throughput is also measured at this batch, beside --batch-size
K = 10
ANN_DIM = 512
ANN_TOPICS = 50  # centres lie around topics, so neighbours past a point's own cluster are related
ANN_CENTRES = 1000
ANN_NOISE = 1.0  # expected norm of the noise added to a unit centre: cos(point, centre) ~ 0.7
RECALL_TARGET = 0.95
EF_SEARCH = (16, 32, 64, 128)
NPROBE = (8, 16, 32, 64)
RERANK = (1, 4, 10, 50)
SOUND_RATE = 16000
PITCHES = (220.0, 440.0, 880.0, 1760.0)
PATTERNS = ("steady", "pulsing", "rising")

T = TypeVar("T")
R = TypeVar("R")


# -- small helpers ----------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stderr, so stdout holds nothing but the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(function: Callable[[], T]) -> tuple[T, float]:
    """(result, wall seconds) of one call."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def time_each(function: Callable[[T], R], items: Sequence[T], warmup: int = 3
              ) -> tuple[list[R], list[float]]:
    """Call `function` on each item after `warmup` untimed calls; (results, milliseconds)."""
    for item in items[:warmup]:
        function(item)
    results, millis = [], []
    for item in items:
        start = time.perf_counter()
        results.append(function(item))
        millis.append((time.perf_counter() - start) * 1000)
    return results, millis


def percentiles(millis: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(millis, 50)), "p95_ms": float(np.percentile(millis, 95)),
            "mean_ms": float(np.mean(millis))}


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# Runs the command given as its arguments and prints its wall time and peak RSS (KiB) last on
# stderr. Measured from this small process: on Linux a child's ru_maxrss starts at the RSS of
# the process it was forked from, which here would be the benchmark with its models loaded.
MEASURE_CHILD = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      file=sys.stderr)
sys.exit(code)
"""


def run_measured(command: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None
                 ) -> tuple[float, str, int]:
    """Run a command to its end: (wall seconds, stdout, peak RSS in bytes of that process)."""
    result = subprocess.run([sys.executable, "-c", MEASURE_CHILD, *command],
                            capture_output=True, text=True, cwd=cwd, env=env)
    *errors, measured = result.stderr.splitlines()
    if result.returncode:
        raise RuntimeError(f"{shlex.join(command)} exited {result.returncode}: "
                           + "\n".join(errors)[-2000:])
    wall, rss = measured.split()
    return float(wall), result.stdout, int(rss) * 1024  # Linux reports KiB


def model_args(spec: ModelSpec) -> list[str]:
    return ["--model", spec.name] + (["--pretrained", spec.pretrained] if spec.pretrained else [])


def open_index(folder: Path, spec: ModelSpec, args: argparse.Namespace) -> Index:
    return Index.open(folder, model=spec.name, pretrained=spec.pretrained, create=True,
                      device=args.device, batch_size=args.batch_size, int8=args.int8)


# -- models and data --------------------------------------------------------------------------


def write_random_vit_b32(folder: Path, seed: int) -> str:
    """ViT-B-32 with seeded random weights as a `local-dir:` model; returns its spec."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model("ViT-B-32")
    size = open_clip.get_model_config("ViT-B-32")["vision_cfg"]["image_size"]
    config = {
        "model_cfg": open_clip.get_model_config("ViT-B-32"),
        "preprocess_cfg": {"size": size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                           "std": list(open_clip.OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def prepare_model(args: argparse.Namespace, workdir: Path) -> tuple[ModelSpec, str]:
    """The model to benchmark and a description of it."""
    if args.model:
        return ModelSpec.parse(args.model, args.pretrained), args.model
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_model import write_local_dir_model

        spec = write_local_dir_model(workdir / "tiny-model", seed=args.seed)
        return ModelSpec.parse(spec), f"tiny open_clip test model, random weights (seed {args.seed})"
    spec = write_random_vit_b32(workdir / "vit-b-32", args.seed)
    return ModelSpec.parse(spec), f"ViT-B-32, random weights (seed {args.seed})"


def synthetic_image(rng: np.random.Generator, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A smooth random picture with sensor-like noise: decodes about as fast as a photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.float32)
    noisy = smooth + rng.normal(0, 8, smooth.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_synthetic_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        synthetic_image(rng).save(folder / f"synthetic_{number:05d}.jpg", quality=90)


@dataclass
class Corpus:
    """The folder the build indexes, its image files in walk order, and its texts."""

    folder: Path
    images: list[Path]
    texts: list[str]
    origin: str


def prepare_corpus(args: argparse.Namespace, workdir: Path) -> Corpus:
    """The image folder (default: the Flickr8k test split), limited or synthetic as asked."""
    source = args.images or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if source is None:
        count = min(args.synthetic, args.limit or args.synthetic)
        folder = workdir / "synthetic"
        write_synthetic_images(folder / "images", count, args.seed)
        origin = f"{count} synthetic 500x375 JPEGs"
    elif args.limit:
        folder = limited_view(Path(source), args.limit, workdir / "view")
        origin = f"first {args.limit} images of {source} (symlinked), with their captions"
    else:
        folder, origin = Path(source), str(source)
    walk = walk_sources([folder])
    images = [Path(f.path) for f in walk.files if f.kind == "image"]
    if not images:
        raise SystemExit(f"no images under {folder}")
    texts = [item.text for f in walk.files if f.kind != "image"
             for item in read_items(f, Path(f.path).read_bytes()) if item.text]
    return Corpus(folder, images, texts, origin)


def limited_view(source: Path, limit: int, view: Path) -> Path:
    """A folder of symlinks to the first `limit` images of `source` (same relative paths) and
    a captions.tsv holding the captions of those images from `source`'s top-level captions."""
    source = source.expanduser().absolute()
    walk = walk_sources([source])
    images = [Path(f.path) for f in walk.files if f.kind == "image"][:limit]
    for image in images:
        link = view / image.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image)
    kept = {image.name for image in images}
    captions = [f for f in walk.files if f.kind == "captions" and Path(f.path).parent == source
                and Path(f.path).name in CAPTION_FILE_NAMES]
    lines, seen = [], dict.fromkeys(kept, 0)
    for captions_file in captions:
        for item in read_items(captions_file, Path(captions_file.path).read_bytes()):
            name = Path(item.parent_ref or "").name
            if name in kept and item.text:
                lines.append(f"{item.parent_ref}#{seen[name]}\t{item.text}")
                seen[name] += 1
    if lines:
        (view / "captions.tsv").write_text("\n".join(lines) + "\n")
    return view


def generated_captions(count: int, seed: int) -> list[str]:
    """Caption-like sentences of ~10 words, for when the corpus has no captions."""
    rng = np.random.default_rng(seed)
    subjects = ["A black dog", "Two children", "A man in a red shirt", "A woman", "A brown horse",
                "Three people", "A little girl", "A cyclist"]
    actions = ["runs across", "is sitting on", "jumps over", "walks along", "plays in", "stands near"]
    places = ["a grassy park .", "the sandy beach .", "a busy city street .", "a snowy hill .",
              "the shallow water .", "a wooden bench ."]
    return [" ".join((rng.choice(subjects), rng.choice(actions), rng.choice(places)))
            for _ in range(count)]


# -- a. images --------------------------------------------------------------------------------


def measure_encode_only(encoder: ClipEncoder, batches: int, seed: int) -> dict:
    """`encode_image_tensors` on pre-made random pixels, after two warm-up batches."""
    shape = encoder.preprocess_image(Image.new("RGB", (64, 64))).shape
    pixels = torch.randn((encoder.batch_size, *shape), generator=torch.Generator().manual_seed(seed))
    for _ in range(2):  # the first passes pay for allocation and page faults of fresh weights
        encoder.encode_image_tensors(pixels)
    _, seconds = timed(lambda: [encoder.encode_image_tensors(pixels) for _ in range(batches)])
    images = batches * encoder.batch_size
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def measure_decode(encoder: ClipEncoder, paths: Sequence[Path]) -> dict:
    """`load_image` + `preprocess_image` on the build's thread pool, nothing encoded.

    `min_side` is what `Builder._decode` passes (JPEG draft decoding down to twice the input).
    """
    workers = default_workers()
    min_side = 2 * encoder.input_side
    _, seconds = timed(lambda: sum(1 for _ in prefetch_map(
        lambda path: encoder.preprocess_image(load_image(path, min_side=min_side)), paths,
        workers, ahead=encoder.batch_size * 4)))
    return {"images": len(paths), "workers": workers, "seconds": seconds,
            "images_per_s": len(paths) / seconds}


def measure_build(corpus: Corpus, spec: ModelSpec, args: argparse.Namespace, workdir: Path) -> dict:
    """A fresh index: model load, then `index.add` of the image files, then of the whole folder
    (images unchanged by stat; its captions and texts are encoded), then once more unchanged.

    Splitting the build in two incremental calls times the image work on its own; the two
    calls together do exactly the work of one `index.add(folder)`.
    """
    with open_index(workdir / "index-build", spec, args) as index:
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


def measure_cli_build(corpus: Corpus, spec: ModelSpec, args: argparse.Namespace,
                      workdir: Path) -> dict:
    """`python -m retrieval.cli index FOLDER` in a subprocess over the first `--rss-images`
    images of the corpus and their captions: its wall time and peak RSS."""
    folder = corpus.folder if len(corpus.images) <= args.rss_images \
        else limited_view(corpus.folder, args.rss_images, workdir / "rss-view")
    command = [sys.executable, "-m", "retrieval.cli", "index", str(folder),
               "--index", str(workdir / "index-cli-build"), *model_args(spec),
               "--device", args.device, "--batch-size", str(args.batch_size), "--quiet", "--json",
               *(["--int8"] if args.int8 else [])]
    wall, output, rss = run_measured(command)
    return {"wall_s": wall, "peak_rss_bytes": rss, "report": json.loads(output)}


def section_images(corpus: Corpus, encoder: ClipEncoder, spec: ModelSpec,
                   args: argparse.Namespace, workdir: Path) -> tuple[dict, str]:
    log("images: encode-only")
    encode = measure_encode_only(encoder, args.encode_batches, args.seed)
    log("images: decode + preprocess")
    decode = measure_decode(encoder, corpus.images)
    log(f"images: end-to-end build of {len(corpus.images)} images, {len(corpus.texts)} texts")
    build = measure_build(corpus, spec, args, workdir)
    data = {"corpus": corpus.origin, "encode_only": encode, "decode_preprocess": decode,
            "build": build,
            "ratio_e2e_to_encode_only": build["image_phase"]["images_per_s"] / encode["images_per_s"]}
    if args.rss_images:
        log("images: build in a subprocess (peak RSS)")
        data["cli_build"] = measure_cli_build(corpus, spec, args, workdir)
    return data, render_images(data, args)


def render_images(data: dict, args: argparse.Namespace) -> str:
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


# -- b. text ----------------------------------------------------------------------------------



def measure_text_latency(encoder: ClipEncoder | NumpyTextEncoder, texts: Sequence[str], count: int,
                         seed: int) -> dict:
    """`encode_texts([q])` for `count` texts picked at random, after five warm-up calls."""
    picks = np.random.default_rng(seed).choice(len(texts), count, replace=len(texts) < count)
    queries = [texts[i] for i in picks]
    _, millis = time_each(lambda query: encoder.encode_texts([query]), queries, warmup=5)
    return {"queries": count, "mean_words": statistics.mean(len(q.split()) for q in queries),
            **percentiles(millis)}


def numpy_text_tower(encoder: ClipEncoder, folder: Path) -> NumpyTextEncoder | None:
    """The numpy text tower a build exports and index readers answer text queries with
    (None for a model whose text tower is not the standard one)."""
    folder.mkdir(parents=True, exist_ok=True)
    return load_text_tower(folder, encoder.spec.identity) if export_text_tower(encoder, folder) else None


def measure_text_throughput(encoder: ClipEncoder, texts: Sequence[str], batch: int) -> dict:
    """`encode_texts` over all `texts` by an encoder sharing the model, `batch` texts a pass."""
    batched = ClipEncoder(encoder.spec, encoder.model, encoder.preprocess, encoder.tokenizer,
                          encoder.device, batch)
    batched.encode_texts(texts[:batch])
    _, seconds = timed(lambda: batched.encode_texts(texts))
    return {"batch": batch, "texts": len(texts), "seconds": seconds, "texts_per_s": len(texts) / seconds}


def section_text(corpus_texts: list[str], encoder: ClipEncoder, args: argparse.Namespace,
                 workdir: Path) -> tuple[dict, str]:
    """Single-query latency (torch model, and the numpy tower readers use) and batch throughput."""
    texts = corpus_texts or generated_captions(args.texts, args.seed)
    log(f"text: {args.text_queries} single-query encodes")
    latency = measure_text_latency(encoder, texts, args.text_queries, args.seed)
    tower = None if args.int8 else numpy_text_tower(encoder, workdir / "text-tower")
    tower_latency = measure_text_latency(tower, texts, args.text_queries, args.seed) if tower else None
    many = [texts[i % len(texts)] for i in range(args.texts)]
    throughput = []
    for batch in sorted({args.batch_size, TEXT_BATCH}):
        log(f"text: {len(many)} texts in batches of {batch}")
        throughput.append(measure_text_throughput(encoder, many, batch))
    data = {"source": "corpus captions" if corpus_texts else "generated captions",
            "single_query": latency, "single_query_numpy_tower": tower_latency,
            "throughput": throughput}
    rows = [(f"single query, `ClipEncoder.encode_texts([q])` ({latency['queries']} queries, "
             f"{latency['mean_words']:.1f} words avg)",
             f"p50 {latency['p50_ms']:.1f} ms, p95 {latency['p95_ms']:.1f} ms"),
            ("single query, `NumpyTextEncoder.encode_texts([q])` (what index readers use)",
             f"p50 {tower_latency['p50_ms']:.1f} ms, p95 {tower_latency['p95_ms']:.1f} ms"
             if tower_latency else "none: builds export no tower for this model or with --int8")]
    rows += [(f"batch throughput, {t['texts']} texts in batches of {t['batch']}"
              + (" (the build's batch)" if t["batch"] == args.batch_size else ""),
              f"{t['texts_per_s']:.0f} texts/s") for t in throughput]
    return data, f"Texts: {data['source']}.\n\n" + table(("measurement", "result"), rows)


# -- c. ANN -----------------------------------------------------------------------------------


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def clustered_points(rng: np.random.Generator, centres: np.ndarray, count: int,
                     chunk: int = 100_000) -> np.ndarray:
    """Unit vectors scattered around random centres, made a chunk at a time to bound memory."""
    dim = centres.shape[1]
    points = np.empty((count, dim), np.float32)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        noise = rng.standard_normal((size, dim), dtype=np.float32) * (ANN_NOISE / np.sqrt(dim))
        points[start:start + size] = unit_rows(centres[rng.integers(len(centres), size=size)] + noise)
    return points


def ann_dataset(count: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` clustered unit vectors and held-out queries drawn around the same centres.

    The centres themselves cluster around topics: with centres alone, a point's neighbours
    beyond its own cluster (~10 points at N=10k) would be unrelated points whose order is noise.
    """
    rng = np.random.default_rng(seed)
    topics = unit_rows(rng.standard_normal((ANN_TOPICS, ANN_DIM), dtype=np.float32))
    centres = clustered_points(rng, topics, ANN_CENTRES)
    return clustered_points(rng, centres, count), clustered_points(rng, centres, queries)


def knob_settings(kind: str) -> list[SearchKnobs]:
    """The sweep for a kind, always including the library's defaults."""
    if kind == "hnsw":
        settings = [SearchKnobs(ef_search=ef) for ef in EF_SEARCH]
    elif kind.startswith("ivf"):
        settings = [SearchKnobs(nprobe=p, rerank=r) for p in NPROBE for r in RERANK]
    else:
        settings = [SearchKnobs()]
    return settings + [SearchKnobs()] if SearchKnobs() not in settings else settings


def knob_label(kind: str, knobs: SearchKnobs) -> str:
    if kind == "hnsw":
        return f"efSearch={knobs.ef_search}"
    if kind.startswith("ivf"):
        return f"nprobe={knobs.nprobe}, rerank={knobs.rerank_for(kind)}"
    return "exact"


def recall_at_k(found: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth)]))


def measure_kind(kind: str, vectors: np.ndarray, queries: np.ndarray,
                 truth: Sequence[np.ndarray] | None) -> tuple[dict, list[np.ndarray]]:
    """Build one kind, then search it with every knob setting; recall against `truth`
    (None: this is the exact index, the truth itself). Returns the result and the ids found
    at default knobs."""
    index, build_s = timed(lambda: VectorIndex.build(kind, ANN_DIM, np.arange(len(vectors)), vectors))
    size = len(faiss.serialize_index(index.index))
    settings, default_found = [], []
    for knobs in knob_settings(kind):
        results, millis = time_each(
            lambda q: index.search(q, K, knobs=knobs, exact=lambda ids: vectors[ids])[1],  # noqa: B023
            list(queries), warmup=10)
        settings.append({"label": knob_label(kind, knobs), "knobs": asdict(knobs),
                         "default": knobs == SearchKnobs(), **percentiles(millis),
                         "recall_at_10": recall_at_k(results, truth if truth is not None else results)})
        if knobs == SearchKnobs():
            default_found = results
    reaching = [s for s in settings if s["recall_at_10"] >= RECALL_TARGET]
    cheapest = min(reaching, key=lambda s: s["p50_ms"]) if reaching else None
    return {"kind": index.kind, "n": len(vectors), "build_s": build_s,
            "bytes_per_vector": size / len(vectors), "settings": settings,
            "default": next(s for s in settings if s["default"]),
            "cheapest_reaching_target": cheapest}, default_found


def measure_ann_size(count: int, args: argparse.Namespace) -> list[dict]:
    log(f"ann: N={count}: generating {count} clustered vectors")
    vectors, queries = ann_dataset(count, args.queries, args.seed)
    log(f"ann: N={count}: flat")
    flat, truth = measure_kind("flat", vectors, queries, None)
    results = [flat]
    for kind in MEMORY_INDEX_TYPES[1:]:  # on-disk kinds: see --scale
        log(f"ann: N={count}: {kind}")
        results.append(measure_kind(kind, vectors, queries, truth)[0])
    return results


def section_ann(args: argparse.Namespace) -> tuple[dict, str]:
    results = [result for count in args.sizes for result in measure_ann_size(count, args)]
    data = {"dim": ANN_DIM, "topics": ANN_TOPICS, "centres": ANN_CENTRES, "noise_norm": ANN_NOISE, "k": K,
            "queries": args.queries, "recall_target": RECALL_TARGET, "results": results}
    return data, render_ann(data)


def render_ann(data: dict) -> str:
    results = data["results"]
    main = [(f"{r['n']:,}", r["kind"], f"{r['build_s']:.2f}", f"{r['bytes_per_vector']:.0f}",
             r["default"]["label"], f"{r['default']['p50_ms']:.3f}", f"{r['default']['p95_ms']:.3f}",
             f"{r['default']['recall_at_10']:.3f}") for r in results]
    sweep = [(f"{r['n']:,}", r["kind"], s["label"] + (" (default)" if s["default"] else ""),
              f"{s['p50_ms']:.3f}", f"{s['p95_ms']:.3f}", f"{s['recall_at_10']:.3f}")
             for r in results if r["kind"] != "flat" for s in r["settings"]]
    cheapest = [(f"{r['n']:,}", r["kind"],
                 c["label"] if (c := r["cheapest_reaching_target"]) else "none in the sweep",
                 f"{c['p50_ms']:.3f}" if c else "-", f"{c['recall_at_10']:.3f}" if c else "-",
                 "yes" if r["default"]["recall_at_10"] >= RECALL_TARGET else "**no**")
                for r in results if r["kind"] != "flat"]
    return "\n".join([
        f"{data['queries']} held-out queries, {data['dim']}-d unit vectors around "
        f"{data['centres']} centres, themselves around {data['topics']} random topics (noise norm "
        f"{data['noise_norm']} at both levels), k={data['k']}, "
        "`VectorIndex.search(q, 10, knobs=..., exact=lambda ids: vectors[ids])`.", "",
        "At the library's default knobs (`SearchKnobs()`):", "",
        table(("N", "kind", "build s", "bytes/vector¹", "knobs", "p50 ms", "p95 ms", "recall@10"), main),
        "", "Knob sweep:", "",
        table(("N", "kind", "knobs", "p50 ms", "p95 ms", "recall@10"), sweep), "",
        f"Cheapest setting (lowest p50) reaching recall@10 >= {RECALL_TARGET}:", "",
        table(("N", "kind", "cheapest setting", "p50 ms", "recall@10", "defaults reach it?"), cheapest),
        "",
        "¹ `len(faiss.serialize_index(index)) / N`: codes or vectors, ids, graph links and lists. "
        "It leaves out the exact vectors IVF kinds re-rank with (4 x dim bytes each, kept in "
        "SQLite by the product; a NumPy array here, so re-ranking costs no SQLite reads).",
    ])


# -- d. CLI and API latency -------------------------------------------------------------------


def measure_warm_search(reader: Index, runs: int) -> dict:
    """`Index.search` on an index opened read-only (as the CLI opens it), then the calls it
    makes once the query vector exists."""
    _, api = time_each(lambda _: reader.search(QUERY, k=K), range(runs))
    vector = reader.text_encoder.encode_texts([QUERY])[0]
    _, vector_only = time_each(lambda _: reader.vectors("image").search(
        vector, K, None, reader.search_knobs(), reader.store.vectors_for_ids), range(runs))
    return {"runs": runs, "text_encoder": type(reader.text_encoder).__name__,
            "index_kind": reader.vectors("image").kind, "api_search": percentiles(api),
            "vector_search": percentiles(vector_only)}


def section_cli(spec: ModelSpec, args: argparse.Namespace, workdir: Path) -> tuple[dict, str]:
    """Cold `python -m retrieval.cli` searches, then warm in-process searches, on a small index."""
    folder, path = workdir / "cli-images", workdir / "index-cli"
    write_synthetic_images(folder, args.cli_images, args.seed + 1)
    log(f"cli: building a {args.cli_images}-image index")
    with open_index(path, spec, args) as writer:
        writer.add(folder)
    command = [sys.executable, "-m", "retrieval.cli", QUERY, "--index", str(path), "-k", "5",
               "--device", args.device]
    log(f"cli: {args.cli_runs} cold CLI searches")
    runs = [run_measured(command) for _ in range(args.cli_runs)]
    walls = [wall for wall, _, _ in runs]
    log(f"cli: {args.api_runs} warm Index.search calls")
    with Index.open(path, readonly=True, device=args.device) as reader:
        warm = measure_warm_search(reader, args.api_runs)
    data = {"images": args.cli_images, "query": QUERY, **warm,
            "cold_cli": {"runs": walls, "median_s": statistics.median(walls), "min_s": min(walls),
                         "peak_rss_bytes": max(rss for _, _, rss in runs)}}
    cold, api, vector = data["cold_cli"], data["api_search"], data["vector_search"]
    rows = [
        (f"cold `python -m retrieval.cli \"{QUERY}\" -k 5` ({len(walls)} runs)",
         f"median {cold['median_s']:.2f} s, min {cold['min_s']:.2f} s, "
         f"peak RSS {cold['peak_rss_bytes'] / 2**20:.0f} MiB"),
        (f"warm `index.search(\"{QUERY}\", k=10)`, text encoding included",
         f"p50 {api['p50_ms']:.2f} ms, p95 {api['p95_ms']:.2f} ms"),
        ("warm vector search: `index.vectors('image').search(vector, 10, ...)`²",
         f"p50 {vector['p50_ms']:.3f} ms, p95 {vector['p95_ms']:.3f} ms"),
    ]
    return data, "\n".join([
        f"Index: {args.cli_images} synthetic images ({data['index_kind']}); warm searches on an "
        f"`Index.open(readonly=True)` reader, whose text encoder is `{data['text_encoder']}`.", "",
        table(("measurement", "result"), rows), "",
        "² `Index.search` takes no query vector, so this times the calls it makes after encoding "
        "(FAISS freshness check, knobs, search) without building `Hit`s."])


# -- audio ------------------------------------------------------------------------------------

def synthetic_sound(rng: np.random.Generator, pitch: float, pattern: str, seconds: float) -> np.ndarray:
    """A tone of one of twelve classes (4 pitches x 3 patterns), with jitter and a little noise."""
    t = np.arange(int(seconds * SOUND_RATE)) / SOUND_RATE
    frequency = pitch * rng.uniform(0.97, 1.03)
    sweep = t + t**2 / (2 * seconds) if pattern == "rising" else t  # rising: up an octave
    wave = np.sin(2 * np.pi * frequency * sweep + rng.uniform(0, 2 * np.pi))
    if pattern == "pulsing":
        wave *= (t * rng.uniform(4, 6)) % 1 < 0.5
    wave = rng.uniform(0.3, 0.8) * wave + rng.normal(0, 0.01, len(t))
    return wave.astype(np.float32)


def write_sound_pairs(folder: Path, count: int, seconds: float, seed: int) -> None:
    """`count` sounds, each with a `.txt` caption naming its class: training pairs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for number in range(count):
        pitch, pattern = PITCHES[number % len(PITCHES)], PATTERNS[number // len(PITCHES) % len(PATTERNS)]
        soundfile.write(folder / f"{number:05d}.wav", synthetic_sound(rng, pitch, pattern, seconds),
                        SOUND_RATE)
        (folder / f"{number:05d}.txt").write_text(f"a {pattern} tone at {pitch:.0f} hertz\n")


def write_sound_library(folder: Path, count: int, seconds: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for number in range(count):
        wave = synthetic_sound(rng, PITCHES[number % 4], PATTERNS[number % 3], seconds)
        soundfile.write(folder / f"{number:05d}.flac", wave, SOUND_RATE)


def section_audio(spec: ModelSpec, args: argparse.Namespace, workdir: Path) -> tuple[dict, str]:
    """Train the audio tower on synthetic captioned sounds, then index sound files with it."""
    pairs, short, long = workdir / "sound-pairs", workdir / "sounds-short", workdir / "sounds-long"
    write_sound_pairs(pairs, args.audio_pairs, 2.0, args.seed)
    write_sound_library(short, args.audio_clips, 5.0, args.seed + 1)
    write_sound_library(long, 1, args.audio_long_seconds, args.seed + 2)
    options = AudioTrainingOptions(epochs=args.audio_epochs, seed=args.seed)
    with open_index(workdir / "index-audio", spec, args) as index:
        index.encoder  # noqa: B018 - load the CLIP model outside the training time
        log(f"audio: training the tower on {args.audio_pairs} pairs for {args.audio_epochs} epochs")
        report, train_s = timed(lambda: index.train_audio(pairs, options))
        log(f"audio: indexing {args.audio_clips} clips of 5 s")
        clips, clips_s = timed(lambda: index.add(short))
        log(f"audio: indexing one {args.audio_long_seconds:.0f} s recording")
        recording, long_s = timed(lambda: index.add(long))
        query = sorted(short.glob("*.flac"))[0]
        _, millis = time_each(lambda _: index.search(audio=query, target="audio", k=K),
                              list(range(args.api_runs)))
        latency = percentiles(millis)
    last = report.epochs[-1]
    data = {"pairs": report.pairs, "held_out": report.held_out, "epochs": len(report.epochs),
            "train_s": train_s, "train_loop_s": report.seconds,
            "recall_at_1": last.recall_at_1, "recall_at_5": last.held_out["R@5"],
            "clips": args.audio_clips, "clips_s": clips_s, "clips_per_s": args.audio_clips / clips_s,
            "long_seconds": args.audio_long_seconds, "long_windows": recording.audio_encoded,
            "long_s": long_s, "audio_seconds_per_s": args.audio_long_seconds / long_s,
            "query_ms": latency}
    rows = [
        (f"`train_audio`: {report.pairs} pairs of 2 s ({report.held_out} held out), "
         f"{len(report.epochs)} epochs", f"{train_s:.1f} s ({report.seconds / len(report.epochs):.2f} s "
         f"per epoch); held-out recall@1 {last.recall_at_1:.3f}, @5 {last.held_out['R@5']:.3f}"),
        (f"`add`: {args.audio_clips} flac clips of 5 s (decode, encode, commit)",
         f"{clips_s:.2f} s: {data['clips_per_s']:.1f} clips/s"),
        (f"`add`: one {args.audio_long_seconds:.0f} s flac recording ({recording.audio_encoded} windows)",
         f"{long_s:.2f} s: {data['audio_seconds_per_s']:.0f} s of audio per second"),
        ("warm `index.search(audio=clip, target='audio')`, decoding and encoding the clip",
         f"p50 {latency['p50_ms']:.1f} ms, p95 {latency['p95_ms']:.1f} ms"),
    ]
    return data, "\n".join([
        f"Synthetic sounds in 12 classes (4 pitches x 3 patterns) at 16 kHz; tower of width "
        f"{options.width}, {options.n_mels} mels; captions encoded by the benchmark's CLIP model.", "",
        table(("measurement", "result"), rows)])


# -- video ------------------------------------------------------------------------------------

def write_synthetic_video(path: Path, seconds: float, seed: int) -> None:
    """A 640x360 30 fps H.264 clip of drifting coloured boxes, with an AAC tone that changes pitch."""
    rng = np.random.default_rng(seed)
    fps, rate = 30, 44100
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 640, 360, "yuv420p"
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        boxes = rng.integers(0, 255, (8, 3))
        for index in range(int(seconds * fps)):
            picture = np.full((360, 640, 3), 40, np.uint8)
            for number, colour in enumerate(boxes):
                left = int(index * (number + 1)) % 560
                picture[40 * number:40 * number + 36, left:left + 80] = colour
            container.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(video.encode(None))
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.3 * np.sin(2 * np.pi * (220 + 220 * (t // 10 % 3)) * t)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


def section_video(spec: ModelSpec, args: argparse.Namespace, workdir: Path) -> tuple[dict, str]:
    """Index one synthetic clip: decoding, 1 frame/s through the image tower, segments committed."""
    folder = workdir / "videos"
    folder.mkdir()
    write_synthetic_video(folder / "clip.mp4", args.video_seconds, args.seed)
    with open_index(workdir / "index-video", spec, args) as index:
        index.encoder  # noqa: B018 - load the model outside the timing
        log(f"video: indexing a {args.video_seconds:.0f} s clip")
        report, seconds = timed(lambda: index.add(folder))
    data = {"video_seconds": args.video_seconds, "segments": report.video_encoded, "index_s": seconds,
            "video_seconds_per_s": args.video_seconds / seconds}
    rows = [(f"`add`: one {args.video_seconds:.0f} s 640x360 30 fps H.264 + AAC clip "
             f"({report.video_encoded} segments of 4 s, 1 frame/s)",
             f"{seconds:.1f} s: **{data['video_seconds_per_s']:.1f} s of video per second**")]
    return data, "\n".join([
        "Frames go through the benchmark's CLIP image tower; this index has no audio tower, so "
        "segments are their pooled frames.", "", table(("measurement", "result"), rows)])


# -- serve ------------------------------------------------------------------------------------

def start_server(index_dir: Path, port: int, device: str) -> subprocess.Popen:
    """`retrieve serve` in its own process, as users run it; returns once it answers."""
    process = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index", str(index_dir),
                                "--port", str(port), "--device", device],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"retrieve serve did not start: {process.stderr.read().decode()[-2000:]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed_requests(client: httpx.Client, url: str, queries: Sequence[str]) -> list[float]:
    millis = []
    for query in queries:
        start = time.perf_counter()
        client.get(url, params={"q": query, "k": K}).raise_for_status()
        millis.append((time.perf_counter() - start) * 1000)
    return millis


def section_serve(corpus: Corpus, spec: ModelSpec, args: argparse.Namespace,
                  workdir: Path) -> tuple[dict, str]:
    """Build an index of the corpus, serve it, and query it over HTTP: alone, then 8 at once."""
    path = workdir / "index-serve"
    log(f"serve: building an index of {corpus.origin}")
    with open_index(path, spec, args) as index:
        index.add(corpus.folder)
    port = free_port()
    server = start_server(path, port, args.device)
    url = f"http://127.0.0.1:{port}/api/search"
    queries = (corpus.texts or [QUERY])[:args.serve_requests]
    try:
        with httpx.Client(timeout=60) as client:
            timed_requests(client, url, queries[:10])  # warm-up
            log(f"serve: {len(queries)} sequential text queries")
            alone = timed_requests(client, url, queries)
        log(f"serve: {args.serve_clients} clients, {len(queries)} queries each")
        with ThreadPoolExecutor(args.serve_clients) as pool:
            started = time.perf_counter()
            clients = [httpx.Client(timeout=60) for _ in range(args.serve_clients)]
            loaded = [m for part in pool.map(lambda c: timed_requests(c, url, queries), clients)
                      for m in part]
            wall = time.perf_counter() - started
            for client in clients:
                client.close()
    finally:
        server.terminate()
        server.wait()
    data = {"items": len(corpus.images) + len(corpus.texts), "alone": percentiles(alone),
            "clients": args.serve_clients, "loaded": percentiles(loaded),
            "requests": len(loaded), "wall_s": wall, "requests_per_s": len(loaded) / wall}
    rows = [
        (f"one client, {len(alone)} sequential `GET /api/search?q=...&k={K}`",
         f"p50 {data['alone']['p50_ms']:.1f} ms, p95 {data['alone']['p95_ms']:.1f} ms"),
        (f"{args.serve_clients} concurrent clients, {len(loaded)} requests",
         f"{data['requests_per_s']:.0f} requests/s; p50 {data['loaded']['p50_ms']:.1f} ms, "
         f"p95 {data['loaded']['p95_ms']:.1f} ms"),
    ]
    return data, "\n".join([
        f"`retrieve serve` in its own process over {corpus.origin} ({data['items']} items); queries "
        "are the corpus's captions, sent over loopback HTTP with keep-alive.", "",
        table(("measurement", "result"), rows)])


# -- the run ----------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    return {"timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
            "faiss_omp_threads": faiss.omp_get_max_threads(), "open_clip": open_clip.__version__,
            "load_average_start": os.getloadavg(), "library_commit": library_commit()}


def library_commit() -> str:
    """The checkout's commit, marked `+changes` when retrieval/ differs from it."""
    def git(*command: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *command], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" +changes" if git("status", "--porcelain", "--", "retrieval") else "")


def load_average(values: Sequence[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values) + " (1 / 5 / 15 min)"


def render_header(meta: dict[str, Any]) -> str:
    return "\n".join([
        "# retrieval benchmark", "",
        f"- command: `{meta['command']}`",
        f"- time: {meta['timestamp']}",
        f"- machine: {meta['cpu_count']} CPUs, {meta['platform']}, Python {meta['python']}; "
        f"load average at start {load_average(meta['load_average_start'])}",
        f"- torch {meta['torch']} ({meta['torch_threads']} threads), faiss {meta['faiss']} "
        f"({meta['faiss_omp_threads']} OpenMP threads), open_clip {meta['open_clip']}",
        f"- retrieval at commit {meta['library_commit']}"])


# -- e. int8 -----------------------------------------------------------------------------------


def section_int8(corpus: Corpus, encoder: ClipEncoder, spec: ModelSpec,
                 args: argparse.Namespace) -> tuple[dict, str]:
    """int8 against fp32: the encode-only speed-up, and how often the same images come back.

    Agreement is the mean top-10 overlap over caption queries (fp32 text vectors) searched
    among the first `--int8-images` images encoded both ways; image queries likewise.
    """
    log("int8: encode-only and agreement")
    quantised = load_encoder(spec, args.device, args.batch_size, int8=True)
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
            "text_to_image_top10_overlap": top10_overlap(text_queries, full, int8),
            "image_to_image_top10_overlap": top10_overlap(full, full, int8),
            "min_cosine_fp32_int8": float((full * int8).sum(axis=1).min())}
    rows = [["encode-only, fp32", f"{full_speed:.1f} img/s"],
            ["encode-only, int8", f"{int8_speed:.1f} img/s ({data['speedup']:.2f}x)"],
            ["text→image top-10 overlap with fp32", f"{data['text_to_image_top10_overlap']:.3f}"],
            ["image→image top-10 overlap with fp32", f"{data['image_to_image_top10_overlap']:.3f}"],
            ["lowest cosine, same image fp32 vs int8", f"{data['min_cosine_fp32_int8']:.4f}"]]
    return data, table(["int8 dynamic quantisation", f"{len(images)} images"], rows)


def top10_overlap(queries: np.ndarray, reference: np.ndarray, other: np.ndarray) -> float:
    """Mean share of each query's top-10 under `reference` that `other` also returns."""
    def top(vectors: np.ndarray) -> np.ndarray:
        return np.argsort(-(queries @ vectors.T), axis=1)[:, :10]

    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top(reference), top(other))]))


def render_model(meta: dict[str, Any]) -> str:
    load = meta["model_load_s"]
    return (f"- model: {meta['model']} (`{meta['model_spec']}`), device {meta['device']}"
            + (f", `load_encoder` {load:.2f} s" if load is not None else ""))


# -- i. scale ----------------------------------------------------------------------------------

SCALE_BLOCK = 4096  # synthetic vectors are made in blocks, each from a seed of its own
SCALE_POINTS_PER_CENTRE = 100
SCALE_LISTS = 4096  # ~2,400 vectors a list at 10M: training and filling fit this machine's 2 cores


@dataclass(frozen=True)
class SyntheticVectors:
    """`count` clustered unit vectors (ids = row numbers) made on demand, block by block, so any
    process reading a range of ids gets the same vectors and none are held in memory."""

    count: int
    seed: int
    dim: int = ANN_DIM

    def ids(self) -> np.ndarray:
        return np.arange(self.count, dtype=np.int64)

    def read(self, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
        high = min(high, self.count)
        first, last = low // SCALE_BLOCK, (high - 1) // SCALE_BLOCK
        rows = np.concatenate([self.block(b) for b in range(first, last + 1)])
        offset = first * SCALE_BLOCK
        return np.arange(low, high, dtype=np.int64), rows[low - offset:high - offset]

    def block(self, number: int) -> np.ndarray:
        size = min(SCALE_BLOCK, self.count - number * SCALE_BLOCK)
        return clustered_points(np.random.default_rng([self.seed, number]), self.centres(), size)

    def queries(self, count: int) -> np.ndarray:
        """Held-out queries around the same centres."""
        return clustered_points(np.random.default_rng([self.seed, self.count, 1]), self.centres(), count)

    def centres(self) -> np.ndarray:
        return scale_centres(self.count, self.seed, self.dim)


@functools.lru_cache(maxsize=1)
def scale_centres(count: int, seed: int, dim: int) -> np.ndarray:
    """About SCALE_POINTS_PER_CENTRE points a centre, the centres around ANN_TOPICS topics."""
    rng = np.random.default_rng([seed, count])
    topics = unit_rows(rng.standard_normal((ANN_TOPICS, dim), dtype=np.float32))
    return clustered_points(rng, topics, max(1, count // SCALE_POINTS_PER_CENTRE))


def exact_top_k(matrix: np.ndarray, queries: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """The true top-K ids of each query, streaming the vector matrix from disk once."""
    best_scores = np.full((len(queries), K), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), K), np.int64)
    for start in range(0, len(matrix), chunk):
        scores = queries @ np.asarray(matrix[start:start + chunk]).T
        both = np.concatenate([best_scores, scores], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(np.arange(start, start + scores.shape[1]),
                                                        scores.shape)], axis=1)
        top = np.argpartition(-both, K, axis=1)[:, :K]
        best_scores, best_ids = np.take_along_axis(both, top, 1), np.take_along_axis(ids, top, 1)
    return best_ids


# Loads an on-disk index in a fresh process, as a server would, and searches it: the process's
# memory is then what serving needs, apart from the page cache.
SERVE_PROBE = """
import json, sys, time
from pathlib import Path
import numpy as np
from retrieval.ondisk import OnDiskIndex
from retrieval.vectors import SearchKnobs

def memory():
    fields = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return {key: int(fields[key].split()[0]) * 1024 for key in ('VmRSS', 'RssAnon', 'RssFile')}

folder, queries, found_path, nprobe = sys.argv[1], np.load(sys.argv[2]), sys.argv[3], int(sys.argv[4])
before = memory()
start = time.perf_counter()
index = OnDiskIndex.load(Path(folder))
load_s = time.perf_counter() - start
loaded = memory()
knobs = SearchKnobs(nprobe=nprobe)
millis, found = [], []
for query in queries:
    start = time.perf_counter()
    found.append(index.search(query, 10, knobs=knobs)[1])
    millis.append((time.perf_counter() - start) * 1000)
after = memory()
np.save(found_path, np.stack(found))

# A second pass, step by step (one thread, as a search runs): where a query's time goes.
import faiss
faiss.omp_set_num_threads(1)
ivf = faiss.extract_index_ivf(index.index)
params = faiss.SearchParametersIVF(nprobe=nprobe)
steps = {"coarse": [], "scan": [], "rerank": []}
for query in queries:
    row = query[None, :].astype(np.float32)
    start = time.perf_counter()
    ivf.quantizer.search(row, nprobe)
    steps["coarse"].append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    _, ids = index.index.search(row, 10 * knobs.rerank_for(index.kind), params=params)
    steps["scan"].append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    index.exact_vectors(ids[0][ids[0] >= 0]) @ query
    steps["rerank"].append((time.perf_counter() - start) * 1000)
print(json.dumps({"load_s": load_s, "before": before, "loaded": loaded, "after": after,
                  "millis": millis, "steps_p50_ms": {k: float(np.median(v)) for k, v in steps.items()}}))
"""


def probe_serving(folder: Path, queries: np.ndarray, nprobe: int, workdir: Path
                  ) -> tuple[dict, np.ndarray]:
    np.save(workdir / "queries.npy", queries)
    result = subprocess.run([sys.executable, "-c", SERVE_PROBE, str(folder), str(workdir / "queries.npy"),
                             str(workdir / "found.npy"), str(nprobe)],
                            capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(result.stdout.splitlines()[-1]), np.load(workdir / "found.npy")


def folder_bytes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_blocks * 512 for path in folder.iterdir()}


def measure_sqlite_metadata(count: int, folder: Path, lookups: list[np.ndarray]) -> dict:
    """The product's store with `count` image items; hits hydrated as Index._hydrate does."""
    store = Store(folder / "meta.sqlite")
    step = 200_000

    def fill() -> None:
        for start in range(1, count + 1, step):
            ids = range(start, min(start + step, count + 1))
            with store.conn:
                store.conn.executemany(
                    "INSERT INTO files (id, path, root, kind, size, mtime_ns, sha256) "
                    "VALUES (?, ?, '/data', 'image', 100000, 0, ?)",
                    ((i, f"/data/{i // 1000:05d}/{i:08d}.jpg", f"{i * 2654435761 % 2**61:016x}")
                     for i in ids))
                store.conn.executemany(
                    "INSERT INTO items (id, modality, file_id, uri, content_hash) "
                    "VALUES (?, 'image', ?, ?, ?)",
                    ((i, i, f"/data/{i // 1000:05d}/{i:08d}.jpg", f"{i * 2654435761 % 2**61:016x}")
                     for i in ids))

    _, fill_s = timed(fill)

    def hydrate(ids: np.ndarray) -> int:
        rows = store.items(ids.tolist())
        store.captions_of(ids.tolist())
        return len(rows)

    counts, millis = time_each(hydrate, lookups, warmup=20)
    store.close()
    assert all(c == K for c in counts)
    return {"rows": count, "fill_s": fill_s, "bytes": (folder / "meta.sqlite").stat().st_size,
            **percentiles(millis)}


def measure_arrow_metadata(count: int, folder: Path, lookups: list[np.ndarray]) -> dict:
    """The same columns in an uncompressed Arrow IPC file, memory-mapped; a row is found by
    position (id - 1) in its record batch, read without copying."""
    import pyarrow as pa

    path = folder / "meta.arrow"
    schema = pa.schema([("id", pa.int64()), ("path", pa.string()), ("sha256", pa.string())])
    rows_per_batch = 1_000_000

    def fill() -> None:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start in range(1, count + 1, rows_per_batch):
                ids = np.arange(start, min(start + rows_per_batch, count + 1))
                writer.write_batch(pa.record_batch([
                    pa.array(ids), pa.array([f"/data/{i // 1000:05d}/{i:08d}.jpg" for i in ids]),
                    pa.array([f"{i * 2654435761 % 2**61:016x}" for i in ids])], schema=schema))

    _, fill_s = timed(fill)
    reader = pa.ipc.open_file(pa.memory_map(str(path)))

    def lookup(ids: np.ndarray) -> list[dict]:
        return [reader.get_batch(int(i - 1) // rows_per_batch).slice(int(i - 1) % rows_per_batch, 1)
                .to_pylist()[0] for i in ids]

    rows, millis = time_each(lookup, lookups, warmup=20)
    assert all(len(r) == K for r in rows)
    return {"rows": count, "fill_s": fill_s, "bytes": path.stat().st_size, **percentiles(millis)}


def section_scale(args: argparse.Namespace, workdir: Path) -> tuple[dict, str]:
    source = SyntheticVectors(args.scale_vectors, args.seed)
    folder = args.scale_dir or workdir / "scale"
    started = time.perf_counter()
    index = build_on_disk(source, folder / "image", "ivf-pq-disk", workers=os.cpu_count() or 1,
                          lists=SCALE_LISTS, log=lambda line: log(f"scale: {line}"))
    build_s = time.perf_counter() - started
    peak_rss = max(resource.getrusage(who).ru_maxrss for who in
                   (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) * 1024
    sizes = folder_bytes(index.folder)
    log(f"scale: exact top-{K} of {args.queries} queries, streaming the vectors from disk")
    queries = source.queries(args.queries)
    truth, truth_s = timed(lambda: exact_top_k(index.matrix, queries))
    serving = {}
    for nprobe in (16, 32, 64):
        log(f"scale: serving probe, nprobe={nprobe}")
        probe, found = probe_serving(folder / "image", queries, nprobe, workdir)
        serving[nprobe] = {**probe, **percentiles(probe["millis"]),
                           "recall_at_10": recall_at_k(list(found), list(truth))}
    rng = np.random.default_rng(args.seed)
    lookups = [rng.choice(args.scale_rows, K, replace=False) + 1 for _ in range(1000)]
    log(f"scale: metadata of {args.scale_rows:,} rows in SQLite")
    sqlite = measure_sqlite_metadata(args.scale_rows, folder, lookups)
    log(f"scale: metadata of {args.scale_rows:,} rows in Arrow")
    arrow = measure_arrow_metadata(args.scale_rows, folder, lookups)
    data = {"vectors": source.count, "dim": source.dim, "lists": SCALE_LISTS, "build_s": build_s,
            "build_peak_rss": peak_rss, "disk_bytes": sizes, "truth_s": truth_s,
            "queries": args.queries, "serving": serving, "sqlite": sqlite, "arrow": arrow}
    return data, render_scale(data)


def render_scale(data: dict) -> str:
    n, sizes = data["vectors"], data["disk_bytes"]
    index_bytes = sum(v for k, v in sizes.items() if k != "vectors.npy")
    serving = [(nprobe, f"{s['p50_ms']:.2f}", f"{s['p95_ms']:.2f}", f"{s['recall_at_10']:.3f}",
                f"{s['loaded']['RssAnon'] / 2**20:.0f}", f"{s['after']['RssAnon'] / 2**20:.0f}",
                f"{s['after']['RssFile'] / 2**20:.0f}",
                " / ".join(f"{s['steps_p50_ms'][step]:.2f}" for step in ("coarse", "scan", "rerank")))
               for nprobe, s in data["serving"].items()]
    meta = [(name, f"{m['rows']:,}", f"{m['fill_s']:.0f}", f"{m['bytes'] / m['rows']:.0f}",
             f"{m['p50_ms']:.3f}", f"{m['p95_ms']:.3f}")
            for name, m in (("SQLite (the product's store, `Store.items` + `captions_of`)", data["sqlite"]),
                            ("Arrow IPC file, memory-mapped (a row slice per hit)", data["arrow"]))]
    return "\n".join([
        f"{n:,} synthetic {data['dim']}-d unit vectors (~{SCALE_POINTS_PER_CENTRE} a centre, centres "
        f"around {ANN_TOPICS} topics), `build_on_disk(..., 'ivf-pq-disk', lists={data['lists']})` "
        f"with {os.cpu_count()} worker processes.", "",
        f"- build: {data['build_s']:.0f} s ({n / data['build_s']:,.0f} vectors/s), peak RSS of one "
        f"process {data['build_peak_rss'] / 2**30:.2f} GiB",
        f"- disk: {index_bytes / n:.1f} bytes/vector for the index (lists {sizes['lists.ivfdata'] / n:.1f}, "
        f"ids {sizes['ids.npy'] / n:.1f}, quantizer and header {sizes['index.faiss'] / n:.2f}) + "
        f"{sizes['vectors.npy'] / n:.0f} bytes/vector of exact vectors for re-ranking",
        f"- exact search for the truth: {data['truth_s']:.0f} s for {data['queries']} queries", "",
        f"Serving, in a fresh process (`OnDiskIndex.load` then {data['queries']} searches, k=10, "
        "re-ranking 500 candidates from the mapped vectors):", "",
        table(("nprobe", "p50 ms", "p95 ms", "recall@10", "private MiB loaded", "private MiB after",
               "mapped file MiB after", "second pass p50 ms: coarse / scan / re-rank"), serving), "",
        "Metadata for 10 hits, 1,000 random lookups:", "",
        table(("store", "rows", "fill s", "bytes/row", "p50 ms", "p95 ms"), meta),
    ])


# -- j. ray -----------------------------------------------------------------------------------


def section_ray(corpus: Corpus, spec: ModelSpec, args: argparse.Namespace, workdir: Path
                ) -> tuple[dict, str]:
    """A whole build (images and captions) as Ray Data jobs on a local Ray, beside the same
    build run locally: what the distributed path costs where there is nothing to distribute to."""
    from retrieval.distributed import connect

    _, ray_start_s = timed(lambda: connect(None))
    builds, vectors = {}, {}
    for engine in ("local", "ray"):
        with open_index(workdir / f"index-{engine}", spec, args) as index:
            _ = index.encoder  # loaded before the clock starts, as for the other build figures
            report, wall = timed(lambda: index.add(corpus.folder, engine=engine))  # noqa: B023
            rows = index.store.conn.execute(
                "SELECT items.uri, vectors.vector FROM items JOIN vectors ON item_id = items.id").fetchall()
        vectors[engine] = {uri: np.frombuffer(blob, np.float32) for uri, blob in rows}
        builds[engine] = {"wall_s": wall, "images": report.images_encoded, "texts": report.texts_encoded}
    difference = max(float(np.abs(vectors["ray"][uri] - vector).max())
                     for uri, vector in vectors["local"].items())
    data = {"ray_start_s": ray_start_s, "builds": builds, "max_vector_difference": difference,
            "same_items": vectors["ray"].keys() == vectors["local"].keys()}
    rows = [(engine, f"{b['images']:,}", f"{b['texts']:,}", f"{b['wall_s']:.1f}",
             f"{b['images'] / b['wall_s']:.1f}") for engine, b in builds.items()]
    return data, "\n".join([
        f"`index.add(folder, engine=...)` over {corpus.origin}, model loaded beforehand; Ray "
        f"started on this machine in {ray_start_s:.1f} s beforehand (one embedding actor with "
        "this machine's cores, no GPU).", "",
        table(("engine", "images", "texts", "wall s", "images/s over the whole wall"), rows), "",
        f"Same items: {'yes' if data['same_items'] else '**no**'}; largest difference between a "
        f"vector of the two builds: {difference:.1e}."])


# -- k. no-op re-index against rclip --------------------------------------------------------


def section_noop(corpus: Corpus, spec: ModelSpec, args: argparse.Namespace, workdir: Path
                 ) -> tuple[dict, str]:
    """`python -m retrieval.cli index --index I` with nothing to do, as a whole process, beside
    rclip's re-run over the same unchanged folder (which checks the folder the same way, by
    size and mtime, and then answers a text query: rclip cannot be run without one)."""
    index = workdir / "index-noop"
    log(f"noop: building an index of {corpus.origin}")
    with open_index(index, spec, args) as writer:
        writer.add(corpus.folder)
    command = [sys.executable, "-m", "retrieval.cli", "index", "--index", str(index), "--quiet", "--json"]
    log(f"noop: {args.noop_runs} unchanged re-index processes")
    ours = [run_measured(command) for _ in range(args.noop_runs)]
    files = json.loads(ours[0][1])["unchanged"]
    data = {"files": files, "retrieval": _run_figures(ours), "rclip": measure_rclip(corpus, args, workdir)}
    rows = [("retrieval: `python -m retrieval.cli index --index I` (bare: the folders indexed before)",
             *_run_cells(data["retrieval"]))]
    rclip = data["rclip"]
    if "runs" in rclip:
        rows.append((f"rclip {rclip['version']}: `rclip -f \"{QUERY}\"` in the folder (first run, "
                     f"which indexed it: {rclip['first_run_s']:.1f} s)", *_run_cells(rclip)))
        ratio = f"rclip's median over ours: **{rclip['median_s'] / data['retrieval']['median_s']:.1f}x**."
    else:
        ratio = f"rclip was not measured: {rclip['not_measured']}."
    return data, "\n".join([
        f"{files:,} files unchanged ({corpus.origin}); each figure is a whole new process, "
        "interpreter start and imports included.", "",
        table(("no-op re-run", "median s", "min s", "peak RSS"), rows), "", ratio])


def _run_figures(runs: list[tuple[float, str, int]]) -> dict:
    walls = [wall for wall, _, _ in runs]
    return {"runs": walls, "median_s": statistics.median(walls), "min_s": min(walls),
            "peak_rss_bytes": max(rss for _, _, rss in runs)}


def _run_cells(figures: dict) -> tuple[str, str, str]:
    return (f"{figures['median_s']:.2f}", f"{figures['min_s']:.2f}",
            f"{figures['peak_rss_bytes'] / 2**20:.0f} MiB")


def measure_rclip(corpus: Corpus, args: argparse.Namespace, workdir: Path) -> dict:
    """rclip's first run over the corpus folder (it indexes it), then its no-op re-runs; or why
    it could not be run.

    rclip downloads its ONNX models from the Hugging Face Hub on its first run: offline it
    cannot run unless they lie in its data folder already (--rclip-datadir). Where they do not,
    they are exported there from the ViT-B-32-256 graph with random weights (speed does not
    depend on them), which needs the `onnx` package here or in rclip's own environment.
    """
    rclip = args.rclip or shutil.which("rclip")
    if rclip is None:
        return {"not_measured": "no rclip executable (pass --rclip, e.g. a separate venv's bin/rclip)"}
    datadir = (args.rclip_datadir or workdir / "rclip-data").absolute()
    missing = prepare_rclip_models(Path(rclip), datadir)
    if missing:
        return {"not_measured": missing}
    version = subprocess.run([rclip, "--version"], capture_output=True, text=True).stdout.split()
    env = {**os.environ, "RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"}
    command = [rclip, "-f", QUERY]
    log("noop: rclip's first run (it indexes the folder)")
    first_s, _, _ = run_measured(command, cwd=corpus.folder, env=env)
    log(f"noop: {args.noop_runs} rclip re-runs")
    runs = [run_measured(command, cwd=corpus.folder, env=env) for _ in range(args.noop_runs)]
    return {"version": version[-1] if version else "?", "first_run_s": first_s, **_run_figures(runs)}


def prepare_rclip_models(rclip: Path, datadir: Path) -> str | None:
    """Put rclip's models (ONNX graphs and tokenizer vocabulary) into `datadir`, where rclip
    looks for them; None when they are there, else why they cannot be."""
    models = datadir / RCLIP_MODEL_DIR
    vocab = datadir / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    if (models / "visual.onnx").is_file() and (models / "textual.onnx").is_file() and vocab.is_file():
        return None
    try:
        import onnx  # noqa: F401  # what torch.onnx.export writes with
    except ImportError:
        found = subprocess.run([str(rclip.parent / "python"), "-c", "import onnx, os; "
                                "print(os.path.dirname(os.path.dirname(onnx.__file__)))"],
                               capture_output=True, text=True)
        if found.returncode:
            return (f"its models are not in {datadir} (rclip downloads them from the Hugging Face Hub "
                    "on its first run; offline it cannot run), and exporting them needs the onnx "
                    "package, found neither here nor beside rclip")
        sys.path.append(found.stdout.strip())  # appended: this environment's packages come first
    log(f"noop: exporting rclip's {RCLIP_GRAPH} graph (random weights) as ONNX into {datadir}")
    model = open_clip.create_model(RCLIP_GRAPH).eval()
    models.mkdir(parents=True, exist_ok=True)
    towers = {"visual.onnx": ("encode_image", torch.zeros(1, 3, 256, 256)),
              "textual.onnx": ("encode_text", torch.zeros(1, 77, dtype=torch.long))}
    for name, (encode, example) in towers.items():
        # With gradients on, attention is traced op by op: its fused kernel has no ONNX form.
        torch.onnx.export(_Tower(model, encode), (example,), str(models / name),
                          input_names=["input"], output_names=["output"], dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    vocab.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(open_clip.__file__).parent / vocab.name, vocab)
    return None


class _Tower(torch.nn.Module):
    """One of a CLIP model's encoders (`encode_image`, `encode_text`) as a module of its own,
    for the ONNX export."""

    def __init__(self, model: torch.nn.Module, encode: str) -> None:
        super().__init__()
        self.model, self.encode = model, encode

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.encode)(inputs)


# -- l. Ray's break-even ------------------------------------------------------------------------


def section_breakeven(corpus: Corpus, spec: ModelSpec, args: argparse.Namespace, workdir: Path
                      ) -> tuple[dict, str]:
    """Whole `python -m retrieval.cli index` processes over the first N images of the corpus
    (with their captions), on the local engine and on a Ray started by the process: from what
    corpus size Ray's start-up and overhead are paid back on this machine, if at all."""
    sizes = [size for size in args.ray_sizes if size <= len(corpus.images)] or [len(corpus.images)]
    runs = []
    for size in sizes:
        view = limited_view(corpus.folder, size, workdir / f"breakeven-{size}")
        for engine in ("local", "ray"):
            log(f"breakeven: {size} images on {engine}")
            wall, output, rss = run_measured(
                [sys.executable, "-m", "retrieval.cli", "index", str(view),
                 "--index", str(workdir / f"index-breakeven-{engine}-{size}"), *model_args(spec),
                 "--engine", engine, "--device", args.device, "--batch-size", str(args.batch_size),
                 "--quiet", "--json"])
            report = json.loads(output)
            runs.append({"images": size, "engine": engine, "wall_s": wall, "peak_rss_bytes": rss,
                         "images_encoded": report["images_encoded"],
                         "texts_encoded": report["texts_encoded"]})
    walls = {(run["images"], run["engine"]): run["wall_s"] for run in runs}
    even = next((size for size in sizes if walls[size, "ray"] <= walls[size, "local"]), None)
    data = {"runs": runs, "break_even_images": even}
    rows = [(f"{size:,}", f"{walls[size, 'local']:.1f}", f"{walls[size, 'ray']:.1f}",
             f"{walls[size, 'ray'] / walls[size, 'local']:.2f}") for size in sizes]
    verdict = (f"Ray is as fast as the local engine from **{even:,} images** on."
               if even else f"Ray is slower at every size measured (up to {sizes[-1]:,} images).")
    return data, "\n".join([
        f"`python -m retrieval.cli index FIRST_N_IMAGES --engine local|ray` over {corpus.origin}, "
        "each a whole new process (Ray started by it, one embedding actor per two cores, no GPU).", "",
        table(("images", "local s", "ray s", "ray / local"), rows), "", verdict])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", help="open_clip model: name, local-dir:PATH or hf-hub:ORG/REPO "
                        "[default: ViT-B-32 with random weights]")
    parser.add_argument("--pretrained", help="pretrained tag or checkpoint, with a plain --model name")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps, auto [default: cpu]")
    parser.add_argument("--batch-size", type=int, default=32, help="encoder batch [default: 32]")
    parser.add_argument("--int8", action="store_true", help="encode with 8-bit weights (CPU), "
                        "as `retrieve index --int8`")
    parser.add_argument("--images", type=Path, help=f"image folder [default: {DEFAULT_DATA} if "
                        "present, else synthetic JPEGs]")
    parser.add_argument("--limit", type=int, help="use only the first N images (symlinked into a "
                        "temp folder, with their captions from the folder's top-level captions file)")
    parser.add_argument("--synthetic", type=int, default=200,
                        help="synthetic images to generate when there is no folder [default: 200]")
    parser.add_argument("--encode-batches", type=int, default=8,
                        help="timed batches for the encode-only ceiling [default: 8]")
    parser.add_argument("--texts", type=int, default=1000, help="texts for batch throughput")
    parser.add_argument("--text-queries", type=int, default=50, help="single text queries timed")
    parser.add_argument("--sizes", default="10000,100000", help="ANN sizes, comma-separated")
    parser.add_argument("--million", action="store_true", help="also run the ANN section at N=1M")
    parser.add_argument("--queries", type=int, default=200, help="held-out ANN queries [default: 200]")
    parser.add_argument("--cli-images", type=int, default=50, help="images in the CLI test index")
    parser.add_argument("--cli-runs", type=int, default=5, help="cold CLI searches timed")
    parser.add_argument("--api-runs", type=int, default=50, help="warm API searches timed")
    parser.add_argument("--int8-images", type=int, default=300,
                        help="images encoded both ways for the int8 agreement [default: 300]")
    parser.add_argument("--rss-images", type=int, default=200,
                        help="images in the subprocess build that measures peak RSS; 0 skips it")
    parser.add_argument("--audio-pairs", type=int, default=192,
                        help="captioned sounds the audio tower trains on [default: 192]")
    parser.add_argument("--audio-epochs", type=int, default=20, help="audio tower epochs [default: 20]")
    parser.add_argument("--audio-clips", type=int, default=200, help="5 s clips indexed [default: 200]")
    parser.add_argument("--audio-long-seconds", type=float, default=600.0,
                        help="length of the long recording indexed [default: 600]")
    parser.add_argument("--video-seconds", type=float, default=120.0,
                        help="length of the synthetic clip indexed [default: 120]")
    parser.add_argument("--serve-requests", type=int, default=200,
                        help="text queries each HTTP client sends [default: 200]")
    parser.add_argument("--serve-clients", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument("--scale", action="store_true",
                        help="run only the scale section (about half an hour on 2 cores)")
    parser.add_argument("--scale-vectors", type=int, default=10_000_000,
                        help="vectors in the scale section's on-disk index [default: 10M]")
    parser.add_argument("--scale-rows", type=int, default=10_000_000,
                        help="metadata rows in the scale section's lookups [default: 10M]")
    parser.add_argument("--scale-dir", type=Path,
                        help="where the scale section builds (needs ~25 GB at 10M) [default: a temp folder]")
    parser.add_argument("--noop-runs", type=int, default=5,
                        help="no-op re-index processes timed, ours and rclip's [default: 5]")
    parser.add_argument("--rclip", help="the rclip executable to compare with (e.g. installed in a "
                        "venv of its own) [default: rclip on PATH, else not measured]")
    parser.add_argument("--rclip-datadir", type=Path, help="RCLIP_DATADIR holding rclip's models; "
                        "they are exported there (random weights) if missing [default: a temp folder]")
    parser.add_argument("--ray-sizes", default="50,100,200,500,1000",
                        help="corpus sizes (images) of the breakeven section, comma-separated")
    parser.add_argument("--only", default=",".join(s for s in SECTIONS if s not in OPT_IN_SECTIONS),
                        help=f"sections to run, comma-separated: {','.join(SECTIONS)}")
    parser.add_argument("--skip", default="", help="sections to leave out, comma-separated")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 100 images, N=10k only: about a minute")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.images and not args.images.is_dir():
        parser.error(f"--images {args.images}: no such folder")
    if args.quick:
        args.tiny, args.limit, args.sizes = True, args.limit or 100, "10000"
    if args.scale:
        args.only = "scale"
    args.sizes = [int(size) for size in args.sizes.split(",") if size] + [1_000_000] * args.million
    args.ray_sizes = sorted(int(size) for size in args.ray_sizes.split(",") if size)
    args.sections = [s for s in SECTIONS if s in args.only.split(",") and s not in args.skip.split(",")]
    unknown = set(filter(None, args.only.split(",") + args.skip.split(","))) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict:
    """Every section asked for, each printed as soon as it is done; returns all the numbers."""
    meta = machine_facts()
    print(render_header(meta), flush=True)
    needs_encoder = {"images", "text", "int8"} & set(args.sections)
    spec, encoder = None, None
    if set(args.sections) - {"ann", "scale"}:  # these two use synthetic vectors, no model
        spec, description = prepare_model(args, workdir)
        encoder, load_s = timed(lambda: load_encoder(spec, args.device, args.batch_size, args.int8)) \
            if needs_encoder else (None, None)
        meta.update(model=description + (", int8 weights" if args.int8 else ""),
                    model_spec=spec.identity, device=args.device, model_load_s=load_s)
        print(render_model(meta), flush=True)
    results: dict[str, Any] = {"meta": meta}
    corpus = prepare_corpus(args, workdir) \
        if needs_encoder or {"serve", "ray", "noop", "breakeven"} & set(args.sections) else None
    titles = {"images": "a. Image throughput", "text": "b. Text encoding",
              "ann": "c. ANN indexes", "cli": "d. Cold CLI and warm search latency",
              "int8": "e. int8 encoding against fp32", "audio": "f. Audio",
              "serve": "g. Search service", "video": "h. Video",
              "scale": "i. Scale: an on-disk index of synthetic vectors",
              "ray": "j. A build on Ray beside a local build",
              "noop": "k. An unchanged re-index, whole process, beside rclip",
              "breakeven": "l. Where Ray pays off: whole builds by corpus size"}
    for section in args.sections:
        if section == "images":
            data, text = section_images(corpus, encoder, spec, args, workdir)
        elif section == "text":
            data, text = section_text(corpus.texts, encoder, args, workdir)
        elif section == "ann":
            data, text = section_ann(args)
        elif section == "int8":
            data, text = section_int8(corpus, encoder, spec, args)
        elif section == "audio":
            data, text = section_audio(spec, args, workdir)
        elif section == "serve":
            data, text = section_serve(corpus, spec, args, workdir)
        elif section == "video":
            data, text = section_video(spec, args, workdir)
        elif section == "scale":
            data, text = section_scale(args, workdir)
        elif section == "ray":
            data, text = section_ray(corpus, spec, args, workdir)
        elif section == "noop":
            data, text = section_noop(corpus, spec, args, workdir)
        elif section == "breakeven":
            data, text = section_breakeven(corpus, spec, args, workdir)
        else:
            data, text = section_cli(spec, args, workdir)
        results[section] = data
        print(f"\n## {titles[section]}\n\n{text}", flush=True)
    return results


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="retrieval-benchmark-") as tmp:
        results = run(args, Path(tmp))
    meta = results["meta"]
    meta["total_s"], meta["load_average_end"] = time.perf_counter() - started, os.getloadavg()
    print(f"\nTotal benchmark time: {meta['total_s']:.0f} s; load average at the end "
          f"{load_average(meta['load_average_end'])}.", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
