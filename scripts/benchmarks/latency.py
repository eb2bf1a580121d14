"""d. Cold CLI and warm search latency on a small index of synthetic photos."""

from __future__ import annotations

import argparse
import statistics
import sys

from .context import Context
from .data import QUERY, write_synthetic_images
from .engine import Index
from .measure import K, log, percentiles, run_measured, time_each
from .report import table

NAME = "cli"
TITLE = "d. Cold CLI and warm search latency"
SUMMARY = "cold `python -m retrieval.cli` search, warm Index.search, warm vector search"
NEEDS = {"model"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cli-images", type=int, default=50, help="images in the CLI test index")
    parser.add_argument("--cli-runs", type=int, default=5, help="cold CLI searches timed")
    parser.add_argument("--api-runs", type=int, default=50, help="warm API searches timed")


def measure_warm_search(reader: Index, runs: int) -> dict:
    """`Index.search` on an index opened read-only (as the CLI opens it), then the calls it
    makes once the query vector exists."""
    _, api = time_each(lambda _: reader.search(QUERY, k=K), range(runs))
    vector = reader.text_encoder.encode_texts([QUERY])[0]
    _, vector_only = time_each(lambda _: reader.vectors("image").search(
        vector, K, None, reader.search_knobs(), reader.store.vectors_for_ids), range(runs))
    return {"runs": runs, "text_encoder": type(reader.text_encoder).__name__,
            "index_kind": reader.vectors("image").index_type, "api_search": percentiles(api),
            "vector_search": percentiles(vector_only)}


def run(context: Context) -> tuple[dict, str]:
    """Cold `python -m retrieval.cli` searches, then warm in-process searches, on a small index."""
    args, workdir = context.args, context.workdir
    folder, path = workdir / "cli-images", workdir / "index-cli"
    write_synthetic_images(folder, args.cli_images, args.seed + 1)
    log(f"cli: building a {args.cli_images}-image index")
    with context.open_index(path) as writer:
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
