"""r. Memory and cold queries: a whole build's peak memory (towers exported, then cached, then an
unchanged re-index), whole `retrieve` query processes, warm query latency, the image tower's
encode-only ceiling, and the resident memory of `retrieve serve`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx
import numpy as np

from .context import Context, model_args
from .data import QUERY
from .engine import Index, OnnxImageEncoder, load_image, load_text_tower
from .images import measure_tower_encode_only
from .int8 import top10_overlap
from .measure import (
    K,
    log,
    peak_rss_bytes,
    percentiles,
    proc_figure,
    python_env,
    run_figures,
    run_measured,
    run_sampled,
    stop_server,
    time_each,
)
from .report import mib, table
from .serve import serve_index

NAME = "memory"
TITLE = "r. Memory, cold queries and the encode ceiling"
SUMMARY = ("(only with --only memory) build peak memory (towers exported, cached, re-index), cold\n"
           "`retrieve` queries, warm queries, the image tower's ceiling, `retrieve serve`'s RSS")
NEEDS = {"model", "corpus"}
OPT_IN = True
CLI = [sys.executable, "-m", "retrieval.cli"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-repeats", type=int, default=5,
                        help="whole query processes of each kind [default: 5; --quick: 1]")
    parser.add_argument("--memory-queries", type=int, default=200,
                        help="warm text queries [default: 200; --quick: 20]")
    parser.add_argument("--memory-twin-texts", type=int, default=5000,
                        help="captions encoded by both text towers for the 8-bit twin's agreement "
                             "[default: 5000; --quick: 200]")
    parser.add_argument("--memory-batch-sizes", default="32",
                        help="batch sizes of the encode-only ceiling, comma-separated [default: 32]")


def builds(context: Context, cache: Path) -> list[dict]:
    """`retrieve index` of the corpus three ways: towers exported into an empty cache, towers
    found in the cache (a new index), and an unchanged re-index."""
    args, corpus = context.args, context.corpus
    env = python_env(RETRIEVAL_CACHE=str(cache))
    figures = []
    for label, folder in (("first build (exports the towers)", "first"), ("build, towers cached", "second"),
                          ("unchanged re-index", "second")):
        log(f"memory: {label}")
        run = run_sampled([*CLI, "index", str(corpus.folder), "--index", str(context.workdir / folder),
                           *model_args(context.spec), "--device", args.device], env=env)
        figures.append({"label": label, "wall_s": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes,
                        "peak_tree_pss_bytes": run.peak_tree_pss_bytes,
                        "images_per_s": len(corpus.images) / run.wall_s})
    return figures


def cold_queries(index: Path, image: Path, repeats: int, cache: Path) -> dict:
    """Whole `retrieve` processes, a text query and an image query alternated."""
    env = python_env(RETRIEVAL_CACHE=str(cache))
    runs: dict[str, list] = {"text": [], "image": []}
    for _ in range(repeats):
        runs["text"].append(run_measured([*CLI, QUERY, "--index", str(index), "-k", str(K)], env=env))
        runs["image"].append(run_measured([*CLI, "--image", str(image), "--index", str(index), "-k", str(K)],
                                          env=env))
    return {kind: run_figures(measured) for kind, measured in runs.items()}


def warm_queries(index: Path, texts: list[str]) -> dict:
    """Warm text query latency through `Index.search` (pre-packed and quick ONNX sessions, and the
    8-bit twin of `--int8`), and the text encode alone, also with the build's text tower (a thread
    per core)."""
    figures = {}
    for label, one_shot, int8 in (("pre-packed session", False, False), ("quick session", True, False),
                                  ("int8 twin (--int8)", False, True)):
        with Index.open(index, readonly=True, one_shot=one_shot, int8=int8) as opened:
            search, encode = opened.search, opened.text_encoder.encode_texts
            figures[f"search, {label}"] = percentiles(time_each(lambda t, s=search: s(t, k=K), texts)[1])
            figures[f"encode, {label}"] = percentiles(time_each(lambda t, e=encode: e([t]), texts)[1])
    with Index.open(index, readonly=True) as opened:
        tower = load_text_tower(opened.path, opened.spec.identity, for_build=True)
        if tower is not None:
            figures["encode, build's tower"] = percentiles(
                time_each(lambda t: tower.encode_texts([t]), texts)[1])
    return figures


def twin_agreement(index: Path, texts: list[str]) -> dict:
    """The 8-bit text tower (`--int8`) against the fp32 one on `texts`: the least cosine between
    their vectors, and over text-to-image search among the index's images the mean top-10
    overlap and the share of queries with the same first hit."""
    with Index.open(index, readonly=True) as exact, Index.open(index, readonly=True, int8=True) as eight_bit:
        fp32, int8 = (opened.text_encoder.encode_texts(texts) for opened in (exact, eight_bit))
        _, images = exact.store.all_vectors("image")
    exact_scores, eight_bit_scores = fp32 @ images.T, int8 @ images.T
    return {"texts": len(texts), "least_cosine": float((fp32 * int8).sum(axis=1).min()),
            "top10_overlap": top10_overlap(exact_scores, eight_bit_scores),
            "same_first_hit": float(np.mean(exact_scores.argmax(axis=1) == eight_bit_scores.argmax(axis=1)))}


def ceiling(index: Path, images: list[Path], sizes: list[int]) -> dict:
    """The index's ONNX image tower on pre-decoded pixels, per batch size (see
    `measure_tower_encode_only`)."""
    with Index.open(index, readonly=True) as opened:
        tower = opened.image_encoder
        if not isinstance(tower, OnnxImageEncoder):
            return {}
        pixels = np.stack([tower.preprocess(load_image(path, min_side=2 * tower.input_side))
                           for path in images[:max(sizes) * 2]])
        return {size: measure_tower_encode_only(tower, pixels, size) for size in sizes}


def server_memory(index: Path, image: Path, device: str) -> dict:
    """Resident memory (now, and the most so far) of `retrieve serve`: started, after a text
    query, after an image query."""
    server, url, _ = serve_index(index, device, "--no-access-log")

    def now() -> dict:
        return {"rss_bytes": proc_figure(server.pid, "status", "VmRSS"),
                "peak_bytes": peak_rss_bytes(server.pid)}

    try:
        figures = {"started": now()}
        httpx.get(f"{url}/api/search", params={"q": QUERY, "k": K}, timeout=120).raise_for_status()
        figures["after a text query"] = now()
        with image.open("rb") as upload:
            httpx.post(f"{url}/api/search", files={"image": upload}, data={"k": str(K)},
                       timeout=120).raise_for_status()
        figures["after an image query"] = now()
    finally:
        stop_server(server)
    return figures


def run(context: Context) -> tuple[dict, str]:
    args, corpus = context.args, context.corpus
    cache = context.workdir / "memory-cache"
    index = context.workdir / "second"
    data: dict = {"builds": builds(context, cache)}
    log("memory: cold queries")
    data["cold"] = cold_queries(index, corpus.images[0], 1 if args.quick else args.memory_repeats, cache)
    count = 20 if args.quick else args.memory_queries
    texts = [corpus.texts[i] for i in np.random.default_rng(args.seed).choice(len(corpus.texts), count)] \
        if corpus.texts else [QUERY] * count
    log("memory: warm queries")
    data["warm"] = warm_queries(index, texts)
    log("memory: the 8-bit text tower's agreement with the fp32 one")
    data["twin"] = twin_agreement(index, corpus.texts[:200 if args.quick else args.memory_twin_texts])
    log("memory: the image tower's encode-only ceiling")
    data["ceiling"] = ceiling(index, corpus.images, [int(s) for s in args.memory_batch_sizes.split(",") if s])
    log("memory: `retrieve serve`'s resident memory")
    data["serve"] = server_memory(index, corpus.images[0], args.device)
    sections = [
        table(("build", "wall s", "images/s", "peak RSS", "peak tree PSS"),
              [(b["label"], f"{b['wall_s']:.1f}", f"{b['images_per_s']:.1f}", mib(b["peak_rss_bytes"]),
                mib(b["peak_tree_pss_bytes"])) for b in data["builds"]]),
        table(("whole `retrieve` query process", "median s", "best s", "peak RSS"),
              [(kind, f"{f['median_s']:.2f}", f"{f['min_s']:.2f}", mib(f["peak_rss_bytes"]))
               for kind, f in data["cold"].items()]),
        table(("warm text query", "p50 ms", "p95 ms"),
              [(label, f"{f['p50_ms']:.1f}", f"{f['p95_ms']:.1f}") for label, f in data["warm"].items()]),
        table(("8-bit text tower (`--int8`) against fp32", "texts", "least cosine", "top-10 overlap",
               "same first hit"),
              [("text→image over the index's images", str(data["twin"]["texts"]),
                f"{data['twin']['least_cosine']:.5f}", f"{data['twin']['top10_overlap']:.3f}",
                f"{data['twin']['same_first_hit']:.3f}")]),
        table(("encode-only ceiling, ONNX image tower", "images/s", "CPU s/image"),
              [(f"batch {size}", f"{f['images_per_s']:.1f}", f"{f['cpu_s_per_image']:.3f}")
               for size, f in data["ceiling"].items()]),
        table(("`retrieve serve`", "RSS", "peak RSS"),
              [(label, mib(f["rss_bytes"]), mib(f["peak_bytes"])) for label, f in data["serve"].items()]),
    ]
    return data, "\n\n".join([f"Over {corpus.origin}; builds and queries are whole processes, as users "
                              "run them; peak memory does not depend on the machine's load."] + sections)
