"""What tests share besides fixtures: files written for them (images, shape folders, a hub cache),
the command run in a new process, and an offline environment. Tiny models, sounds, clips and a
running server are in this package's other modules."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.storage.folder import writer_lock


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> Path:
    """A small image with some structure, so different colours embed differently."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    pixels[: size[1] // 2, : size[0] // 2] = (255 - colour[0], colour[1] // 2, 255 - colour[2])
    Image.fromarray(pixels).save(path)
    return path


def write_shape_folder(root: Path, seed: int, per_class: int = 3) -> Path:
    """Renders of every (colour, shape) class, with a Flickr captions file."""
    # Imported here, not above: support.tiny_model imports torch and open_clip (seconds), and
    # processes that only unpickle a helper of this package (support.vectors.ArraySource in
    # on-disk shard workers) need neither.
    from support.tiny_model import CLASSES, caption_for, render_shape

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


def held_lock(index_folder: str | Path):
    """The index folder's writer lock, held by this process as another writer would hold it."""
    return writer_lock(Path(index_folder))
