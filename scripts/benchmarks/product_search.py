"""o. Search through the product at scale: `Index.search(vector=...)` end to end on an index of
N synthetic items (1M by default), for every index kind, the auto kind included.

Encoding is left out (the query is a vector); everything after it is in: the freshness check,
FAISS, re-ranking with exact vectors read from SQLite, and turning ids into `Hit`s (hydrating).
The items go in through the product's own store (`Index.store`: `upsert_file`, `insert_items`,
`bump_generation`, all in one transaction); every index is then built by `Index.convert`, as
`retrieve convert` builds it. One real photo is indexed first, so that the model records the
index's vector width the way a build does.
"""

from __future__ import annotations

import argparse

import numpy as np

from .context import Context
from .data import SyntheticVectors, write_synthetic_images
from .engine import INDEX_TYPES, NewItem
from .measure import K, log, percentiles, recall_at_k, time_each, timed
from .report import table

NAME = "search"
TITLE = "o. Search through the product at scale"
SUMMARY = ("(only with --search) Index.search end to end on N synthetic items, every\n"
           "index kind: p50/p95 and recall@10 against exact search")
NEEDS = {"model"}
OPT_IN = True
AUTO_TARGET_MS, AUTO_TARGET_RECALL = 2.0, 0.95  # issue 18, §4b


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--search", action="store_true", help="run only the search section: the "
                        "product at 1M items (~10 GB of RAM, tens of minutes)")
    parser.add_argument("--search-items", type=int,
                        help="items in the index [default: 1,000,000; 20,000 with --quick]")
    parser.add_argument("--search-queries", type=int, default=200,
                        help="queries timed per kind [default: 200]")
    parser.add_argument("--search-kinds", default=",".join(INDEX_TYPES),
                        help=f"kinds measured, comma-separated [default: {','.join(INDEX_TYPES)}]")


def fill(index, vectors: SyntheticVectors) -> np.ndarray:
    """The synthetic items written through the index's store; their item ids, row by row."""
    store, ids = index.store, np.empty(vectors.count, np.int64)
    with store.conn:
        for low in range(0, vectors.count, 65536):
            rows, block = vectors.read(low, low + 65536)
            for row, vector in zip(rows.tolist(), block):
                path = f"/synthetic/{row // 1000:04d}/{row:07d}.jpg"
                digest = f"{row:064x}"
                file_id = store.upsert_file(path, "/synthetic", "image", 100_000, 0, digest)
                ids[row] = store.insert_items(file_id, [NewItem(path, "image", vector, digest)])[0]
        store.bump_generation("image")
    return ids


def exact_top_k(vectors: SyntheticVectors, queries: np.ndarray) -> np.ndarray:
    """Row numbers of each query's true top K, over the vectors block by block."""
    best_scores = np.full((len(queries), K), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), K), np.int64)
    for low in range(0, vectors.count, 65536):
        rows, block = vectors.read(low, low + 65536)
        scores = np.concatenate([best_scores, queries @ block.T], axis=1)
        candidates = np.concatenate([best_rows, np.broadcast_to(rows, (len(queries), len(rows)))], axis=1)
        order = np.argsort(-scores, axis=1)[:, :K]
        best_scores = np.take_along_axis(scores, order, axis=1)
        best_rows = np.take_along_axis(candidates, order, axis=1)
    return best_rows


def measure_kind(index, kind: str, queries: np.ndarray, truth: list[np.ndarray]) -> dict:
    _, build_s = timed(lambda: index.convert(kind))
    built = index.vectors("image").index_type
    hits, millis = time_each(lambda q: index.search(vector=q, vector_of="image", target="image", k=K),
                             list(queries))
    found = [np.array([hit.id for hit in result]) for result in hits]
    return {"kind": kind, "built": built, "build_s": build_s, "recall": recall_at_k(found, truth),
            "hydrated": all(result and result[0].path for result in hits), **percentiles(millis)}


def run(context: Context) -> tuple[dict, str]:
    args, workdir = context.args, context.workdir
    count = args.search_items or (20_000 if args.quick else 1_000_000)
    kinds = [kind for kind in args.search_kinds.split(",") if kind]
    write_synthetic_images(workdir / "search-photo", 1, args.seed)
    with context.open_index(workdir / "index-search") as index:
        index.add(workdir / "search-photo")  # records the model and its vector width
        vectors = SyntheticVectors(count, args.seed, index.dim)
        log(f"search: writing {count:,} items through the store")
        item_ids, fill_s = timed(lambda: fill(index, vectors))
        queries = vectors.queries(args.search_queries)
        log("search: exact top-10 of each query")
        truth = [item_ids[rows] for rows in exact_top_k(vectors, queries)]
        results = []
        for kind in kinds:
            log(f"search: {kind}: convert, then {len(queries)} searches")
            results.append(measure_kind(index, kind, queries, truth))
    data = {"items": count, "dim": vectors.dim, "queries": len(queries), "fill_s": fill_s, "k": K,
            "kinds": results}
    return data, render(data)


def render(data: dict) -> str:
    rows = [(r["kind"] if r["kind"] == r["built"] else f"{r['kind']} ({r['built']})",
             f"{r['build_s']:.0f} s", f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}", f"{r['recall']:.3f}")
            for r in data["kinds"]]
    auto = next((r for r in data["kinds"] if r["kind"] == "auto"), None)
    verdict = []
    if auto is not None:
        met = auto["p50_ms"] <= AUTO_TARGET_MS and auto["recall"] >= AUTO_TARGET_RECALL
        verdict = [f"Auto ({auto['built']}): p50 {auto['p50_ms']:.2f} ms at recall@10 {auto['recall']:.3f}; "
                   f"target p50 ≤ {AUTO_TARGET_MS:g} ms at recall@10 ≥ {AUTO_TARGET_RECALL} "
                   f"{'met' if met else 'NOT met'}.", ""]
    return "\n".join([
        f"{data['items']:,} synthetic clustered unit vectors of {data['dim']} dimensions, written through "
        f"`Index.store` in {data['fill_s']:.0f} s; each kind built by `Index.convert` and searched with "
        f"`Index.search(vector=q, k={data['k']})` ({data['queries']} held-out queries, one at a time): "
        "encoding excluded, re-ranking from SQLite and hydrating into `Hit`s included. Recall@10 "
        "against exact search over the same vectors.", "",
        table(("kind", "convert", "p50 ms", "p95 ms", "recall@10"), rows), "", *verdict])
