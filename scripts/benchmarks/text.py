"""b. Text encoding: single-query latency (the torch model, and the numpy text tower index
readers answer with) and batch throughput."""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .context import Context
from .data import generated_captions
from .engine import ClipEncoder, OnnxTextEncoder, export_towers, load_text_tower
from .measure import log, percentiles, time_each, timed
from .report import table

NAME = "text"
TITLE = "b. Text encoding"
SUMMARY = "single-query latency and batch throughput of the text encoder"
NEEDS = {"encoder", "corpus"}
TEXT_BATCH = 256  # batch throughput is also measured at this batch, beside --batch-size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--texts", type=int, default=1000, help="texts for batch throughput")
    parser.add_argument("--text-queries", type=int, default=50, help="single text queries timed")


def measure_text_latency(encoder: ClipEncoder | OnnxTextEncoder, texts: Sequence[str], count: int,
                         seed: int) -> dict:
    """`encode_texts([q])` for `count` texts picked at random, after five warm-up calls."""
    picks = np.random.default_rng(seed).choice(len(texts), count, replace=len(texts) < count)
    queries = [texts[i] for i in picks]
    _, millis = time_each(lambda query: encoder.encode_texts([query]), queries, warmup=5)
    return {"queries": count, "mean_words": statistics.mean(len(q.split()) for q in queries),
            **percentiles(millis)}


def onnx_text_tower(encoder: ClipEncoder, folder: Path) -> OnnxTextEncoder | None:
    """The ONNX text tower a build exports and index readers answer text queries with
    (None for a model whose text tower does not export)."""
    folder.mkdir(parents=True, exist_ok=True)
    export_towers(encoder, folder)
    return load_text_tower(folder, encoder.spec.identity)


def measure_text_throughput(encoder: ClipEncoder, texts: Sequence[str], batch: int) -> dict:
    """`encode_texts` over all `texts` by an encoder sharing the model, `batch` texts a pass."""
    batched = copy.copy(encoder)
    batched.batch_size = batch
    batched.encode_texts(texts[:batch])
    _, seconds = timed(lambda: batched.encode_texts(texts))
    return {"batch": batch, "texts": len(texts), "seconds": seconds, "texts_per_s": len(texts) / seconds}


def run(context: Context) -> tuple[dict, str]:
    args, encoder, corpus_texts = context.args, context.encoder, context.corpus.texts
    texts = corpus_texts or generated_captions(args.texts, args.seed)
    log(f"text: {args.text_queries} single-query encodes")
    latency = measure_text_latency(encoder, texts, args.text_queries, args.seed)
    tower = None if args.int8 else onnx_text_tower(encoder, context.workdir / "text-tower")
    tower_latency = measure_text_latency(tower, texts, args.text_queries, args.seed) if tower else None
    many = [texts[i % len(texts)] for i in range(args.texts)]
    throughput = []
    for batch in sorted({args.batch_size, TEXT_BATCH}):
        log(f"text: {len(many)} texts in batches of {batch}")
        throughput.append(measure_text_throughput(encoder, many, batch))
    data = {"source": "corpus captions" if corpus_texts else "generated captions",
            "single_query": latency, "single_query_onnx_tower": tower_latency,
            "throughput": throughput}
    rows = [(f"single query, `ClipEncoder.encode_texts([q])` ({latency['queries']} queries, "
             f"{latency['mean_words']:.1f} words avg)",
             f"p50 {latency['p50_ms']:.1f} ms, p95 {latency['p95_ms']:.1f} ms"),
            ("single query, `OnnxTextEncoder.encode_texts([q])` (what index readers use)",
             f"p50 {tower_latency['p50_ms']:.1f} ms, p95 {tower_latency['p95_ms']:.1f} ms"
             if tower_latency else "none: builds export no tower for this model or with --int8")]
    rows += [(f"batch throughput, {t['texts']} texts in batches of {t['batch']}"
              + (" (the build's batch)" if t["batch"] == args.batch_size else ""),
              f"{t['texts_per_s']:.0f} texts/s") for t in throughput]
    return data, f"Texts: {data['source']}.\n\n" + table(("measurement", "result"), rows)
