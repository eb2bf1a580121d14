"""i. Scale: an on-disk IVF-PQ index of synthetic 512-d vectors (build time, RAM and disk per
vector, query latency and recall@10), and metadata lookups in SQLite against a columnar Arrow
file at the same row count."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .context import Context
from .data import ANN_TOPICS, SCALE_POINTS_PER_CENTRE, SyntheticVectors
from .engine import Store, build_on_disk
from .measure import K, log, percentiles, python_env, recall_at_k, time_each, timed
from .report import table

NAME = "scale"
TITLE = "i. Scale: an on-disk index of synthetic vectors"
SUMMARY = ("(only with --scale) a 10M-vector on-disk IVF-PQ index from synthetic 512-d vectors:\n"
           "build time, RAM and disk per vector, query latency and recall@10; metadata lookups\n"
           "in SQLite against a columnar Arrow file at the same row count")
NEEDS: set[str] = set()
OPT_IN = True
SCALE_LISTS = 4096  # ~2,400 vectors a list at 10M: training and filling fit this machine's 2 cores


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", action="store_true",
                        help="run only the scale section (about half an hour on 2 cores)")
    parser.add_argument("--scale-vectors", type=int, default=10_000_000,
                        help="vectors in the scale section's on-disk index [default: 10M]")
    parser.add_argument("--scale-rows", type=int, default=10_000_000,
                        help="metadata rows in the scale section's lookups [default: 10M]")
    parser.add_argument("--scale-dir", type=Path,
                        help="where the scale section builds (needs ~25 GB at 10M) [default: a temp folder]")


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


def probe_serving(folder: Path, queries: np.ndarray, nprobe: int, workdir: Path
                  ) -> tuple[dict, np.ndarray]:
    """`benchmarks.ondisk_probe` in a fresh process: its memory and latencies, and what it found."""
    np.save(workdir / "queries.npy", queries)
    result = subprocess.run([sys.executable, "-m", "benchmarks.ondisk_probe", str(folder),
                             str(workdir / "queries.npy"), str(workdir / "found.npy"), str(nprobe), str(K)],
                            capture_output=True, text=True, check=True, env=python_env())
    return json.loads(result.stdout.splitlines()[-1]), np.load(workdir / "found.npy")


def folder_bytes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_blocks * 512 for path in folder.iterdir()}


def measure_sqlite_metadata(count: int, folder: Path, lookups: list[np.ndarray]) -> dict:
    """The product's store with `count` image items; each lookup reads what a search reads to
    turn 10 hits into results (their rows and captions).

    The rows go in with bulk SQL on the store's connection: the store's own per-file calls
    would take hours at 10M rows, and the lookups, not the filling, are measured."""
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


def run(context: Context) -> tuple[dict, str]:
    args, workdir = context.args, context.workdir
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
    return data, render(data)


def render(data: dict) -> str:
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
