"""clip-retrieval (https://github.com/rom1504/clip-retrieval), run as a peer: where it is, the
environment that keeps it offline, and its three steps (`inference`, `index`, `back`).

It pins old dependencies, so it lives in a virtualenv of its own. It loads any open_clip model
as `open_clip:NAME/CHECKPOINT`: the benchmark hands it a state-dict file of seeded random
weights (speed does not depend on them) as an absolute path, so its model name reads
`open_clip:ViT-B-32//tmp/.../model.pt`. Its optional extras that would reach the Hugging Face
Hub (the multilingual text model, the aesthetic embeddings) are switched off, and the Hub and
wandb are told to stay offline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

INSTALL = ("python3 -m venv /path/to/venv && /path/to/venv/bin/pip install clip-retrieval==2.45.0 "
           "'setuptools<81'  (its `clip` dependency imports pkg_resources, which setuptools 81 removed; "
           "torch and torchvision as this project's own: 2.14.1 and 0.29.1)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clip-retrieval", help="the clip-retrieval executable to compare with "
                        "(installed in a venv of its own) [default: clip-retrieval on PATH, else not "
                        "measured]")


def find(args: argparse.Namespace) -> str | None:
    return args.clip_retrieval or shutil.which("clip-retrieval")


def environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def model_name(graph: str, checkpoint: Path) -> str:
    return f"open_clip:{graph}/{checkpoint.absolute()}"


def inference_command(executable: str, photos: Path, embeddings: Path, model: str, batch: int,
                      workers: int) -> list[str]:
    """Embed every image of `photos` (no texts) into `embeddings`."""
    return [executable, "inference", "--input_dataset", str(photos), "--output_folder", str(embeddings),
            "--input_format", "files", "--enable_text", "False", "--batch_size", str(batch),
            "--num_prepro_workers", str(workers), "--clip_model", model, "--enable_wandb", "False"]


def index_command(executable: str, embeddings: Path, index: Path) -> list[str]:
    """Build the FAISS index and the metadata store from the embeddings (autofaiss)."""
    return [executable, "index", "--embeddings_folder", str(embeddings), "--index_folder", str(index)]


def back_command(executable: str, index: Path, name: str, model: str, port: int) -> list[str]:
    """The search back end over `index` (answering POST /knn-service), offline."""
    indices = index.with_name(index.name + "-indices.json")
    indices.write_text(json.dumps({name: str(index)}))
    return [executable, "back", "--indices_paths", str(indices), "--port", str(port), "--clip_model", model,
            "--enable_mclip_option", "False", "--use_jit", "False",
            "--provide_aesthetic_embeddings", "False"]
