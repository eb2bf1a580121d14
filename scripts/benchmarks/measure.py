"""How the benchmark measures: wall time, percentiles, whole child processes (wall time and
peak RSS), HTTP servers started as users start them, and interleaved rounds."""

from __future__ import annotations

import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np

T = TypeVar("T")
R = TypeVar("R")

K = 10  # results per search, and the k of recall@k
SCRIPTS = Path(__file__).resolve().parent.parent
REPO = SCRIPTS.parent


def log(message: str) -> None:
    """Progress on stderr, so stdout holds nothing but the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(function: Callable[[], T]) -> tuple[T, float]:
    """(result, wall seconds) of one call."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def time_each(function: Callable[[T], R], items: Sequence[T], warmup: int = 3
              ) -> tuple[list[R], list[float]]:
    """Call `function` on each item after `warmup` untimed calls; (results, milliseconds)."""
    for item in items[:warmup]:
        function(item)
    results, millis = [], []
    for item in items:
        start = time.perf_counter()
        results.append(function(item))
        millis.append((time.perf_counter() - start) * 1000)
    return results, millis


def percentiles(millis: Sequence[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(millis, 50)), "p95_ms": float(np.percentile(millis, 95)),
            "p99_ms": float(np.percentile(millis, 99)), "mean_ms": float(np.mean(millis))}


def recall_at_k(found: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, truth)]))


# Runs the command given as its arguments and prints its wall time and peak RSS (KiB) last on
# stderr. Measured from this small process: on Linux a child's ru_maxrss starts at the RSS of
# the process it was forked from, which here would be the benchmark with its models loaded.
MEASURE_CHILD = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[1:])
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      file=sys.stderr)
sys.exit(code)
"""


def run_measured(command: Sequence[str], cwd: Path | None = None, env: Mapping[str, str] | None = None
                 ) -> tuple[float, str, int]:
    """Run a command to its end: (wall seconds, stdout, peak RSS in bytes of that process)."""
    result = subprocess.run([sys.executable, "-c", MEASURE_CHILD, *command],
                            capture_output=True, text=True, cwd=cwd, env=env)
    *errors, measured = result.stderr.splitlines() or [""]
    if result.returncode:
        raise RuntimeError(f"{shlex.join(command)} exited {result.returncode}: "
                           + "\n".join(errors)[-2000:])
    wall, rss = measured.split()
    return float(wall), result.stdout, int(rss) * 1024  # Linux reports KiB


@dataclass(frozen=True)
class Measured:
    """One whole process run to its end."""

    wall_s: float
    stdout: str
    peak_rss_bytes: int  # the largest single process of its tree (ru_maxrss)
    peak_tree_pss_bytes: int  # the largest sum, over its whole tree at one moment, of shared-fair memory


def run_sampled(command: Sequence[str], cwd: Path | None = None, env: Mapping[str, str] | None = None,
                interval_s: float = 0.2) -> Measured:
    """`run_measured`, also sampling the memory of the command's whole process tree.

    A tool that decodes in worker processes holds memory in all of them, which the largest
    single process (ru_maxrss) leaves out; summing their RSS would count pages they share
    (the model, libraries) once per process. PSS charges each shared page to its sharers in
    equal parts, so the tree's summed PSS is the memory it really holds.
    """
    process = subprocess.Popen([sys.executable, "-c", MEASURE_CHILD, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(interval_s):
            # the measuring shim itself is left out: it is not the command's memory
            peak = max(peak, sum(pss_bytes(pid) for pid in descendants(process.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    stop.set()
    sampler.join()
    *errors, measured = stderr.splitlines() or [""]
    if process.returncode:
        raise RuntimeError(f"{shlex.join(command)} exited {process.returncode}: "
                           + "\n".join(errors)[-2000:])
    wall, rss = measured.split()
    return Measured(float(wall), stdout, int(rss) * 1024, peak)


def descendants(root: int) -> list[int]:
    """The processes below `root` (not `root` itself), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, frontier = [], [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found += below
        frontier += below
    return found


def pss_bytes(pid: int) -> int:
    """A process's proportional set size; 0 once it has ended."""
    return proc_figure(pid, "smaps_rollup", "Pss")


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory a running process has held; 0 once it has ended."""
    return proc_figure(pid, "status", "VmHWM")


def proc_figure(pid: int, name: str, field: str) -> int:
    """A size in bytes from a /proc/PID file's `field: N kB` line; 0 once the process has ended."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_figures(runs: Sequence[tuple[float, str, int]]) -> dict:
    """Median and best wall time and the largest peak RSS of several `run_measured` runs."""
    walls = [wall for wall, _, _ in runs]
    return {"runs": walls, "median_s": statistics.median(walls), "min_s": min(walls),
            "peak_rss_bytes": max(rss for _, _, rss in runs)}


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python that imports this checkout's `retrieval` and the
    benchmark's own modules (`python -m benchmarks.<probe>`), whatever its working folder."""
    path = os.pathsep.join(filter(None, [str(REPO), str(SCRIPTS), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(command: Sequence[str], health_url: str, what: str, timeout_s: float = 120,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None
                 ) -> tuple[subprocess.Popen, float]:
    """Start a server process; returns it and the seconds until `health_url` answered 200.

    Its output goes to a file, not a pipe: a server that logs every request would otherwise
    stall once the pipe is full."""
    output = tempfile.TemporaryFile()
    started = time.perf_counter()
    process = subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(health_url, timeout=1).status_code == 200:
                return process, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    process.wait()
    output.seek(0)
    raise RuntimeError(f"{what} did not start: {output.read().decode(errors='replace')[-2000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def interleaved(contenders: Mapping[str, Callable[[int], T]], rounds: int) -> dict[str, list[T]]:
    """Each contender's measurement, `rounds` times, one contender after another within a round
    and the order rotated between rounds, so a slow spell of a shared machine falls on all of
    them alike rather than on whichever ran last. Each call gets its round's number."""
    names = list(contenders)
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_number in range(rounds):
        shift = round_number % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            results[name].append(contenders[name](round_number))
    return results
