"""o. Service under load: 8 clients' requests/s and p50/p95/p99, the same beside a client
uploading a 100-megapixel image in a loop, and fan-out over shards against one combined index."""

from __future__ import annotations

import argparse
import io
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from .context import Context
from .data import QUERY
from .measure import K, log, percentiles, stop_server
from .report import table
from .serve import serve_index

NAME = "server"
TITLE = "o. Search service under load"
SUMMARY = ("(only with --only server) 8 clients' req/s and p50/p95/p99; beside a 100 MP upload loop;\n"
           "fan-out over shards against one combined index")
NEEDS = {"model", "corpus"}
OPT_IN = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-clients", type=int, default=8,
                        help="concurrent search clients [default: 8]")
    parser.add_argument("--server-requests", type=int, default=200,
                        help="text queries each client sends [default: 200; --quick: 10]")
    parser.add_argument("--server-megapixels", type=float, default=100,
                        help="size of the image uploaded in a loop [default: 100; --quick: 4]")
    parser.add_argument("--server-shards", type=int, default=3,
                        help="shards the corpus is split over for fan-out; 0: none [default: 3]")
    parser.add_argument("--server-url", metavar="URL",
                        help="measure the `retrieve serve` already running at URL (an older "
                        "checkout's, say, for a before figure): the load and the upload loop "
                        "only; nothing is indexed, and no fan-out")


def load(url: str, queries: Sequence[str], clients: int) -> dict:
    """`clients` threads, each sending every query once: requests/s and latency percentiles."""
    def one(_: int) -> tuple[list[float], int]:
        millis, errors = [], 0
        with httpx.Client(timeout=120) as client:
            for query in queries:
                start = time.perf_counter()
                response = client.get(f"{url}/api/search", params={"q": query, "k": K})
                millis.append((time.perf_counter() - start) * 1000)
                errors += response.status_code != 200
        return millis, errors

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - started
    millis = [m for part, _ in parts for m in part]
    return {"clients": clients, "requests": len(millis), "errors": sum(e for _, e in parts),
            "requests_per_s": len(millis) / wall, **percentiles(millis)}


def flat_png(megapixels: float) -> bytes:
    """A flat PNG of this many megapixels: small to send, expensive to decode."""
    side = int((megapixels * 1e6) ** 0.5)
    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 40)).save(out, "PNG", optimize=True)
    return out.getvalue()


def load_with_uploads(url: str, queries: Sequence[str], clients: int, megapixels: float) -> dict:
    """`load` while one more client uploads a `megapixels` image in a loop."""
    upload_bytes = flat_png(megapixels)
    stop = threading.Event()
    uploads: list[tuple[int, float]] = []

    def upload() -> None:
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                start = time.perf_counter()
                response = client.post(f"{url}/api/search", data={"k": str(K)},
                                       files=[("image", ("big.png", upload_bytes, "image/png"))])
                uploads.append((response.status_code, (time.perf_counter() - start) * 1000))

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        measured = load(url, queries, clients)
    finally:
        stop.set()
        uploader.join()
    return {**measured, "upload_megapixels": megapixels, "upload_bytes": len(upload_bytes),
            "uploads": len(uploads), "upload_statuses": sorted({status for status, _ in uploads}),
            "upload": percentiles([ms for _, ms in uploads] or [0.0])}


def served(index_dirs: Sequence[Path], device: str, measure, *options: str) -> dict:
    """`measure(url)` against `retrieve serve` over the first folder, the rest as shards."""
    shards = [option for shard in index_dirs[1:] for option in ("--shard-index", str(shard))]
    server, url, _ = serve_index(index_dirs[0], device, "--no-access-log", *shards, *options)
    try:
        return measure(url)
    finally:
        stop_server(server)


def split_corpus(context: Context, count: int) -> list[Path]:
    """The corpus's images copied into `count` folders, in turn (copies: the engine does not
    follow a link leading out of the folder it indexes)."""
    parts = [context.workdir / f"server-part{number}" for number in range(count)]
    for number, part in enumerate(parts):
        part.mkdir()
        for image in context.corpus.images[number::count]:
            shutil.copy(image, part / image.name)
    return parts


def run(context: Context) -> tuple[dict, str]:
    args, corpus = context.args, context.corpus
    requests = 10 if args.quick else args.server_requests
    megapixels = 4 if args.quick else args.server_megapixels
    queries = ((corpus.texts or [QUERY]) * requests)[:requests]

    def one_index(url: str) -> dict:
        load(url, queries[:10], 1)  # warm-up: model and FAISS loaded
        log(f"server: {args.server_clients} clients, {len(queries)} queries each")
        measured = {"one_index": load(url, queries, args.server_clients)}
        log(f"server: the same beside a {megapixels:g} MP upload loop")
        measured["one_index_with_uploads"] = load_with_uploads(url, queries, args.server_clients, megapixels)
        return measured

    if args.server_url:
        log(f"server: measuring the server at {args.server_url}")
        data = one_index(args.server_url.rstrip("/"))
        return data, report(data, f"the server at {args.server_url}", len(queries), megapixels,
                            args.server_shards)
    log(f"server: indexing the images of {corpus.origin}, whole and in {args.server_shards} shards")
    parts = split_corpus(context, max(1, args.server_shards))
    whole = context.workdir / "server-whole"
    with context.open_index(whole) as index:
        index.add(*parts)
    shard_dirs = []
    for number, part in enumerate(parts if args.server_shards else []):
        shard_dirs.append(context.workdir / f"server-shard{number}")
        with context.open_index(shard_dirs[-1]) as index:
            index.add(part)

    data = served([whole], args.device, one_index, "--max-upload-mb", str(max(50, megapixels)))
    if shard_dirs:
        def fan_out(url: str) -> dict:
            load(url, queries[:10], 1)
            log(f"server: fan-out over {len(shard_dirs)} shards")
            return load(url, queries, args.server_clients)

        data["fan_out"] = {"shards": len(shard_dirs), **served(shard_dirs, args.device, fan_out)}
    return data, report(data, f"`retrieve serve` in its own process over {corpus.origin}", len(queries),
                        megapixels, args.server_shards)


def report(data: dict, server: str, queries: int, megapixels: float, shards: int) -> str:
    """The section's text: what was measured, and a row per measurement."""
    labels = {"one_index": "one index", "one_index_with_uploads": f"one index, beside a {megapixels:g} MP "
              "upload loop", "fan_out": f"fan-out over {shards} shards"}
    rows = [(labels[name], f"{r['clients']}", f"{r['requests_per_s']:.0f}", f"{r['p50_ms']:.1f}",
             f"{r['p95_ms']:.1f}", f"{r['p99_ms']:.1f}", r["errors"]) for name, r in data.items()]
    uploads = data["one_index_with_uploads"]
    return "\n".join([
        f"{server}; each client sends {queries} "
        f"text queries (the corpus's captions) over HTTP. The upload loop sent "
        f"{uploads['uploads']} images of {uploads['upload_bytes'] / 1e3:.0f} kB (statuses "
        f"{uploads['upload_statuses']}, p50 {uploads['upload']['p50_ms']:.0f} ms).", "",
        table(("measurement", "clients", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"), rows)])
