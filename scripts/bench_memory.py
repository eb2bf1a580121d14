"""Rough measurements for issue 18 (memory, cold and warm queries, build against the encode-only
ceiling), one function each, so the lead can rerun them on a quiet machine and fold them into
the benchmark package.

Every figure is printed with the load average at the time: on a shared machine a figure
taken under load is an upper bound on time, not the product's speed. Peak memory does not
depend on load. Usage (the worktree first on the path; a `local-dir:` ViT-B-32 with random
weights, e.g. as scripts/benchmark.py writes one):

    PYTHONPATH=$PWD python scripts/bench_memory.py build  PHOTOS MODEL WORKDIR
    PYTHONPATH=$PWD python scripts/bench_memory.py cold   INDEX QUERY_IMAGE [REPEATS]
    PYTHONPATH=$PWD python scripts/bench_memory.py warm   INDEX CAPTIONS_TSV [COUNT] [torch]
    PYTHONPATH=$PWD python scripts/bench_memory.py ceiling INDEX PHOTOS [BATCH...] [spinning] [torch]
    PYTHONPATH=$PWD python scripts/bench_memory.py captions INDEX CAPTIONS_TSV
    PYTHONPATH=$PWD python scripts/bench_memory.py serve  INDEX IMAGE
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

CLI = [sys.executable, "-m", "retrieval.cli"]


def load() -> str:
    return "load " + " ".join(f"{value:.2f}" for value in os.getloadavg())


def timed_process(command: list[str]) -> dict:
    """Wall seconds, CPU seconds and peak RSS (MB, the largest of the process and its
    children, as GNU time reports it) of one process."""
    before = os.times()
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_mb": round(peak_kb / 1024),
            "stdout": done.stdout.strip().splitlines()[-1:]}


# -- 1. memory and rate of a whole build --------------------------------------------------------

def build(photos: str, model: str, workdir: str) -> None:
    """`retrieve index` on PHOTOS three ways: a model whose towers are not cached yet (export
    in a child process), the same model again into a new index (towers found in the cache),
    and an unchanged re-index. Each: wall, CPU, peak RSS and images/s."""
    work = Path(workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env_cache = work / "cache"
    os.environ["RETRIEVAL_CACHE"] = str(env_cache)
    count = sum(1 for p in Path(photos).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for label, index in (("first build (exports the towers)", "first"),
                         ("build, towers cached", "second"), ("unchanged re-index", "second")):
        print(load())
        figures = timed_process([*CLI, "index", photos, "--index", str(work / index), "--model", model])
        print(f"{label}: {figures['wall_s']} s wall, {figures['cpu_s']} s CPU, peak {figures['peak_mb']} MB, "
              f"{count / figures['wall_s']:.2f} img/s whole process; {load()}")


# -- 2. cold queries ----------------------------------------------------------------------------

def cold(index: str, image: str, repeats: str = "5") -> None:
    """Whole `retrieve` processes: a text query and an image query, alternated; median wall
    and CPU seconds and peak RSS of each."""
    runs: dict[str, list[dict]] = {"text": [], "image": []}
    print(load())
    for _ in range(int(repeats)):
        runs["text"].append(timed_process([*CLI, "a dog running on the grass", "--index", index, "-k", "10"]))
        runs["image"].append(timed_process([*CLI, "--image", image, "--index", index, "-k", "10"]))
    for kind, figures in runs.items():
        print(f"cold {kind} query: median {statistics.median(f['wall_s'] for f in figures):.2f} s wall, "
              f"{statistics.median(f['cpu_s'] for f in figures):.2f} s CPU, "
              f"peak {max(f['peak_mb'] for f in figures)} MB ({repeats} runs)")
    print(load())


# -- 4. warm text queries -----------------------------------------------------------------------

def warm(index: str, captions_tsv: str, count: str = "200", *options: str) -> None:
    """p50/p95 of a warm text query (encode + search + hydrate) through `Index.search`, with
    the ONNX text tower (pre-packed and quick sessions), and the encode alone, in wall and in
    CPU milliseconds (the latter hardly depends on the machine's load); with `torch` also the
    torch model's encode."""
    import numpy as np

    from retrieval import Index
    from retrieval.encoders.onnx_towers import load_text_tower

    texts = [line.split("\t", 1)[1].strip() for line in Path(captions_tsv).read_text().splitlines()
             if "\t" in line]
    picks = [texts[i] for i in np.random.default_rng(0).choice(len(texts), int(count))]
    print(load())
    for label, one_shot in (("ONNX text tower, pre-packed session", False),
                            ("ONNX text tower, quick session", True)):
        with Index.open(index, readonly=True, one_shot=one_shot) as opened:
            _report_warm(label, opened, picks, opened.text_encoder)
    with Index.open(index, readonly=True) as opened:
        both_cores = load_text_tower(opened.path, opened.spec.identity, for_build=True)
        _report_warm("ONNX text tower, a thread per core, not spinning", opened, picks, both_cores)
        if "torch" in options:
            import torch

            _report_warm(f"torch model, {torch.get_num_threads()} threads", opened, picks, opened.encoder)
    print(load())


def _report_warm(label: str, index, picks: list[str], encoder) -> None:
    for text in picks[:5]:  # warm-up
        index.search(text, k=10)
        encoder.encode_texts([text])
    line = f"{label}: encode {_latency(lambda text: encoder.encode_texts([text]), picks)}"
    if encoder is index.text_encoder:  # search() encodes with it
        whole = _latency(lambda text: index.search(text, k=10), picks)
        line += f"; search (encode + search + hydrate) {whole}"
    print(line)


def _latency(run, picks: list[str]) -> str:
    wall, cpu = [], []
    for text in picks:
        started, cpu_started = time.perf_counter(), time.process_time()
        run(text)
        wall.append(1000 * (time.perf_counter() - started))
        cpu.append(1000 * (time.process_time() - cpu_started))
    return (f"p50 {statistics.median(wall):.1f} ms (CPU {statistics.median(cpu):.1f} ms), "
            f"p95 {statistics.quantiles(wall, n=20)[-1]:.1f} ms")


# -- 3. the encode-only ceiling -----------------------------------------------------------------

def ceiling(index: str, photos: str, *options: str) -> None:
    """Bare image encode rate of the index's ONNX image tower on pre-decoded pixels of PHOTOS,
    per batch size given (default 32), images per wall second and CPU seconds per image; with
    `spinning` also with ONNX Runtime's spinning threads, with `torch` also the torch model.
    Compare CPU seconds per image with a whole build's (GNU time's user + system over images):
    unlike wall time, it hardly depends on what else the machine runs."""
    import numpy as np

    from retrieval import Index
    from retrieval.encoders.onnx_towers import OnnxImageEncoder, open_session
    from retrieval.media.images import load_image

    sizes = [int(o) for o in options if o.isdigit()] or [32]
    with Index.open(index, readonly=True) as opened:
        tower = opened.image_encoder
        assert isinstance(tower, OnnxImageEncoder), "no ONNX image tower in this index"
        paths = sorted(p for p in Path(photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        pixels = np.stack([tower.preprocess(load_image(p, min_side=2 * tower.input_side))
                           for p in paths[:max(sizes) * 2]])
        session_path = opened.path / "onnx" / "image.onnx"
        for spinning in (False, True) if "spinning" in options else (False,):
            session = open_session(session_path, 0, spinning=spinning)
            for size in sizes:
                rate, cpu = _rate(lambda batch, run=session.run: run(None, {"pixels": batch}), pixels, size)
                print(f"ONNX image tower, batch {size}, spinning {spinning}: {rate:.2f} img/s, "
                      f"{cpu:.3f} CPU-s/img; {load()}")
        if "torch" in options:
            import torch

            encoder = opened.encoder
            for size in sizes:
                rate, cpu = _rate(lambda batch: encoder.encode_image_tensors(torch.from_numpy(batch)),
                                  pixels, size)
                print(f"torch, batch {size}, {torch.get_num_threads()} threads: {rate:.2f} img/s, "
                      f"{cpu:.3f} CPU-s/img; {load()}")


def _rate(encode, pixels, size: int) -> tuple[float, float]:
    """Images per wall second, and CPU seconds (all threads) per image."""
    encode(pixels[:size])  # warm-up
    started, cpu_started = time.perf_counter(), time.process_time()
    done = 0
    for start in range(0, len(pixels) - size + 1, size):
        encode(pixels[start:start + size])
        done += size
    return done / (time.perf_counter() - started), (time.process_time() - cpu_started) / done


# -- 3b. the caption phase against bare text encoding -------------------------------------------

def captions(index: str, captions_tsv: str) -> None:
    """Bare text encoding of the captions in CAPTIONS_TSV (the build's text tower, batches of
    32), then a whole `retrieve index --captions` process adding them to INDEX, whose images
    are indexed already: captions/s of each, and their ratio."""
    from retrieval import Index
    from retrieval.encoders.onnx_towers import load_text_tower

    texts = [line.split("\t", 1)[1].strip() for line in Path(captions_tsv).read_text().splitlines()
             if "\t" in line]
    with Index.open(index, readonly=True) as opened:
        tower = load_text_tower(opened.path, opened.spec.identity, for_build=True)
        assert tower is not None, "no ONNX text tower in this index"
        print(load())
        started = time.perf_counter()
        for start in range(0, len(texts), 32):
            tower.encode_texts(texts[start:start + 32])
        bare = len(texts) / (time.perf_counter() - started)
    print(f"bare text encoding: {bare:.1f} captions/s; {load()}")
    figures = timed_process([*CLI, "index", "--index", index, "--captions", captions_tsv])
    whole = len(texts) / figures["wall_s"]
    print(f"whole `retrieve index --captions` process: {whole:.1f} captions/s ({figures['wall_s']} s, "
          f"peak {figures['peak_mb']} MB), {whole / bare:.2f} of bare; {load()}")


# -- the server's resident memory ---------------------------------------------------------------

def serve(index: str, image: str) -> None:
    """Resident memory (VmRSS, VmHWM) of `retrieve serve` on INDEX: started, after a text
    query, after an image query (IMAGE uploaded)."""
    import socket

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*CLI, "serve", "--index", index, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{base}/api/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        print(f"started: {_memory(server.pid)}; {load()}")
        query = urllib.parse.quote("a dog running on the grass")
        urllib.request.urlopen(f"{base}/api/search?q={query}&k=10", timeout=120).read()
        print(f"after a text query: {_memory(server.pid)}; {load()}")
        with open(image, "rb") as upload:
            httpx.post(f"{base}/api/search", files={"image": upload}, data={"k": "10"},
                       timeout=120).raise_for_status()
        print(f"after an image query: {_memory(server.pid)}; {load()}")
    finally:
        server.terminate()
        server.wait()


def _memory(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M))
    return ", ".join(f"{name} {int(kb) // 1024} MB" for name, kb in fields.items())


if __name__ == "__main__":
    commands = {"build": build, "cold": cold, "warm": warm, "ceiling": ceiling, "captions": captions,
                "serve": serve}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(__doc__)
    commands[sys.argv[1]](*sys.argv[2:])
