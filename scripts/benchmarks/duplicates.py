"""p. Duplicate finding: precision and recall against the threshold on the corpus plus planted
near-duplicates, the time of `retrieve duplicates`, and the pair search over 1M vectors."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from .context import Context
from .data import near_copy_vectors
from .engine import Index, connected_groups, similar_pairs
from .measure import REPO, log, python_env, run_measured, timed
from .report import table

NAME = "duplicates"
TITLE = "p. Duplicate finding"
SUMMARY = ("(only with --only duplicates) precision/recall against the threshold on planted copies,\n"
           "`retrieve duplicates` time, the pair search over 1M synthetic vectors")
NEEDS = {"model", "corpus"}
OPT_IN = True
THRESHOLDS = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)
DISTANCES = (2, 4, 6, 8, 10, 12, 16)
SYNTHETIC_THRESHOLD = 0.92


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duplicates-planted", type=int, default=500,
                        help="near-duplicates planted among the corpus's photos [default: 500; --quick: 10]")
    parser.add_argument("--duplicates-vectors", type=int, default=1_000_000,
                        help="synthetic vectors for the pair search [default: 1000000; --quick: 20000]")
    parser.add_argument("--duplicates-dim", type=int, default=512, help="their dimension [default: 512]")
    parser.add_argument("--duplicates-models", default="run,trained-tiny",
                        help="models whose curves are measured: run (the run's model) and/or "
                        "trained-tiny (the test suite's trained tiny model) [default: both; --quick: run]")


def plant(photos: list[Path], count: int, folder: Path, seed: int) -> dict[str, str]:
    """One planted copy of each of `count` photos, the edit chosen in turn; copy -> original."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.planted import EDITS, plant_copies

    rng = np.random.default_rng(seed)
    edits = [*EDITS, "copy"]
    truth = {}
    for number, original in enumerate(rng.choice(len(photos), min(count, len(photos)), replace=False)):
        edit = edits[number % len(edits)]
        (copy,) = plant_copies(photos[original], folder / edit, (edit,))
        truth[str(copy.resolve())] = str(photos[original].resolve())
    return truth


def scores(index: Index, truth: dict[str, str], **options: object) -> dict:
    found = index.duplicates(**options)
    pairs = {tuple(sorted(p)) for g in found.groups
             for p in itertools.combinations([str(Path(f.path).resolve()) for f in g.files], 2)}
    true = {tuple(sorted(p)) for p in truth.items()}
    hits = len(pairs & true)
    return {**options, "precision": hits / max(1, len(pairs)), "recall": hits / len(true),
            "groups": len(found.groups), "seconds": found.seconds}


def threshold_curves(index: Index, truth: dict[str, str]) -> dict:
    curves = {"vector": [scores(index, truth, threshold=t) for t in THRESHOLDS]}
    try:
        index.duplicates(by="phash")
    except Exception as error:  # noqa: BLE001 - imagehash missing: the pHash curves are left out, said once
        log(f"duplicates: pHash left out: {error}")
        return curves
    curves["phash"] = [scores(index, truth, by="phash", max_distance=d) for d in DISTANCES]
    curves["both"] = [scores(index, truth, by="both", threshold=t, max_distance=d)
                      for t in THRESHOLDS for d in (4, 6, 8)]
    return curves


def pair_search(count: int, dim: int, seed: int) -> dict:
    """Seconds the pair search and grouping take over synthetic vectors with planted near copies,
    and the share of planted pairs found."""
    vectors, sources = near_copy_vectors(count, dim, seed)

    def search() -> tuple[np.ndarray, list[list[int]]]:
        pairs = similar_pairs(vectors, SYNTHETIC_THRESHOLD)
        return pairs, connected_groups(count, pairs)

    (pairs, groups), seconds = timed(search)
    found = {tuple(p) for p in pairs.tolist()}
    first = count - len(sources)
    recall = float(np.mean([(int(s), first + i) in found for i, s in enumerate(sources)]))
    return {"vectors": count, "dim": dim, "planted_pairs": len(sources), "seconds": seconds,
            "pairs": len(pairs), "groups": len(groups), "planted_recall": recall}


def model_for(name: str, context: Context) -> str:
    if name == "run":
        return context.spec.identity
    if name == "trained-tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from support.tiny_model import train_tiny_clip, write_local_dir_model

        trained = train_tiny_clip(seed=context.args.seed)
        return write_local_dir_model(context.workdir / "trained-tiny", trained)
    raise SystemExit(f"--duplicates-models: unknown model {name!r}; choose run or trained-tiny")


def run(context: Context) -> tuple[dict, str]:
    args, corpus = context.args, context.corpus
    planted = 10 if args.quick else args.duplicates_planted
    vectors = 20_000 if args.quick else args.duplicates_vectors
    models = "run" if args.quick else args.duplicates_models
    truth = plant(corpus.images, planted, context.workdir / "planted", args.seed)
    data: dict = {"photos": len(corpus.images), "planted": len(truth)}
    rows = []
    for name in models.split(","):
        log(f"duplicates: indexing {corpus.origin} and {len(truth)} planted copies with the {name} model")
        folder = context.workdir / f"duplicates-{name}"
        model = model_for(name, context)
        with Index.open(folder, model=model, create=True, device=args.device,
                        batch_size=args.batch_size) as index:
            index.add(context.workdir / "planted", *corpus.images)
            curves = threshold_curves(index, truth)
        wall, _, _ = run_measured([sys.executable, "-m", "retrieval.cli", "duplicates", "--index",
                                   str(folder), "--json"], env=python_env())
        data[name] = {"curves": curves, "command_s": wall}
        for by, points in curves.items():
            best = max(points, key=lambda p: (2 * p["precision"] * p["recall"]
                                              / max(1e-9, p["precision"] + p["recall"])))
            setting = ", ".join(f"{k} {best[k]}" for k in ("threshold", "max_distance") if k in best)
            rows.append((name, by, setting, f"{best['precision']:.3f}", f"{best['recall']:.3f}",
                         f"{best['seconds']:.2f}"))
    log(f"duplicates: pair search over {vectors} synthetic vectors")
    data["synthetic"] = synthetic = pair_search(vectors, args.duplicates_dim, args.seed)
    commands = ", ".join(f"{name} {data[name]['command_s']:.1f} s" for name in models.split(","))
    return data, "\n".join([
        f"{len(truth)} planted copies (resized, JPEG q60, 90% crop, brightness +-10%, mirrored, byte copy) "
        f"among {corpus.origin}; the best setting (by F1) of each way, the whole curves in --json.", "",
        table(("model", "by", "best setting", "precision", "recall", "seconds"), rows), "",
        f"`retrieve duplicates --json` as a new process: {commands}. Pair search and grouping over "
        f"{synthetic['vectors']:,} random {synthetic['dim']}-d vectors with {synthetic['planted_pairs']:,} "
        f"planted near copies (cosine ~0.97): {synthetic['seconds']:.1f} s, "
        f"{synthetic['planted_recall']:.1%} of them found at {SYNTHETIC_THRESHOLD}."])
