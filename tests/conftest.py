"""Shared fixtures: tiny open_clip models written in local-dir form, and small corpora."""

from __future__ import annotations

import os

# No test may reach a model hub: fail fast instead of waiting on a network that is not there.
# Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that spin while they wait for work starve everything else on a busy 2-core
# machine: a tiny-model training run took 13 times as long with spinning threads as with
# sleeping ones while other processes ran. Set before torch loads libgomp; children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_model import CLASSES, caption_for, render_shape, train_tiny_clip, write_local_dir_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A seeded, untrained tiny CLIP: `local-dir:` spec. Fine wherever meaning is not tested."""
    return write_local_dir_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory) -> str:
    """A second tiny model with other weights, for model-mismatch tests."""
    return write_local_dir_model(tmp_path_factory.mktemp("other-model"), seed=1)


@pytest.fixture(scope="session")
def trained_clip() -> torch.nn.Module:
    """The tiny CLIP trained for seconds on coloured-shape renders and their captions (once a run)."""
    return train_tiny_clip(seed=0)


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, trained_clip) -> str:
    """`trained_clip` in local-dir form: its `local-dir:` spec."""
    return write_local_dir_model(tmp_path_factory.mktemp("trained-model"), trained_clip)


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> Path:
    """A small image with some structure, so different colours embed differently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    pixels[: size[1] // 2, : size[0] // 2] = (255 - colour[0], colour[1] // 2, 255 - colour[2])
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """Six images in two folders, a sidecar caption file, a Flickr captions file, a text corpus."""
    root = tmp_path / "photos"
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200),
               (200, 30, 200)]
    for number, colour in enumerate(colours):
        folder = root / ("beach" if number < 3 else "city")
        write_image(folder / f"img{number}.jpg", colour)
    (root / "beach" / "img0.txt").write_text("a red picture\nthe first image\n")
    (root / "captions.tsv").write_text(
        "img3.jpg#0\ta yellow picture\nimg3.jpg#1\tsomething sunny\nimg4.jpg#0\ta cyan picture\n")
    (root / "notes.txt").write_text("a note about cats\n\na note about dogs\n")
    return root


@pytest.fixture
def shape_folder(tmp_path) -> Path:
    """Held-out renders of every (colour, shape) class with a Flickr captions file."""
    return write_shape_folder(tmp_path / "shapes", seed=12345)


def write_shape_folder(root: Path, seed: int, per_class: int = 3) -> Path:
    """Renders of every (colour, shape) class, with a Flickr captions file."""
    root.mkdir()
    rng = np.random.default_rng(seed)
    lines = []
    for color, shape in CLASSES:
        for copy in range(per_class):
            name = f"{color}_{shape}_{copy}.png"
            render_shape(color, shape, rng).save(root / name)
            lines.append(f"{name}#0\t{caption_for(color, shape)}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root


def put_in_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """Lay the files of `folder` out in a Hugging Face hub cache as a download of `repo` would."""
    commit = hashlib.sha1(repo.encode()).hexdigest()
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / commit)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit)


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Offline mode off, and every connection refused; returns the addresses tried."""
    import socket

    import huggingface_hub

    tried: list = []

    def refuse(address, *args, **kwargs):
        tried.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tried


def run_cli_process(*args: str | Path, env: dict[str, str] | None = None
                    ) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -m retrieval.cli ARGS` in a new process: its result (stderr without the import
    times) and the names of the modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "retrieval.cli", *map(str, args)],
                            capture_output=True, text=True, timeout=600, env=env)
    imports = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    result.stderr = "".join(line + "\n" for line in result.stderr.splitlines()
                            if not line.startswith("import time:"))
    return result, {line.rsplit("|", 1)[1].strip() for line in imports[1:]}


def offline_env(tmp_path: Path) -> dict[str, str]:
    """A new process's environment on a machine with an empty Hugging Face cache and no way to
    the hub (its address refuses connections), offline mode not set."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": "http://127.0.0.1:9"}
