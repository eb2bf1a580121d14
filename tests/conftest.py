"""Shared fixtures: tiny open_clip models written in local-dir form, and small corpora."""

from __future__ import annotations

import os
import sys

# The run starts a hundred Python processes that import this package (the CLI, servers, export
# children); where PYTHONDONTWRITEBYTECODE is set each compiled it from source again. Let them
# cache it (__pycache__ is ignored by git).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# No test may reach a model hub: fail fast instead of waiting on a network that is not there.
# Set before anything imports huggingface_hub, which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OpenMP threads that spin while they wait for work starve everything else on a busy 2-core
# machine: a tiny-model training run took 13 times as long with spinning threads as with
# sleeping ones while other processes ran. Set before torch loads libgomp; children inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# xdist workers share the cores: each (and each process it starts) computes on its share of
# them, so two workers on two cores do not run four threads that wait on each other. That
# holds for the models trained once per run too: the tiny CLIP's training took 18 s and 18
# CPU-s on one thread, 25 s and 28 CPU-s on two (the layers are too small to split).
CORES = os.cpu_count() or 1
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, CORES // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402
from support import write_image, write_shape_folder  # noqa: E402

from retrieval.core.imports import exit_quickly  # noqa: E402

if TYPE_CHECKING:
    import torch

# Fixtures import torch and open_clip (5 s) where they make models: xdist's controller loads
# this file too, and workers start only once it has.

WORKERS_AT_MOST = 4


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Without `-n`, tests run on one pytest-xdist worker per core, at most WORKERS_AT_MOST,
    by work stealing (`--dist worksteal`): files start whole on one worker and an idle worker
    takes over the rest of a busy one's queue. Against a whole file to a worker (`loadfile`) the
    suite ended sooner (3 min 57 s against 4 min 54 s, 2 cores, same hour), though a stolen file
    builds its module fixture twice. Set here rather than in addopts so `-p no:xdist` still
    works; `-n 0` runs the tests in this process (as `--pdb` does)."""
    if hasattr(config, "workerinput") or not config.pluginmanager.hasplugin("xdist") \
            or config.option.numprocesses is not None:
        return
    config.option.numprocesses = "auto"
    config.option.maxprocesses = config.option.maxprocesses or WORKERS_AT_MOST
    if config.option.dist == "no" and not config.option.distload:
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of the tiny CLIP trained once per run (seconds of one core) go first, in their
    order: the workers start on the first and on the second half of the tests, so one of
    them trains it while the other has other work (where both used to reach a trained test
    at once and one sat waiting for the other's training). Once last, they ended the run:
    a worker out of tests took half of them over, trained tests and all, and waited."""
    items.sort(key=lambda item: "trained_clip" not in item.fixturenames)


def pytest_unconfigure(config: pytest.Config) -> None:
    """A worker's torch, models and indexes are left out of the interpreter's last garbage
    collections (see retrieval.core.imports.exit_quickly): the run ends a second or two sooner."""
    exit_quickly()


def _made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """Folder `name`, filled by `make` once per test run, however many xdist workers ask.

    Each worker's basetemp is a child of the run's own folder, so the first worker to ask
    builds it under a lock while the others wait, then reuse it. Without xdist it is
    the run's basetemp. A folder without its `done` mark (a worker died) is built again.
    """
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / f"made-once-{name}"
    with FileLock(f"{folder}.lock"):
        if not (folder / "done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (folder / "done").touch()
    return folder


@pytest.fixture(scope="session")
def made_once(tmp_path_factory) -> Callable[[str, Callable[[Path], None]], Path]:
    """`made_once(name, make)`: folder `name`, filled by `make` once per run for every xdist
    worker (see _made_once). For what tests only read, such as an index a module serves."""
    return lambda name, make: _made_once(tmp_path_factory, name, make)


def _model_made_once(tmp_path_factory, name: str, model: torch.nn.Module | None = None, seed: int = 0) -> str:
    """A tiny CLIP (`model`, else seeded with `seed`) written once per run in local-dir form:
    its `local-dir:` spec, the same for every worker. Its ONNX towers are exported into the
    run's cache (`onnx_cache`) here, where torch is loaded already: a build would export them
    in a child process, which spends seconds importing torch (test_onnx_towers tests that)."""
    from support.tiny_model import write_local_dir_model

    from retrieval.encoders.onnx_export import export_to_cache
    from retrieval.encoders.spec import ModelSpec

    def make(out: Path) -> None:
        spec = write_local_dir_model(out, model, seed)
        export_to_cache(ModelSpec.parse(spec))

    return f"local-dir:{_made_once(tmp_path_factory, name, make)}"


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory) -> Path:
    """One export cache for the run, shared by xdist workers (subprocesses inherit it): each
    model's ONNX towers are exported once (a child process, seconds), not once per index or
    per worker, and never into the user's own cache. Exports swap in whole, so workers may
    share it."""
    folder = _made_once(tmp_path_factory, "onnx-cache", lambda out: None)
    os.environ["RETRIEVAL_CACHE"] = str(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, onnx_cache) -> str:
    """A seeded, untrained tiny CLIP: `local-dir:` spec. Fine wherever meaning is not tested.
    One folder for all workers, so its towers are exported once (tests only read it)."""
    return _model_made_once(tmp_path_factory, "tiny-model", seed=0)


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory, onnx_cache) -> str:
    """A second tiny model with other weights, for model-mismatch tests."""
    return _model_made_once(tmp_path_factory, "other-model", seed=1)


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory) -> torch.nn.Module:
    """The tiny CLIP trained for seconds on coloured-shape renders and their captions (once a run,
    shared by xdist workers as a state dict, so `trained_model`'s write-and-reload stays tested)."""
    import torch
    from support.tiny_model import create_tiny_clip, train_tiny_clip

    folder = _made_once(tmp_path_factory, "trained-clip",
                        lambda out: torch.save(train_tiny_clip(seed=0).state_dict(), out / "state.pt"))
    model, _, _ = create_tiny_clip(seed=0)
    model.load_state_dict(torch.load(folder / "state.pt"))
    return model.eval()


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, trained_clip, onnx_cache) -> str:
    """`trained_clip` in local-dir form: its `local-dir:` spec (one folder for all workers, as
    for `tiny_model`)."""
    return _model_made_once(tmp_path_factory, "trained-model", trained_clip)


@pytest.fixture(scope="session")
def tiny_coca(tmp_path_factory) -> str:
    """A seeded, untrained tiny CoCa: `local-dir:` spec. Its captions are gibberish, but always
    the same gibberish: fine wherever what they say is not tested. Its context takes captions
    of the default maximum length (20 tokens)."""
    from support.tiny_coca import create_tiny_coca, with_context
    from support.tiny_model import write_local_dir_model

    config = with_context(22)
    model, _, _ = create_tiny_coca(seed=0, model_cfg=config)
    return write_local_dir_model(tmp_path_factory.mktemp("tiny-coca"), model, model_cfg=config)


@pytest.fixture(scope="session")
def trained_coca(tmp_path_factory, trained_clip) -> str:
    """A tiny CoCa trained for seconds, on `trained_clip`'s eyes, to caption the renders
    ("a red circle"): its `local-dir:` spec."""
    from support.tiny_coca import TINY_COCA_CFG, train_tiny_coca
    from support.tiny_model import write_local_dir_model

    folder = _made_once(tmp_path_factory, "trained-coca", lambda out: write_local_dir_model(
        out, train_tiny_coca(trained_clip.visual, seed=0), model_cfg=TINY_COCA_CFG))
    return f"local-dir:{folder}"


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
