"""rclip (https://github.com/yurijmikhalevich/rclip), run as a peer: where it is, its models put
where it looks for them, and its commands.

rclip runs one model, the ViT-B-32-256 graph as ONNX, which it downloads from the Hugging Face
Hub on its first run. Offline that fails, so the graph is exported into its data folder
(RCLIP_DATADIR) from open_clip with seeded random weights (speed does not depend on them), with
open_clip's tokenizer vocabulary beside it. The export needs the `onnx` package, here or in
rclip's own environment.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import torch

from .measure import log
from .weights import random_model

GRAPH = "ViT-B-32-256"  # the open_clip graph rclip 3.x runs, as ONNX
MODEL_DIR = "ViT-B-32-256-datacomp_s34b_b86k"  # where in its data folder rclip looks for it
VOCAB = Path("tokenizer") / "bpe_simple_vocab_16e6.txt.gz"
INSTALL = "python3 -m venv /path/to/venv && /path/to/venv/bin/pip install rclip==3.3.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rclip", help="the rclip executable to compare with (e.g. installed in a "
                        "venv of its own) [default: rclip on PATH, else not measured]")
    parser.add_argument("--rclip-datadir", type=Path, help="RCLIP_DATADIR holding rclip's models; "
                        "they are exported there (random weights) if missing [default: a temp folder]")


def find(args: argparse.Namespace) -> str | None:
    return args.rclip or shutil.which("rclip")


def version(rclip: str) -> str:
    words = subprocess.run([rclip, "--version"], capture_output=True, text=True).stdout.split()
    return words[-1] if words else "?"


def environment(datadir: Path) -> dict[str, str]:
    """rclip's environment: its data folder (models and its database), and the Hub offline."""
    return {**os.environ, "RCLIP_DATADIR": str(datadir), "HF_HUB_OFFLINE": "1"}


def query_command(rclip: str, query: str, index: bool = True) -> list[str]:
    """rclip answering `query` (text, or an image path starting with ./ or /) with file paths
    only; it first brings its index of the working folder up to date unless `index` is False."""
    return [rclip, "-f", *([] if index else ["-n"]), query]


def fresh_datadir(models: Path, datadir: Path) -> Path:
    """A data folder without a database, sharing the models exported into `models`."""
    datadir.mkdir(parents=True)
    (datadir / MODEL_DIR).symlink_to(models / MODEL_DIR, target_is_directory=True)
    (datadir / VOCAB.parent).symlink_to(models / VOCAB.parent, target_is_directory=True)
    return datadir


def prepare_models(rclip: str, datadir: Path, seed: int) -> str | None:
    """Put rclip's models (ONNX graphs and tokenizer vocabulary) into `datadir`, where rclip
    looks for them; None when they are there, else why they cannot be."""
    models = datadir / MODEL_DIR
    vocab = datadir / VOCAB
    if (models / "visual.onnx").is_file() and (models / "textual.onnx").is_file() and vocab.is_file():
        return None
    try:
        import onnx  # noqa: F401  # what torch.onnx.export writes with
    except ImportError:
        found = subprocess.run([str(Path(rclip).parent / "python"), "-c", "import onnx, os; "
                                "print(os.path.dirname(os.path.dirname(onnx.__file__)))"],
                               capture_output=True, text=True)
        if found.returncode:
            return (f"its models are not in {datadir} (rclip downloads them from the Hugging Face Hub "
                    "on its first run; offline it cannot run), and exporting them needs the onnx "
                    "package, found neither here nor beside rclip")
        sys.path.append(found.stdout.strip())  # appended: this environment's packages come first
    log(f"rclip: exporting its {GRAPH} graph (random weights) as ONNX into {datadir}")
    model = random_model(GRAPH, seed).eval()
    models.mkdir(parents=True, exist_ok=True)
    towers = {"visual.onnx": ("encode_image", torch.zeros(1, 3, 256, 256)),
              "textual.onnx": ("encode_text", torch.zeros(1, 77, dtype=torch.long))}
    for name, (encode, example) in towers.items():
        # With gradients on, attention is traced op by op: its fused kernel has no ONNX form.
        torch.onnx.export(Tower(model, encode), (example,), str(models / name),
                          input_names=["input"], output_names=["output"], dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    vocab.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(open_clip.__file__).parent / vocab.name, vocab)
    return None


class Tower(torch.nn.Module):
    """One of a CLIP model's encoders (`encode_image`, `encode_text`) as a module of its own,
    for the ONNX export."""

    def __init__(self, model: torch.nn.Module, encode: str) -> None:
        super().__init__()
        self.model, self.encode = model, encode

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.encode)(inputs)


