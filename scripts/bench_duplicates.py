"""Benchmark of duplicate finding (issue 17), through the public API only.

1. Precision and recall against the threshold, on a photo folder (Flickr8k's test images) plus
   planted near-duplicates made from its photos (one edit each: resized, JPEG q60, 90% crop,
   brightness +-10%, mirrored, or a byte copy), written to a temporary folder: for vectors
   (ViT-B-32 with random weights, and the trained tiny model), pHash, and both.
2. The time of `retrieve duplicates` over the indexed images (a new process, as a user runs it).
3. The pair search alone over synthetic vectors (1M by default) with planted near copies, to
   show that range search scales: seconds, and the planted pairs found.

    python scripts/bench_duplicates.py                  # the figures README quotes
    python scripts/bench_duplicates.py --quick          # a smoke run: a few photos, 20k vectors
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # planted copies and the tiny model, as the tests make them
sys.path.insert(0, str(REPO / "scripts"))

from support.planted import EDITS, plant_copies  # noqa: E402

from retrieval import Index  # noqa: E402
from retrieval.query.duplicates import connected_groups, similar_pairs  # noqa: E402

THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
DISTANCES = (2, 4, 6, 8, 10, 12, 16)
PHOTOS = Path("/work/shared/data/flickr8k-test/images")


def plant(photos: list[Path], count: int, folder: Path, seed: int) -> dict[str, str]:
    """One planted copy of each of `count` photos, the edit chosen at random; copy -> original."""
    rng = np.random.default_rng(seed)
    edits = [*EDITS, "copy"]
    truth = {}
    for number, original in enumerate(rng.choice(len(photos), count, replace=False)):
        edit = edits[number % len(edits)]
        (copy,) = plant_copies(photos[original], folder / edit, (edit,))
        truth[str(copy)] = str(photos[original])
    return truth


def scores(index: Index, truth: dict[str, str], **options) -> dict:
    found = index.duplicates(**options)
    pairs = {tuple(sorted(p)) for g in found.groups
             for p in itertools.combinations([f.path for f in g.files], 2)}
    true = {tuple(sorted(p)) for p in truth.items()}
    hits = len(pairs & true)
    return {**{k: v for k, v in options.items()}, "precision": round(hits / max(1, len(pairs)), 4),
            "recall": round(hits / len(true), 4), "groups": len(found.groups),
            "seconds": round(found.seconds, 2)}


def threshold_curves(index: Index, truth: dict[str, str], hashes: bool) -> dict:
    curves = {"vector": [scores(index, truth, threshold=t) for t in THRESHOLDS]}
    if hashes:
        curves["phash"] = [scores(index, truth, by="phash", max_distance=d) for d in DISTANCES]
        curves["both"] = [scores(index, truth, by="both", threshold=t, max_distance=d)
                          for t in THRESHOLDS for d in (4, 6, 8)]
    return curves


def command_seconds(folder: Path) -> float:
    """Wall time of `retrieve duplicates --json` in a new process (start-up included)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "retrieval.cli", "duplicates", "--index", str(folder), "--json"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return round(time.perf_counter() - started, 2)


def synthetic(count: int, dim: int, seed: int, planted_share: float = 0.01) -> dict:
    """Random unit vectors, a share of them near copies of others (cosine ~0.97): the seconds the
    pair search and grouping take, and the share of planted pairs found at threshold 0.92."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    planted = int(count * planted_share)
    sources = rng.choice(count - planted, planted, replace=False)
    noise = rng.standard_normal((planted, dim), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    vectors[count - planted:] = vectors[sources] + 0.25 * noise
    started = time.perf_counter()
    pairs = similar_pairs(vectors, 0.92)
    groups = connected_groups(count, pairs)
    seconds = time.perf_counter() - started
    found = {tuple(p) for p in pairs.tolist()}
    recall = np.mean([(int(s), count - planted + i) in found for i, s in enumerate(sources)])
    return {"vectors": count, "dim": dim, "planted_pairs": planted, "seconds": round(seconds, 1),
            "pairs": len(pairs), "groups": len(groups), "planted_recall": round(float(recall), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=PHOTOS, help="folder of photos (read only)")
    parser.add_argument("--planted", type=int, default=500, help="planted near-duplicates")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="synthetic vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--models", default="vit-random,tiny", help="vit-random and/or tiny")
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 photos, 10 planted, 20k vectors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if args.quick:
        photos, args.planted, args.vectors, args.models = photos[:40], 10, 20_000, "tiny"
    results: dict = {"photos": len(photos), "planted": args.planted}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        truth = plant(photos, args.planted, work / "planted", args.seed)
        for name in args.models.split(","):
            spec = model_spec(name, work, args.seed)
            folder = work / f"index-{name}"
            with Index.open(folder, model=spec, create=True) as index:
                sources = [work / "planted"] + ([args.photos] if not args.quick else photos)
                report = index.add(*sources)
                hashes = index.duplicates(by="vector").images > 0 and _hashed(index)
                results[name] = {"build": report.summary(), "curves": threshold_curves(index, truth, hashes)}
            results[name]["command_seconds"] = command_seconds(folder)
    results["synthetic"] = synthetic(args.vectors, args.dim, args.seed)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _hashed(index: Index) -> bool:
    try:
        index.duplicates(by="phash")
        return True
    except Exception as error:  # imagehash not installed: pHash curves are left out, said once
        print(f"pHash left out: {error}", file=sys.stderr)
        return False


def model_spec(name: str, work: Path, seed: int) -> str:
    if name == "tiny":
        from support.tiny_model import train_tiny_clip, write_local_dir_model

        return write_local_dir_model(work / "tiny", train_tiny_clip(seed=seed))
    if name == "vit-random":
        from benchmark import write_random_vit_b32  # the main benchmark's random ViT-B-32

        return write_random_vit_b32(work / "vit-b-32", seed)
    raise SystemExit(f"--models: unknown model {name!r}; choose vit-random or tiny")


if __name__ == "__main__":
    main()
