"""c. ANN indexes: every in-memory FAISS kind of the engine on clustered synthetic vectors:
build time, size, latency and recall@10 at the default knobs and across a knob sweep."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict

import faiss
import numpy as np

from .context import Context
from .data import ANN_CENTRES, ANN_DIM, ANN_NOISE, ANN_TOPICS, ann_dataset
from .engine import MEMORY_INDEX_TYPES, SearchKnobs, VectorIndex
from .measure import K, log, percentiles, recall_at_k, time_each, timed
from .report import table

NAME = "ann"
TITLE = "c. ANN indexes"
SUMMARY = "every FAISS kind of the engine: build time, size, latency, recall@10, knobs"
NEEDS: set[str] = set()
RECALL_TARGET = 0.95
EF_SEARCH = (16, 32, 64, 128)
NPROBE = (8, 16, 32, 64)
RERANK = (1, 4, 10, 50)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="10000,100000", help="ANN sizes, comma-separated")
    parser.add_argument("--million", action="store_true", help="also run the ANN section at N=1M")
    parser.add_argument("--queries", type=int, default=200, help="held-out ANN queries [default: 200]")


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
    return {"kind": index.index_type, "n": len(vectors), "build_s": build_s,
            "bytes_per_vector": size / len(vectors), "settings": settings,
            "default": next(s for s in settings if s["default"]),
            "cheapest_reaching_target": cheapest}, default_found


def measure_size(count: int, args: argparse.Namespace) -> list[dict]:
    log(f"ann: N={count}: generating {count} clustered vectors")
    vectors, queries = ann_dataset(count, args.queries, args.seed)
    log(f"ann: N={count}: flat")
    flat, truth = measure_kind("flat", vectors, queries, None)
    results = [flat]
    for kind in MEMORY_INDEX_TYPES[1:]:  # on-disk kinds: see --scale
        log(f"ann: N={count}: {kind}")
        results.append(measure_kind(kind, vectors, queries, truth)[0])
    return results


def run(context: Context) -> tuple[dict, str]:
    args = context.args
    results = [result for count in args.sizes for result in measure_size(count, args)]
    data = {"dim": ANN_DIM, "topics": ANN_TOPICS, "centres": ANN_CENTRES, "noise_norm": ANN_NOISE, "k": K,
            "queries": args.queries, "recall_target": RECALL_TARGET, "results": results}
    return data, render(data)


def render(data: dict) -> str:
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
