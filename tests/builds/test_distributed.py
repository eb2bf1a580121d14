"""Distributed builds on a local Ray cluster: the same index as a local build, resumable shards,
a killed worker, on-disk shards filled by Ray tasks.

Every Ray Data job costs 20-30 s however small its corpus and Ray's start alone takes seconds, so
every test that runs Ray is marked `slow` (`pytest -m slow tests/builds/test_distributed.py`); the
default run starts no Ray and keeps the one-line error for an unreachable cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from support import write_shape_folder
from support.stored import items_by_uri
from support.vectors import ArraySource

from retrieval import Index
from retrieval.build.ray import Shards, embed_images, embed_texts, ray_runner
from retrieval.cli import cli
from retrieval.media.corpus import text_digest, walk_sources
from retrieval.storage.folder import SHARDS_FOLDER
from retrieval.storage.ondisk import build_on_disk
from retrieval.storage.vectors import VectorIndex, new_trained_index


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster for the module's slow tests: starting Ray takes seconds, so the
    default run, which leaves those out, never starts it."""
    import ray

    tests = str(Path(__file__).parents[1])  # workers unpickle support.vectors.ArraySource from here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests}})
    yield
    ray.shutdown()


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Renders with captions, plus files a build must skip."""
    root = write_shape_folder(tmp_path / "shapes", seed=5, per_class=3)
    (root / "broken.png").write_bytes(b"not an image at all")
    (root / "empty.jpg").write_bytes(b"")
    return root


def contents(folder: Path) -> tuple[list[tuple], dict[str, np.ndarray]]:
    """Every item's metadata, and its vector, by uri."""
    with Index.open(folder, readonly=True) as index:
        items = items_by_uri(index.store)
        files = index.store.files_by_path()
        parents = {row.id: uri for uri, row in items.items()}
        rows = [(uri, row.modality, row.text, parents.get(row.parent_id), row.meta, row.path,
                 files[row.path].sha256) for uri, row in sorted(items.items())]
        vectors = index.store.vectors_for_ids(np.array([items[row[0]].id for row in rows], np.int64))
    return rows, {row[0]: vector for row, vector in zip(rows, vectors)}


def assert_same_index(local: Path, distributed: Path) -> None:
    local_rows, local_vectors = contents(local)
    ray_rows, ray_vectors = contents(distributed)
    assert ray_rows == local_rows
    for uri, vector in local_vectors.items():
        assert np.allclose(ray_vectors[uri], vector, atol=1e-6), uri


@pytest.mark.slow  # a Ray Data job: 20-30 s each
@pytest.mark.usefixtures("local_ray")
def test_a_ray_build_gives_the_items_and_vectors_of_a_local_build(tmp_path, corpus, tiny_model):
    with Index.open(tmp_path / "local", model=tiny_model, create=True) as index:
        local = index.add(corpus)
    with Index.open(tmp_path / "ray", model=tiny_model, create=True, batch_size=8) as index:
        on_driver: list[int] = []
        encode_texts = index.encoder.encode_texts
        index.encoder.encode_texts = lambda texts: on_driver.append(len(texts)) or encode_texts(texts)
        distributed = index.add(corpus, engine="ray")
        assert not on_driver  # the captions were encoded by the Ray job too
        hits = index.search("a red circle", k=5)
    assert (distributed.new, distributed.images_encoded) == (local.new, local.images_encoded) == (28, 27)
    assert distributed.texts_encoded == local.texts_encoded > 0
    assert sorted(s.path for s in distributed.skipped) == sorted(s.path for s in local.skipped)
    assert {s.reason for s in distributed.skipped} == {s.reason for s in local.skipped}
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    assert not (tmp_path / "ray" / SHARDS_FOLDER).exists()  # ingested, then deleted
    with Index.open(tmp_path / "local", readonly=True) as index:
        assert [h.uri for h in index.search("a red circle", k=5)] == [h.uri for h in hits]


@pytest.mark.slow  # a Ray Data job: 20-30 s each
@pytest.mark.usefixtures("local_ray")
def test_the_cli_builds_on_ray_and_updates_incrementally(tmp_path, corpus, tiny_model):
    run = CliRunner().invoke
    result = run(cli, ["index", str(corpus), "--index", str(tmp_path / "ray"), "--model", tiny_model,
                       "--engine", "ray", "--quiet"])
    assert result.exit_code == 0, result.output
    (corpus / "red_circle_0.png").unlink()
    write_shape_folder(tmp_path / "more", seed=6, per_class=1)
    (tmp_path / "more" / "red_circle_0.png").rename(corpus / "new_red_circle.png")
    result = run(cli, ["index", str(corpus), "--index", str(tmp_path / "ray"), "--engine", "ray", "--json"])
    assert result.exit_code == 0, result.output
    assert '"new": 1' in result.output and '"removed": 1' in result.output
    with Index.open(tmp_path / "local", model=tiny_model, create=True) as index:
        index.add(corpus)
    assert_same_index(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow  # a Ray Data job: 20-30 s each
@pytest.mark.usefixtures("local_ray")
def test_a_ray_build_of_texts_alone_works_and_ray_prints_nothing(tmp_path, tiny_model):
    """The driver never loads the model for texts alone, so the vector size must come from the
    shards; and with --quiet nothing of Ray's own (C++ errors, log lines) reaches the terminal."""
    import ray

    corpus = tmp_path / "texts"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("a note about cats\n\na note about dogs\n")
    index = tmp_path / "index"
    result = subprocess.run(
        [sys.executable, "-m", "retrieval.cli", "index", str(corpus), "--index", str(index),
         "--model", tiny_model, "--engine", "ray", "--address", ray.get_runtime_context().gcs_address,
         "--quiet"], capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (0, "")
    with Index.open(index, readonly=True) as built:
        assert (built.dim, built.store.get_info("dim")) == (32, "32")
        assert len(built.search("a note about cats", k=5)) == 2
    assert not (index / SHARDS_FOLDER).exists()


@pytest.mark.slow  # a Ray Data job: 20-30 s each
@pytest.mark.usefixtures("local_ray")
def test_an_interrupted_job_resumes_from_its_shards(tmp_path, corpus, tiny_model):
    images = [f for f in walk_sources([corpus]).files if f.kind == "image"]
    with Index.open(tmp_path / "ray", model=tiny_model, create=True, batch_size=4) as index:
        shards = Shards(index.path / SHARDS_FOLDER)
        # A job stopped after its first twelve images:
        assert embed_images(index.context.encoders, images[:12], shards, 64.0, progress=False) == 12
        (shards.folder / "damaged.npz").write_bytes(b"PK\x03\x04 cut short")
        (shards.folder / ".partial.123.tmp.npz").write_bytes(b"")
        resumed = Shards(shards.folder)
        assert len(resumed.rows) == 12
        assert embed_images(index.context.encoders, images, resumed, 64.0, progress=False) == len(images) - 12
        assert embed_images(index.context.encoders, images, Shards(shards.folder), 64.0, progress=False) == 0
        texts = {text_digest(text): text for text in ("a red circle", "a text no caption has")}
        assert embed_texts(index.context.encoders, texts, Shards(shards.folder), progress=False) == 2
        assert embed_texts(index.context.encoders, texts, Shards(shards.folder), progress=False) == 0
        report = index.add(corpus, engine="ray")
        assert report.images_encoded == len(images) - 2  # broken.png and empty.jpg are skipped
    with Index.open(tmp_path / "local", model=tiny_model, create=True) as index:
        index.add(corpus)
    assert_same_index(tmp_path / "local", tmp_path / "ray")


def embedder_processes() -> list[int]:
    """Pids of the Ray actor processes running our image embedder."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if entry.name.isdigit() and b"ray::" in title and b"Embedder" in title:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow  # a Ray Data job: 20-30 s each
@pytest.mark.usefixtures("local_ray")
def test_a_killed_ray_worker_loses_and_duplicates_nothing(tmp_path, tiny_model):
    corpus = write_shape_folder(tmp_path / "shapes", seed=7, per_class=8)
    shard_folder = tmp_path / "ray" / SHARDS_FOLDER / "images"
    killed: list[int] = []

    def kill_an_embedder_mid_job() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            written = len(list(shard_folder.glob("*.npz"))) if shard_folder.is_dir() else 0
            pids = embedder_processes()
            if written >= 2 and pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(written)
            time.sleep(0.05)

    killer = threading.Thread(target=kill_an_embedder_mid_job)
    killer.start()
    with Index.open(tmp_path / "ray", model=tiny_model, create=True, batch_size=2) as index:
        report = index.add(corpus, engine="ray")
    killer.join()
    assert killed and killed[0] < 36, "the embedder was not killed mid-job"
    assert report.new == 73 and report.images_encoded == 72 and not report.skipped
    with Index.open(tmp_path / "local", model=tiny_model, create=True) as index:
        index.add(corpus)
    assert_same_index(tmp_path / "local", tmp_path / "ray")


@pytest.mark.slow  # Ray's start alone takes seconds; local processes fill shards in test_ondisk.py
@pytest.mark.usefixtures("local_ray")
def test_ray_tasks_fill_an_on_disk_index_like_local_processes(tmp_path):
    source = ArraySource(20_000, seed=2)
    ids, vectors = source.read(0, 1 << 40)
    trained = new_trained_index("ivf-pq", source.dim, len(ids), lambda limit: vectors[:limit])
    memory = VectorIndex(faiss.clone_index(trained))
    memory.add(ids, vectors)
    disk = build_on_disk(source, tmp_path / "image", "ivf-pq-disk", workers=2, runner=ray_runner(),
                         trained=trained)
    queries = vectors[::1000]
    assert np.array_equal(disk.index.search(queries, 10)[1], memory.index.search(queries, 10)[1])


def test_an_unreachable_cluster_is_one_line(tmp_path, corpus, tiny_model):
    result = subprocess.run(
        [sys.executable, "-m", "retrieval.cli", "index", str(corpus), "--index", str(tmp_path / "x"),
         "--model", tiny_model, "--engine", "ray", "--address", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--address 127.0.0.1:9" in lines[0] and "ray start --head" in lines[0]
