"""Loads an on-disk index in a fresh process, as a server would, and searches it: the process's
memory is then what serving needs, apart from the page cache. Run by the scale section as
`python -m benchmarks.ondisk_probe FOLDER QUERIES.npy FOUND.npy NPROBE K`; prints one JSON line.
It imports nothing it does not need, so that its memory is the index's."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from .engine import OnDiskIndex, SearchKnobs


def memory() -> dict[str, int]:
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "RssAnon", "RssFile")}


def main() -> None:
    folder, queries, found_path = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
    nprobe, k = int(sys.argv[4]), int(sys.argv[5])
    before = memory()
    start = time.perf_counter()
    index = OnDiskIndex.load(Path(folder))
    load_s = time.perf_counter() - start
    loaded = memory()
    knobs = SearchKnobs(nprobe=nprobe)
    millis, found = [], []
    for query in queries:
        start = time.perf_counter()
        found.append(index.search(query, k, knobs=knobs)[1])
        millis.append((time.perf_counter() - start) * 1000)
    after = memory()
    np.save(found_path, np.stack(found))

    # A second pass, step by step (one thread, as a search runs): where a query's time goes.
    faiss.omp_set_num_threads(1)
    ivf = faiss.extract_index_ivf(index.index)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    steps: dict[str, list[float]] = {"coarse": [], "scan": [], "rerank": []}
    for query in queries:
        row = query[None, :].astype(np.float32)
        start = time.perf_counter()
        ivf.quantizer.search(row, nprobe)
        steps["coarse"].append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        _, ids = index.index.search(row, k * knobs.rerank_for(index.index_type), params=params)
        steps["scan"].append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        index.exact_vectors(ids[0][ids[0] >= 0]) @ query
        steps["rerank"].append((time.perf_counter() - start) * 1000)
    print(json.dumps({"load_s": load_s, "before": before, "loaded": loaded, "after": after,
                      "millis": millis, "steps_p50_ms": {k: float(np.median(v)) for k, v in steps.items()}}))


if __name__ == "__main__":
    main()
