"""k. An unchanged re-index as a whole process (`python -m retrieval.cli index`), beside rclip's
re-run over the same unchanged folder when rclip is installed."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import rclip
from .context import Context
from .data import QUERY, Corpus
from .measure import log, run_figures, run_measured
from .report import mib, table

NAME = "noop"
TITLE = "k. An unchanged re-index, whole process, beside rclip"
SUMMARY = ("an unchanged re-index as a whole process (`python -m retrieval.cli index`), beside\n"
           "rclip's re-run over the same unchanged folder when rclip is installed (--rclip)")
NEEDS = {"model", "corpus"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--noop-runs", type=int, default=5,
                        help="no-op re-index processes timed, ours and rclip's [default: 5]")


def run_cells(figures: dict) -> tuple[str, str, str]:
    return f"{figures['median_s']:.2f}", f"{figures['min_s']:.2f}", mib(figures["peak_rss_bytes"])


def measure_rclip(corpus: Corpus, args: argparse.Namespace, workdir: Path) -> dict:
    """rclip's first run over the corpus folder (it indexes it), then its no-op re-runs; or why
    it could not be run."""
    executable = rclip.find(args)
    if executable is None:
        return {"not_measured": "no rclip executable (pass --rclip, e.g. a separate venv's bin/rclip)"}
    datadir = (args.rclip_datadir or workdir / "rclip-data").absolute()
    missing = rclip.prepare_models(executable, datadir, args.seed)
    if missing:
        return {"not_measured": missing}
    env = rclip.environment(datadir)
    command = rclip.query_command(executable, QUERY)
    log("noop: rclip's first run (it indexes the folder)")
    first_s, _, _ = run_measured(command, cwd=corpus.folder, env=env)
    log(f"noop: {args.noop_runs} rclip re-runs")
    runs = [run_measured(command, cwd=corpus.folder, env=env) for _ in range(args.noop_runs)]
    return {"version": rclip.version(executable), "first_run_s": first_s, **run_figures(runs)}


def run(context: Context) -> tuple[dict, str]:
    """`python -m retrieval.cli index --index I` with nothing to do, as a whole process, beside
    rclip's re-run over the same unchanged folder (which checks the folder the same way, by
    size and mtime, and then answers a text query: rclip cannot be run without one)."""
    args, corpus = context.args, context.corpus
    index = context.workdir / "index-noop"
    log(f"noop: building an index of {corpus.origin}")
    with context.open_index(index) as writer:
        writer.add(corpus.folder)
    command = [sys.executable, "-m", "retrieval.cli", "index", "--index", str(index), "--quiet", "--json"]
    log(f"noop: {args.noop_runs} unchanged re-index processes")
    ours = [run_measured(command) for _ in range(args.noop_runs)]
    files = json.loads(ours[0][1])["unchanged"]
    data = {"files": files, "retrieval": run_figures(ours),
            "rclip": measure_rclip(corpus, args, context.workdir)}
    rows = [("retrieval: `python -m retrieval.cli index --index I` (bare: the folders indexed before)",
             *run_cells(data["retrieval"]))]
    measured = data["rclip"]
    if "runs" in measured:
        rows.append((f"rclip {measured['version']}: `rclip -f \"{QUERY}\"` in the folder (first run, "
                     f"which indexed it: {measured['first_run_s']:.1f} s)", *run_cells(measured)))
        ratio = f"rclip's median over ours: **{measured['median_s'] / data['retrieval']['median_s']:.1f}x**."
    else:
        ratio = f"rclip was not measured: {measured['not_measured']}."
    return data, "\n".join([
        f"{files:,} files unchanged ({corpus.origin}); each figure is a whole new process, "
        "interpreter start and imports included.", "",
        table(("no-op re-run", "median s", "min s", "peak RSS"), rows), "", ratio])
