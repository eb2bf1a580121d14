"""l. Where Ray pays off: whole `retrieve index` processes over the first N images, on the
local engine and on Ray."""

from __future__ import annotations

import argparse
import json
import sys

from .context import Context, model_args
from .data import limited_view
from .measure import log, run_measured
from .report import table

NAME = "breakeven"
TITLE = "l. Where Ray pays off: whole builds by corpus size"
SUMMARY = ("(only with --only breakeven) whole `retrieve index` processes over the first N\n"
           "images on the local engine and on Ray: the corpus size from which Ray pays off")
NEEDS = {"model", "corpus"}
OPT_IN = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ray-sizes", default="50,100,200,500,1000",
                        help="corpus sizes (images) of the breakeven section, comma-separated")


def run(context: Context) -> tuple[dict, str]:
    """Whole `python -m retrieval.cli index` processes over the first N images of the corpus
    (with their captions), on the local engine and on a Ray started by the process: from what
    corpus size Ray's start-up and overhead are paid back on this machine, if at all."""
    args, corpus, workdir = context.args, context.corpus, context.workdir
    sizes = [size for size in args.ray_sizes if size <= len(corpus.images)] or [len(corpus.images)]
    runs = []
    for size in sizes:
        view = limited_view(corpus.folder, size, workdir / f"breakeven-{size}")
        for engine in ("local", "ray"):
            log(f"breakeven: {size} images on {engine}")
            wall, output, rss = run_measured(
                [sys.executable, "-m", "retrieval.cli", "index", str(view),
                 "--index", str(workdir / f"index-breakeven-{engine}-{size}"), *model_args(context.spec),
                 "--engine", engine, "--device", args.device, "--batch-size", str(args.batch_size),
                 "--quiet", "--json"])
            report = json.loads(output)
            runs.append({"images": size, "engine": engine, "wall_s": wall, "peak_rss_bytes": rss,
                         "images_encoded": report["images_encoded"],
                         "texts_encoded": report["texts_encoded"]})
    walls = {(run["images"], run["engine"]): run["wall_s"] for run in runs}
    even = next((size for size in sizes if walls[size, "ray"] <= walls[size, "local"]), None)
    data = {"runs": runs, "break_even_images": even}
    rows = [(f"{size:,}", f"{walls[size, 'local']:.1f}", f"{walls[size, 'ray']:.1f}",
             f"{walls[size, 'ray'] / walls[size, 'local']:.2f}") for size in sizes]
    verdict = (f"Ray is as fast as the local engine from **{even:,} images** on."
               if even else f"Ray is slower at every size measured (up to {sizes[-1]:,} images).")
    return data, "\n".join([
        f"`python -m retrieval.cli index FIRST_N_IMAGES --engine local|ray` over {corpus.origin}, "
        "each a whole new process (Ray started by it, one embedding actor per two cores, no GPU).", "",
        table(("images", "local s", "ray s", "ray / local"), rows), "", verdict])
