"""k. An unchanged re-index as a whole process (`python -m retrieval.cli index`), beside rclip's
re-run over the same unchanged folder when rclip is installed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from . import rclip
from .context import Context, tiny_model
from .data import QUERY, Corpus
from .measure import log, run_figures, run_measured, timed
from .report import mib, table

NAME = "noop"
TITLE = "k. An unchanged re-index, whole process, beside rclip"
SUMMARY = ("an unchanged re-index as a whole process (`python -m retrieval.cli index`), beside\n"
           "rclip's re-run over the same unchanged folder when rclip is installed (--rclip)")
NEEDS = {"model", "corpus"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--noop-runs", type=int, default=5,
                        help="no-op re-index processes timed, ours and rclip's [default: 5]")
    parser.add_argument("--noop-files", type=int,
                        help="instead of the photo folder, N tiny distinct JPEGs (e.g. 100000): ours "
                        "built with the tiny test model, rclip's index filled through its own DB class")


# rclip's index of `folder` as its indexing leaves it (path, mtime, size and a vector per file),
# written through rclip's own `rclip.db.DB`, run by rclip's interpreter: encoding 100,000 files
# with its model first would take hours and is not what is measured.
FILL_RCLIP = """
import os, sys
from rclip import db
database, vector = db.DB(sys.argv[1]), bytes(4 * 512)
for entry in os.scandir(sys.argv[2]):
    stat = entry.stat()
    database.upsert_image(db.NewImage(filepath=entry.path, modified_at=stat.st_mtime, size=stat.st_size,
                                      vector=vector, hash=None), commit=False)
database.commit()
"""


def write_tiny_files(folder: Path, count: int, seed: int) -> None:
    """`count` distinct 8x8 JPEGs (a few hundred bytes each) in one folder."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(folder / f"{number:06d}.jpg")


def run_cells(figures: dict) -> tuple[str, str, str]:
    return f"{figures['median_s']:.2f}", f"{figures['min_s']:.2f}", mib(figures["peak_rss_bytes"])


def measure_rclip(corpus: Corpus, args: argparse.Namespace, workdir: Path, prefill: bool = False) -> dict:
    """rclip's first run over the corpus folder (it indexes it; or, with `prefill`, its index
    written by FILL_RCLIP), then its no-op re-runs; or why it could not be run."""
    executable = rclip.find(args)
    if executable is None:
        return {"not_measured": "no rclip executable (pass --rclip, e.g. a separate venv's bin/rclip)"}
    datadir = (args.rclip_datadir or workdir / "rclip-data").absolute()
    missing = rclip.prepare_models(executable, datadir, args.seed)
    if missing:
        return {"not_measured": missing}
    env = rclip.environment(datadir)
    command = rclip.query_command(executable, QUERY)
    if prefill:
        log("noop: rclip's index filled through rclip.db.DB")
        _, first_s = timed(lambda: subprocess.run(
            [str(Path(executable).parent / "python"), "-c", FILL_RCLIP, str(datadir / "db.sqlite3"),
             str(corpus.folder.absolute())], check=True))
    else:
        log("noop: rclip's first run (it indexes the folder)")
        first_s, _, _ = run_measured(command, cwd=corpus.folder, env=env)
    log(f"noop: {args.noop_runs} rclip re-runs")
    runs = [run_measured(command, cwd=corpus.folder, env=env) for _ in range(args.noop_runs)]
    return {"version": rclip.version(executable), "first_run_s": first_s, **run_figures(runs)}


def run(context: Context) -> tuple[dict, str]:
    """`python -m retrieval.cli index --index I` with nothing to do, as a whole process, beside
    rclip's re-run over the same unchanged folder (which checks the folder the same way, by
    size and mtime, and then answers a text query: rclip cannot be run without one)."""
    args, corpus, open_index = context.args, context.corpus, context.open_index
    index = context.workdir / "index-noop"
    if args.noop_files:
        folder = context.workdir / "noop-files"
        log(f"noop: writing {args.noop_files:,} tiny files")
        write_tiny_files(folder, args.noop_files, args.seed)
        corpus = Corpus(folder, [], [], f"{args.noop_files:,} tiny JPEGs")
        tiny = Context(args, context.workdir, tiny_model(context.workdir / "noop-tiny-model", args.seed))
        open_index = tiny.open_index  # the no-op run never loads the model: any model will do
    log(f"noop: building an index of {corpus.origin}")
    with open_index(index) as writer:
        writer.add(corpus.folder)
    command = [sys.executable, "-m", "retrieval.cli", "index", "--index", str(index), "--quiet", "--json"]
    log(f"noop: {args.noop_runs} unchanged re-index processes")
    ours = [run_measured(command) for _ in range(args.noop_runs)]
    files = json.loads(ours[0][1])["unchanged"]
    data = {"files": files, "retrieval": run_figures(ours),
            "rclip": measure_rclip(corpus, args, context.workdir, prefill=bool(args.noop_files))}
    rows = [("retrieval: `python -m retrieval.cli index --index I` (bare: the folders indexed before)",
             *run_cells(data["retrieval"]))]
    measured = data["rclip"]
    if "runs" in measured:
        first = ("index written through rclip.db.DB" if args.noop_files else "first run, which indexed it")
        rows.append((f"rclip {measured['version']}: `rclip -f \"{QUERY}\"` in the folder ({first}: "
                     f"{measured['first_run_s']:.1f} s)", *run_cells(measured)))
        ratio = f"rclip's median over ours: **{measured['median_s'] / data['retrieval']['median_s']:.1f}x**."
    else:
        ratio = f"rclip was not measured: {measured['not_measured']}."
    return data, "\n".join([
        f"{files:,} files unchanged ({corpus.origin}); each figure is a whole new process, "
        "interpreter start and imports included.", "",
        table(("no-op re-run", "median s", "min s", "peak RSS"), rows), "", ratio])
