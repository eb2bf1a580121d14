"""The report's shape: Markdown tables, and the header saying where and when it was measured."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import open_clip
import torch

from .measure import REPO


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"


def machine_facts() -> dict[str, Any]:
    return {"timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "faiss": faiss.__version__,
            "faiss_omp_threads": faiss.omp_get_max_threads(), "open_clip": open_clip.__version__,
            "load_average_start": os.getloadavg(), "library_commit": library_commit()}


def library_commit() -> str:
    """The checkout's commit, marked `+changes` when retrieval/ differs from it."""
    def git(*command: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *command], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" +changes" if git("status", "--porcelain", "--", "retrieval") else "")


def load_average(values: Sequence[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values) + " (1 / 5 / 15 min)"


def render_header(meta: dict[str, Any]) -> str:
    return "\n".join([
        "# retrieval benchmark", "",
        f"- command: `{meta['command']}`",
        f"- time: {meta['timestamp']}",
        f"- machine: {meta['cpu_count']} CPUs, {meta['platform']}, Python {meta['python']}; "
        f"load average at start {load_average(meta['load_average_start'])}",
        f"- torch {meta['torch']} ({meta['torch_threads']} threads), faiss {meta['faiss']} "
        f"({meta['faiss_omp_threads']} OpenMP threads), open_clip {meta['open_clip']}",
        f"- retrieval at commit {meta['library_commit']}"])


def render_model(meta: dict[str, Any]) -> str:
    load = meta["model_load_s"]
    return (f"- model: {meta['model']} (`{meta['model_spec']}`), device {meta['device']}"
            + (f", `load_encoder` {load:.2f} s" if load is not None else ""))
