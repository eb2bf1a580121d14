"""g. Search service: `retrieve serve` over the corpus, its warm HTTP query latency, and
requests/s with concurrent clients."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .context import Context
from .data import QUERY
from .measure import K, free_port, log, percentiles, start_server, stop_server
from .report import table

NAME = "serve"
TITLE = "g. Search service"
SUMMARY = "`retrieve serve` over the corpus: warm HTTP query latency, and requests/s with 8 clients"
NEEDS = {"model", "corpus"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--serve-requests", type=int, default=200,
                        help="text queries each HTTP client sends [default: 200]")
    parser.add_argument("--serve-clients", type=int, default=8, help="concurrent HTTP clients")


def serve_index(index_dir: Path, device: str, *options: str) -> tuple[subprocess.Popen, str, float]:
    """`retrieve serve` in its own process, as users run it, with more CLI `options`: the
    process, its base URL and the seconds until it answered."""
    port = free_port()
    process, started_s = start_server(
        [sys.executable, "-m", "retrieval.cli", "serve", "--index", str(index_dir), "--port", str(port),
         "--device", device, *options], f"http://127.0.0.1:{port}/api/health", "retrieve serve")
    return process, f"http://127.0.0.1:{port}", started_s


def timed_requests(client: httpx.Client, url: str, queries: Sequence[str]) -> list[float]:
    millis = []
    for query in queries:
        start = time.perf_counter()
        client.get(url, params={"q": query, "k": K}).raise_for_status()
        millis.append((time.perf_counter() - start) * 1000)
    return millis


def run(context: Context) -> tuple[dict, str]:
    """Build an index of the corpus, serve it, and query it over HTTP: alone, then 8 at once."""
    args, corpus = context.args, context.corpus
    path = context.workdir / "index-serve"
    log(f"serve: building an index of {corpus.origin}")
    with context.open_index(path) as index:
        index.add(corpus.folder)
    server, base, _ = serve_index(path, args.device)
    url = f"{base}/api/search"
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
        stop_server(server)
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
