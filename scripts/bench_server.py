"""Benchmark section: the search service under load, through public interfaces only (`Index` to
build, `retrieve serve` in its own process, HTTP to measure).

- 8 clients sending text searches: requests/s, p50/p95/p99;
- the same while one more client uploads a 100-megapixel image in a loop;
- fan-out: one front serving the corpus split over shards, against one combined index.

    python3 scripts/bench_server.py --quick                 # tiny test model, synthetic images
    python3 scripts/bench_server.py --images DIR --model ... # real figures (the lead, quiet machine)

The lead calls `section_server(index_dir, shard_dirs, queries, ...)` from the benchmark package.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
K = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(index_dirs: Sequence[Path], device: str = "cpu",
                 max_upload_mb: float = 20) -> tuple[subprocess.Popen, str]:
    """`retrieve serve` over the first folder (the rest as shards); returns once it answers."""
    port = free_port()
    command = [sys.executable, "-m", "retrieval.cli", "serve", "--index", str(index_dirs[0]),
               "--port", str(port), "--device", device, "--no-access-log",
               "--max-upload-mb", str(max_upload_mb)]
    for shard in index_dirs[1:]:
        command += ["--shard-index", str(shard)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"retrieve serve did not start: {process.stderr.read().decode()[-2000:]}")


def percentiles(millis: list[float]) -> dict:
    values = np.asarray(millis or [0.0])
    return {f"p{q}": round(float(np.percentile(values, q)), 2) for q in (50, 95, 99)}


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
            "requests_per_s": round(len(millis) / wall, 1), **percentiles(millis)}


def big_png(megapixels: float) -> bytes:
    """A flat PNG of this many megapixels: small to send, expensive to decode."""
    side = int((megapixels * 1e6) ** 0.5)
    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 40)).save(out, "PNG", optimize=True)
    return out.getvalue()


def load_with_uploads(url: str, queries: Sequence[str], clients: int, megapixels: float) -> dict:
    """`load` while one more client uploads a `megapixels` image in a loop."""
    data = big_png(megapixels)
    stop = threading.Event()
    uploads: list[tuple[int, float]] = []

    def upload() -> None:
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                start = time.perf_counter()
                response = client.post(f"{url}/api/search", data={"k": str(K)},
                                       files=[("image", ("big.png", data, "image/png"))])
                uploads.append((response.status_code, (time.perf_counter() - start) * 1000))

    uploader = threading.Thread(target=upload)
    uploader.start()
    try:
        measured = load(url, queries, clients)
    finally:
        stop.set()
        uploader.join()
    return {**measured, "upload_megapixels": megapixels, "upload_bytes": len(data),
            "uploads": len(uploads), "upload_statuses": sorted({status for status, _ in uploads}),
            "upload_ms": percentiles([ms for _, ms in uploads])}


def section_server(index_dir: Path, shard_dirs: Sequence[Path], queries: Sequence[str], *,
                   clients: int = 8, megapixels: float = 100, device: str = "cpu") -> dict:
    """The whole section: load on one index, load beside uploads, fan-out against one index.
    `index_dir` holds the whole corpus; `shard_dirs` the same corpus split (may be empty)."""
    results: dict = {}
    server, url = start_server([index_dir], device, max_upload_mb=50)
    try:
        load(url, queries[:10], 1)  # warm-up: model and FAISS loaded
        results["one_index"] = load(url, queries, clients)
        results["one_index_with_uploads"] = load_with_uploads(url, queries, clients, megapixels)
    finally:
        server.terminate()
        server.wait(timeout=60)
    if shard_dirs:
        server, url = start_server(list(shard_dirs), device)
        try:
            load(url, queries[:10], 1)
            results["fan_out"] = {"shards": len(shard_dirs), **load(url, queries, clients)}
        finally:
            server.terminate()
            server.wait(timeout=60)
    return results


def render(results: dict) -> str:
    """The section as Markdown rows."""
    rows = ["| measurement | req/s | p50 ms | p95 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} ({r['clients']} clients) | {r['requests_per_s']} | {r['p50']} | "
                    f"{r['p95']} | {r['p99']} | {r['errors']} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny test model, 40 synthetic images, "
                        "few requests, a 4 MP upload: proves the code runs, measures nothing")
    parser.add_argument("--images", type=Path, help="a folder of images to index")
    parser.add_argument("--model", help="model spec for the index (default: the tiny test model)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="queries per client")
    parser.add_argument("--megapixels", type=float, default=100)
    parser.add_argument("--shards", type=int, default=3)
    args = parser.parse_args()
    from retrieval import Index

    with tempfile.TemporaryDirectory(prefix="bench-server-") as work:
        work = Path(work)
        model = args.model
        if model is None:
            sys.path.insert(0, str(REPO / "tests"))
            from support.tiny_model import write_local_dir_model

            model = write_local_dir_model(work / "model", seed=0)
        images = args.images
        if images is None or args.quick:
            images = work / "images"
            images.mkdir()
            rng = np.random.default_rng(0)
            for number in range(40 if args.quick else 400):
                Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(
                    images / f"img{number:04d}.png")
        files = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        with Index.open(work / "whole", model=model, create=True) as index:
            index.add(images)
        shard_dirs = []
        for number in range(args.shards):
            part = work / f"part{number}"
            part.mkdir()
            for path in files[number::args.shards]:
                shutil.copy(path, part / path.name)  # copies: links leading out are not indexed
            with Index.open(work / f"shard{number}", model=model, create=True) as index:
                index.add(part)
            shard_dirs.append(work / f"shard{number}")
        words = ["a dog", "a red car", "people on a beach", "a child playing", "mountains"]
        queries = (words * 100)[:10 if args.quick else args.requests]
        results = section_server(work / "whole", shard_dirs, queries, clients=args.clients,
                                 megapixels=4 if args.quick else args.megapixels)
    print(json.dumps(results, indent=2))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
