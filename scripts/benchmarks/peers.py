"""m. Side by side: this project, clip-retrieval and rclip on the same photos and model graph,
measured interleaved in one run, with the ratios between them.

Every figure is a whole process (interpreter start, imports and model load included) except the
warm query. Only ratios within one run mean anything on a shared machine: the rounds are
interleaved (and their order rotated) so that a slow spell falls on all three alike.
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from . import clip_retrieval, rclip
from .context import Context
from .data import QUERY, generated_captions, image_files, image_source, limited_view, write_synthetic_images
from .engine import Index, ModelSpec, load_encoder
from .images import measure_encode_only
from .measure import (
    K,
    Measured,
    descendants,
    free_port,
    interleaved,
    log,
    peak_rss_bytes,
    percentiles,
    pss_bytes,
    run_sampled,
    start_server,
    stop_server,
    time_each,
)
from .report import mib, table
from .serve import serve_index, timed_requests
from .weights import write_random_checkpoint, write_random_model

NAME = "peers"
TITLE = "m. Side by side: this project, clip-retrieval and rclip"
SUMMARY = ("(only with --peers) this project, clip-retrieval and rclip interleaved on the same\n"
           "photos and model graph: first index, images/s, memory, re-index, cold and warm queries")
NEEDS: set[str] = set()
OPT_IN = True
OURS = "this project"
GRAPHS = ("ViT-B-32", "ViT-B-32-256")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peers", action="store_true", help="run only the peers section: this project, "
                        "clip-retrieval (--clip-retrieval) and rclip (--rclip) side by side")
    parser.add_argument("--peers-images", type=int,
                        help="photos every tool indexes [default: 1000; 20 with --quick]")
    parser.add_argument("--peers-rounds", type=int,
                        help="interleaved rounds of each measurement [default: 2; 1 with --quick]")
    parser.add_argument("--peers-queries", type=int, default=50, help="warm text queries timed [default: 50]")
    parser.add_argument("--peers-graph", choices=GRAPHS, default=GRAPHS[0],
                        help="the open_clip graph this project and clip-retrieval run, with random weights; "
                        "rclip always runs its own, ViT-B-32-256 [default: ViT-B-32]")


@dataclass(frozen=True)
class Photos:
    folder: Path
    count: int
    query_image: Path
    origin: str


@dataclass(frozen=True)
class Failed:
    """A measurement that could not be made, and why."""

    reason: str


def attempt(measure: Callable[[], object]) -> object:
    try:
        return measure()
    except (RuntimeError, OSError, httpx.HTTPError) as error:
        lines = str(error).strip().splitlines()
        return Failed(lines[-1][:300] if lines else type(error).__name__)


def prepare_photos(args: argparse.Namespace, workdir: Path, count: int) -> Photos:
    """The first `count` photos of the photo folder, without captions (rclip and the
    clip-retrieval run here index images only), copied into a folder of their own."""
    folder = workdir / "peer-photos"
    source = image_source(args)
    if source is None:
        write_synthetic_images(folder, count, args.seed)
        origin = f"{count} synthetic 500x375 JPEGs"
    else:
        limited_view(Path(source), count, folder, captions=False)
        origin = f"the first {count} images of {source}"
    photos = image_files(folder)
    return Photos(folder, len(photos), photos[0].resolve(), origin)


class Ours:
    """This project through its command line, each step a new process."""

    name = OURS

    def __init__(self, spec: ModelSpec, photos: Photos, workdir: Path, args: argparse.Namespace) -> None:
        self.spec, self.photos, self.workdir, self.args = spec, photos, workdir, args
        self.index: Path | None = None
        self.version = "this checkout"

    def cli(self, *arguments: str) -> list[str]:
        return [sys.executable, "-m", "retrieval.cli", *arguments]

    def build(self, index: Path, *options: str) -> Measured:
        return run_sampled(self.cli("index", str(self.photos.folder), "--index", str(index),
                                    "--model", self.spec.name, "--device", "cpu",
                                    "--batch-size", str(self.args.batch_size), "--quiet", "--json", *options))

    def first_index(self, round_number: int) -> Measured:
        self.index = self.workdir / f"ours-index-{round_number}"
        return self.build(self.index)

    def reindex(self, round_number: int) -> Measured:
        return run_sampled(self.cli("index", "--index", str(self.index), "--quiet", "--json"))

    def later_index(self, round_number: int, int8: bool = False) -> Measured:
        """A new index of the same photos and model, whose towers the first index exported:
        what every build after a model's first one costs (no peer has a counterpart); with
        `int8`, encoded by the image tower's 8-bit twin (`--int8`)."""
        options = ["--int8"] if int8 else []
        return self.build(self.workdir / f"ours-later-{round_number}{'-int8' if int8 else ''}", *options)

    def cold_text(self, round_number: int) -> Measured:
        return run_sampled(self.cli(QUERY, "--index", str(self.index), "-k", str(K)))

    def cold_image(self, round_number: int) -> Measured:
        return run_sampled(self.cli("--image", str(self.photos.query_image), "--index", str(self.index),
                                    "-k", str(K)))

    def warm_text(self, queries: Sequence[str]) -> dict:
        """`Index.search` in this process (readonly, as the CLI opens it), and `retrieve serve`
        answering over loopback HTTP."""
        with Index.open(self.index, readonly=True) as reader:
            _, in_process = time_each(lambda query: reader.search(query, k=K), queries, warmup=5)
        server, base, _ = serve_index(self.index, "cpu")
        try:
            with httpx.Client(timeout=60) as client:
                timed_requests(client, f"{base}/api/search", queries[:5])
                http = timed_requests(client, f"{base}/api/search", queries)
        finally:
            stop_server(server)
        return {"in-process `Index.search`": percentiles(in_process),
                "HTTP (`retrieve serve`)": percentiles(http)}


class ClipRetrieval:
    """clip-retrieval 2.x: `inference` then `index` build; `back` serves."""

    name = "clip-retrieval"

    def __init__(self, executable: str, checkpoint: Path, photos: Photos, workdir: Path,
                 args: argparse.Namespace) -> None:
        self.executable, self.photos, self.workdir, self.args = executable, photos, workdir, args
        self.model = clip_retrieval.model_name(args.peers_graph, checkpoint)
        self.env = clip_retrieval.environment()
        self.index: Path | None = None
        self.version = version_of(Path(executable).parent / "python", "clip_retrieval") or "?"

    def first_index(self, round_number: int) -> Measured:
        embeddings = self.workdir / f"clip-retrieval-embeddings-{round_number}"
        self.index = self.workdir / f"clip-retrieval-index-{round_number}"
        workers = max(1, min(4, os.cpu_count() or 1))  # decoding processes, one a core
        inference = run_sampled(clip_retrieval.inference_command(
            self.executable, self.photos.folder, embeddings, self.model, self.args.batch_size, workers),
            env=self.env)
        indexing = run_sampled(clip_retrieval.index_command(self.executable, embeddings, self.index),
                               env=self.env)
        return Measured(inference.wall_s + indexing.wall_s, "",
                        max(inference.peak_rss_bytes, indexing.peak_rss_bytes),
                        max(inference.peak_tree_pss_bytes, indexing.peak_tree_pss_bytes))

    def reindex(self, round_number: int) -> Failed:
        return Failed("no incremental mode: a second run embeds every image again")

    def serve(self) -> tuple[subprocess.Popen, str, float]:
        port = free_port()
        process, started_s = start_server(
            clip_retrieval.back_command(self.executable, self.index, "photos", self.model, port),
            f"http://127.0.0.1:{port}/indices-list", "clip-retrieval back", timeout_s=600, env=self.env)
        return process, f"http://127.0.0.1:{port}/knn-service", started_s

    def ask(self, client: httpx.Client, url: str, **query: str) -> None:
        client.post(url, json={**query, "modality": "image", "num_images": K,
                               "indice_name": "photos"}).raise_for_status()

    def cold(self, **query: str) -> Measured:
        """From starting the back end to its first answer, with the back end's memory then."""
        started = time.perf_counter()
        process, url, _ = self.serve()
        try:
            with httpx.Client(timeout=600) as client:
                self.ask(client, url, **query)
            wall = time.perf_counter() - started
            tree = [process.pid, *descendants(process.pid)]
            return Measured(wall, "", max(peak_rss_bytes(pid) for pid in tree),
                            sum(pss_bytes(pid) for pid in tree))
        finally:
            stop_server(process)

    def cold_text(self, round_number: int) -> Measured:
        return self.cold(text=QUERY)

    def cold_image(self, round_number: int) -> Measured:
        return self.cold(image=base64.b64encode(self.photos.query_image.read_bytes()).decode())

    def warm_text(self, queries: Sequence[str]) -> dict:
        process, url, _ = self.serve()
        try:
            with httpx.Client(timeout=600) as client:
                _, millis = time_each(lambda query: self.ask(client, url, text=query), queries, warmup=5)
        finally:
            stop_server(process)
        return {"HTTP (`clip-retrieval back`, POST /knn-service)": percentiles(millis)}


class Rclip:
    """rclip 3.x: one command that brings its index of the working folder up to date, then
    answers a query (`-n` skips the update)."""

    name = "rclip"

    def __init__(self, executable: str, models: Path, photos: Photos, workdir: Path,
                 args: argparse.Namespace) -> None:
        self.executable, self.models, self.photos = executable, models, photos
        self.workdir, self.args = workdir, args
        self.env: dict[str, str] = {}
        self.version = rclip.version(executable)

    def run(self, query: str, index: bool = True) -> Measured:
        command = rclip.query_command(self.executable, query, index)
        if index:
            command[1:1] = ["-b", str(self.args.batch_size)]
        return run_sampled(command, cwd=self.photos.folder, env=self.env)

    def first_index(self, round_number: int) -> Measured:
        datadir = rclip.fresh_datadir(self.models, self.workdir / f"rclip-data-{round_number}")
        self.env = rclip.environment(datadir)
        return self.run(QUERY)

    def reindex(self, round_number: int) -> Measured:
        return self.run(QUERY)

    def cold_text(self, round_number: int) -> Measured:
        return self.run(QUERY, index=False)

    def cold_image(self, round_number: int) -> Measured:
        return self.run(str(self.photos.query_image), index=False)

    def warm_text(self, queries: Sequence[str]) -> Failed:
        return Failed("no server or library mode: every query is a new process")


def version_of(python: Path, module: str) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    found = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def contenders(context: Context, photos: Photos) -> tuple[list, dict[str, str]]:
    """The three tools with their models in place, and why any of them cannot be measured."""
    args, workdir = context.args, context.workdir
    spec = ModelSpec.parse(write_random_model(args.peers_graph, workdir / "peer-model", args.seed))
    found: list = [Ours(spec, photos, workdir, args)]
    missing = {}
    executable = clip_retrieval.find(args)
    if executable is None:
        missing["clip-retrieval"] = (f"not installed; install it with {clip_retrieval.INSTALL}, "
                                     "then pass --clip-retrieval PATH/bin/clip-retrieval")
    else:
        checkpoint = write_random_checkpoint(args.peers_graph, workdir / "peer-checkpoint.pt", args.seed)
        found.append(ClipRetrieval(executable, checkpoint, photos, workdir, args))
    executable = rclip.find(args)
    if executable is None:
        missing["rclip"] = f"not installed; install it with {rclip.INSTALL}, then pass --rclip PATH/bin/rclip"
    else:
        models = (args.rclip_datadir or workdir / "rclip-models").absolute()
        reason = rclip.prepare_models(executable, models, args.seed)
        if reason:
            missing["rclip"] = reason
        else:
            found.append(Rclip(executable, models, photos, workdir, args))
    return found, missing


def summary(results: Sequence[object]) -> dict:
    """Median wall time and the largest memory over the rounds of one measurement."""
    done = [r for r in results if isinstance(r, Measured)]
    if not done:
        return {"failed": next((r.reason for r in results if isinstance(r, Failed)), "not measured")}
    return {"runs_s": [r.wall_s for r in done], "median_s": statistics.median(r.wall_s for r in done),
            "peak_rss_bytes": max(r.peak_rss_bytes for r in done),
            "peak_tree_pss_bytes": max(r.peak_tree_pss_bytes for r in done)}


def bare_rate(spec: ModelSpec, args: argparse.Namespace) -> float:
    """The model's bare torch encode-only rate (images/s), the model let go of afterwards. The run
    measures it before and after the rounds: this machine's speed drifts within minutes."""
    log(f"peers: bare encode-only rate of {args.peers_graph}")
    encoder = load_encoder(spec, "cpu", args.batch_size)
    rate = measure_encode_only(encoder, args.encode_batches, args.seed)["images_per_s"]
    del encoder
    gc.collect()
    return rate


def run(context: Context) -> tuple[dict, str]:
    args = context.args
    count = args.peers_images or (20 if args.quick else 1000)
    rounds = args.peers_rounds or (1 if args.quick else 2)
    photos = prepare_photos(args, context.workdir, count)
    log(f"peers: {photos.count} photos; writing the models ({args.peers_graph}, random weights)")
    tools, missing = contenders(context, photos)
    bare_before = bare_rate(tools[0].spec, args)
    measured: dict[str, dict[str, object]] = {tool.name: {} for tool in tools}
    for step in ("first_index", "reindex", "cold_text", "cold_image"):
        log(f"peers: {step.replace('_', ' ')}, {rounds} interleaved round(s)")
        runs = interleaved({tool.name: lambda r, t=tool: attempt(lambda: getattr(t, step)(r))  # noqa: B023
                            for tool in tools}, rounds)
        for tool in tools:
            measured[tool.name][step] = summary(runs[tool.name])
    # Twice each, alternating: one build of a minute swings by 15 % on this machine.
    log("peers: our later index (towers cached), with and without --int8, twice each")
    later_runs: dict[bool, list] = {False: [], True: []}
    for round_number in range(2):
        for int8 in (False, True):
            later_runs[int8].append(attempt(lambda: tools[0].later_index(round_number, int8)))  # noqa: B023
    later, later_int8 = summary(later_runs[False]), summary(later_runs[True])
    queries = generated_captions(args.peers_queries, args.seed)
    log(f"peers: {len(queries)} warm text queries each")
    warm = interleaved({tool.name: lambda r, t=tool: attempt(lambda: t.warm_text(queries))  # noqa: B023
                        for tool in tools}, 1)
    for tool in tools:
        result = warm[tool.name][0]
        measured[tool.name]["warm_text"] = {"failed": result.reason} if isinstance(result, Failed) else result
    bare_after = bare_rate(tools[0].spec, args)
    data = {"photos": photos.origin, "count": photos.count, "graph": args.peers_graph, "rounds": rounds,
            "batch": args.batch_size, "bare_encode_images_per_s": (bare_before + bare_after) / 2,
            "bare_before_and_after": [bare_before, bare_after],
            "versions": {tool.name: tool.version for tool in tools}, "not_measured": missing,
            "tools": measured, "ours_later_index": later, "ours_later_index_int8": later_int8}
    return data, render(data)


def lead(ours: float | None, theirs: float | None, higher_is_better: bool) -> str:
    """How far this project leads (>1) or trails (<1) a peer on one figure."""
    if not ours or not theirs:
        return "-"
    return f"{(ours / theirs if higher_is_better else theirs / ours):.2f}"


# (row label, measurement, figure, how it is shown, whether higher is better)
ROWS = (("first index, whole process", "first_index", "median_s", "s", False),
        ("images/s over the whole first index", "first_index", "images_per_s", "rate", True),
        ("peak memory while indexing, largest process", "first_index", "peak_rss_bytes", "MiB", False),
        ("peak memory while indexing, process tree (PSS)³", "first_index", "peak_tree_pss_bytes", "MiB",
         False),
        ("unchanged re-index, whole process", "reindex", "median_s", "s", False),
        ("cold text query, whole process¹", "cold_text", "median_s", "s", False),
        ("cold image query, whole process¹", "cold_image", "median_s", "s", False),
        ("cold image query, largest process", "cold_image", "peak_rss_bytes", "MiB", False))


def render(data: dict) -> str:
    tools, count, bare = data["tools"], data["count"], data["bare_encode_images_per_s"]
    names = list(tools)
    for figures in tools.values():
        if "median_s" in figures["first_index"]:
            figures["first_index"]["images_per_s"] = count / figures["first_index"]["median_s"]

    def cell(name: str, step: str, key: str, unit: str) -> str:
        figures = tools[name][step]
        if key not in figures:
            return f"- ({figures.get('failed', 'not measured')})"
        value = figures[key]
        return {"s": f"{value:.2f} s", "rate": f"{value:.1f}", "MiB": mib(value)}[unit]

    rows = [(label, *[cell(name, step, key, unit) for name in names],
             *[lead(tools[OURS][step].get(key), tools[name][step].get(key), higher) for name in names[1:]])
            for label, step, key, unit, higher in ROWS]
    warm = [(f"{name}: {how}", f"{p['p50_ms']:.1f} ms", f"{p['p95_ms']:.1f} ms")
            if isinstance(p, dict) else (f"{name}", f"- ({p})", "-")
            for name in names for how, p in tools[name]["warm_text"].items()]
    same_graph = [name for name in names if name != "rclip" and "images_per_s" in tools[name]["first_index"]]
    ceiling = [f"{name}'s whole first index reaches "
               f"**{tools[name]['first_index']['images_per_s'] / bare:.2f}** of it" for name in same_graph]
    for key, how in (("ours_later_index", ""), ("ours_later_index_int8", ", with `--int8`")):
        later = data.get(key, {})
        if "median_s" in later:
            ceiling.append(f"{OURS}'s later index of the same model (towers cached{how}) "
                           f"**{count / later['median_s'] / bare:.2f}** (median of "
                           f"{' and '.join(f'{s:.1f}' for s in later['runs_s'])} s, "
                           f"{mib(later['peak_rss_bytes'])} at its peak)")
    lines = [
        f"Photos: {data['photos']} (no captions); batch {data['batch']}; this project and "
        f"clip-retrieval run the {data['graph']} graph with random weights, rclip its own ViT-B-32-256 "
        f"graph (the only one it runs); {data['rounds']} interleaved round(s), medians.", "",
        table(("figure", *[f"{name} ({data['versions'][name]})" for name in names],
               *[f"our lead over {name}²" for name in names[1:]]), rows), "",
        table(("warm text query", "p50", "p95"), warm), "",
        f"Bare {data['graph']} encode-only rate in the same run (`encode_image_tensors`, batch "
        f"{data['batch']}, torch): {bare:.1f} images/s, the mean of "
        f"{' before and '.join(f'{rate:.1f}' for rate in data['bare_before_and_after'])} after the rounds"
        + ("; against it, " + ", ".join(ceiling) if ceiling else "") + ".", "",
        "¹ This project and rclip: a new process answering one query (rclip with `-n`, skipping its "
        "index update). clip-retrieval has no command-line search: its back end started, to its "
        "first answer (which carries base64 thumbnails, its default).",
        "² Above 1: this project is ahead by that factor (less time or memory, more images/s); "
        "below 1: behind.",
        "³ Summed over the process and its children at the same moment, each shared page split among "
        "its sharers: clip-retrieval decodes in worker processes, which the largest process leaves out.",
    ]
    lines += [f"\n{name} was not measured: {reason}." for name, reason in data["not_measured"].items()]
    return "\n".join(lines)
