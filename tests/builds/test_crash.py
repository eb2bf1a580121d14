"""Crash safety: builds (of images, captions and sounds), captioning, removals and conversions killed with
SIGKILL at random moments.

After every kill the index must open; every SQLite item must have exactly one FAISS vector
and every FAISS vector one item; nothing may be duplicated; and finishing the work must give
exactly the items and vectors of a run that was never interrupted.

The default run holds the first trial of each; the other 24 are marked `slow`, so
`pytest -m "" tests/builds/test_crash.py` runs all 25 (`RETRIEVAL_CRASH_TRIALS=N` for another count).
A failure names its seed and kill delay, and `RETRIEVAL_CRASH_SEED=<seed>` reruns from that seed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from support import write_image
from support.sounds import render_sound, write_sound
from support.stored import committed_items, integrity, item_ids, items_by_uri, written_captions
from support.tiny_model import CLASSES

from retrieval import Index
from retrieval.build.stop_points import STOP_ENV
from retrieval.core.types import MODALITIES
from retrieval.train.audio import AudioTrainingOptions

TRIALS = int(os.environ.get("RETRIEVAL_CRASH_TRIALS", "25"))
DEFAULT_TRIALS = 1  # of each kind, in the default run; the rest are marked slow
FIRST_SEED = int(os.environ.get("RETRIEVAL_CRASH_SEED", "1000"))
IMAGES = 240
SOUNDS = 60  # of 1, 6 and 11 s: 120 windows


@dataclass
class Snapshot:
    """What an index holds, as a comparable value: uri -> vector, per modality."""

    vectors: dict[str, dict[str, np.ndarray]]

    def assert_equal(self, other: Snapshot, context: str) -> None:
        for modality in MODALITIES:
            mine, theirs = self.vectors[modality], other.vectors[modality]
            assert sorted(mine) == sorted(theirs), f"{context}: {modality} items differ"
            for uri, vector in mine.items():
                # Batches split differently after a resume; float sums may differ in the last bits.
                np.testing.assert_allclose(vector, theirs[uri], atol=1e-5, err_msg=context)


def snapshot(index_dir: Path) -> Snapshot:
    with Index.open(index_dir, readonly=True) as index:
        found = {}
        for modality in MODALITIES:
            ids, vectors = index.store.all_vectors(modality)
            uris = {row.id: uri for uri, row in items_by_uri(index.store, modality).items()}
            found[modality] = {uris[int(i)]: v for i, v in zip(ids, vectors)}
    return Snapshot(found)


def assert_consistent(index_dir: Path, context: str) -> None:
    """Open as a writer (which repairs), then check SQLite against the FAISS files on disk."""
    with Index.open(index_dir) as index:
        problems = integrity(index.store)
        assert set(problems.values()) == {0}, f"{context}: {problems}"
        for modality in MODALITIES:
            stored = item_ids(index.store, modality)
            assert index.vectors(modality).ids().tolist() == stored, f"{context}: {modality}"
    with Index.open(index_dir, readonly=True) as reader:  # and the files a reader loads agree
        for modality in MODALITIES:
            assert len(reader.vectors(modality)) == reader.count(modality), context


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash-corpus")
    lines = []
    for number in range(IMAGES):
        folder = root / ("a" if number % 2 else "b")
        name = f"{number:03}.png"
        write_image(folder / name, (number % 256, (number * 7) % 256, (number * 13) % 256))
        lines.append(f"{name}#0\tpicture number {number}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrieval.cli", *args]


@pytest.fixture(scope="module")
def reference(corpus, tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted build."""
    index_dir = tmp_path_factory.mktemp("reference") / "index"
    subprocess.run(cli("index", str(corpus), "--index", str(index_dir), "--model", tiny_model,
                       "--batch-size", "8", "--quiet"), check=True, capture_output=True)
    return index_dir


def kill_after(command: list[str], delay: float) -> None:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        process.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()


def kill_when_stopped(command: list[str], kind: str, batches: int, context: str) -> None:
    """Run `command`, which stops itself once it has committed its `batches`-th batch of `kind`
    (retrieval.build.stop_points), and SIGKILL it there: the kill lands at that batch boundary
    however busy the machine is, where polling the database once raced the build to its end."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, STOP_ENV: f"{kind}:{batches}"})
    try:
        _, status = os.waitpid(process.pid, os.WUNTRACED)  # returns at the stop, or at an exit
        assert os.WIFSTOPPED(status), f"{context}: the build ended before its batch {batches} of {kind}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def trial_seeds() -> list:
    """The trials' seeds, all but the first DEFAULT_TRIALS marked slow."""
    return [pytest.param(seed, marks=[pytest.mark.slow] * (number >= DEFAULT_TRIALS))
            for number, seed in enumerate(range(FIRST_SEED, FIRST_SEED + TRIALS))]


@pytest.mark.parametrize("seed", trial_seeds())
def test_killed_build_resumes_to_the_same_index(seed, corpus, tiny_model, reference, tmp_path):
    rng = random.Random(seed)
    # Kill once a random share of the images is committed, then a random moment later, so
    # kills land in image batches, in the captions and in the final FAISS and manifest writes.
    target, extra = rng.randint(0, IMAGES), rng.uniform(0, 0.15)
    context = f"build killed {extra:.2f} s after {target} images were committed (seed {seed})"
    index_dir = tmp_path / "index"
    process = subprocess.Popen(cli("index", str(corpus), "--index", str(index_dir), "--model",
                                   tiny_model, "--batch-size", "8", "--quiet"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and (committed_items(index_dir) or 0) < target:
        time.sleep(0.01)
    time.sleep(extra)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = committed_items(index_dir)
    print(f"{context}: {committed} of {IMAGES} images committed at the kill")  # README figures
    if committed is not None:
        assert_consistent(index_dir, context)
    with Index.open(index_dir, model=tiny_model, create=True, batch_size=8) as index:
        index.add(corpus)
    assert_consistent(index_dir, context)
    snapshot(index_dir).assert_equal(snapshot(reference), context)


@pytest.fixture(scope="module")
def images_only(corpus, reference, tmp_path_factory) -> Path:
    """The reference index without its captions: where a build stands when it reaches them."""
    index_dir = tmp_path_factory.mktemp("images-only") / "index"
    shutil.copytree(reference, index_dir)
    with Index.open(index_dir) as index:
        index.remove(corpus / "captions.tsv")
    return index_dir


@pytest.mark.parametrize("seed", trial_seeds())
def test_killed_caption_phase_resumes_with_the_captions_committed(seed, corpus, images_only,
                                                                 reference, tmp_path):
    """Captions are committed a batch at a time, as images are: a kill among them once lost
    every caption of the file, and the resumed build encoded them all again."""
    batch = 8
    target = random.Random(seed).randint(1, IMAGES // batch // 2) * batch
    context = f"build killed once {target} captions were committed (seed {seed})"
    index_dir = tmp_path / "index"
    shutil.copytree(images_only, index_dir)
    kill_when_stopped(cli("index", str(corpus), "--index", str(index_dir), "--batch-size", str(batch),
                          "--quiet"), "text", target // batch, context)
    committed = committed_items(index_dir, "text")
    print(f"{context}: {committed} of {IMAGES} captions committed at the kill")
    assert target <= committed < IMAGES, f"{context}: the kill did not land among the captions"
    assert_consistent(index_dir, context)
    with Index.open(index_dir, batch_size=batch) as index:
        report = index.add(corpus)
    assert report.texts_encoded == IMAGES - committed, f"{context}: only what was missing is encoded"
    assert_consistent(index_dir, context)
    snapshot(index_dir).assert_equal(snapshot(reference), context)


def caption_command(index_dir: Path, corpus: Path, tiny_coca: str) -> list[str]:
    """Caption every image of the reference (beside its human caption) with the tiny CoCa."""
    return cli("index", str(corpus), "--index", str(index_dir), "--caption", "--caption-all",
               "--caption-model", tiny_coca, "--caption-max-length", "4", "--batch-size", "8", "--quiet")


@pytest.fixture(scope="module")
def captioned_reference(corpus, reference, tiny_coca, tmp_path_factory) -> Path:
    """The reference index with a written caption for every image, written uninterrupted (in
    this process, which has torch already: what `caption_command` asks, through the API)."""
    index_dir = tmp_path_factory.mktemp("captioned-reference") / "index"
    shutil.copytree(reference, index_dir)
    with Index.open(index_dir, batch_size=8) as index:
        index.add(corpus, caption=True, caption_every_image=True, caption_model=tiny_coca,
                  caption_max_length=4)
    assert written_captions(index_dir) == IMAGES
    return index_dir


@pytest.mark.parametrize("seed", trial_seeds())
def test_killed_captioning_resumes_without_loss_or_duplicates(seed, corpus, reference, captioned_reference,
                                                              tiny_coca, tmp_path):
    """Written captions are committed a batch per transaction: a kill among them keeps those
    written, and the next bare build (the index records the request) writes only the rest."""
    batch = 8
    target = random.Random(seed).randint(1, IMAGES // batch // 2) * batch
    context = f"captioning killed once {target} captions were written (seed {seed})"
    index_dir = tmp_path / "index"
    shutil.copytree(reference, index_dir)
    kill_when_stopped(caption_command(index_dir, corpus, tiny_coca), "caption", target // batch, context)
    committed = written_captions(index_dir)
    print(f"{context}: {committed} of {IMAGES} captions written at the kill")
    assert target <= committed < IMAGES, f"{context}: the kill did not land among the captions"
    assert_consistent(index_dir, context)
    with Index.open(index_dir, batch_size=batch) as index:
        report = index.add()
    assert report.captions_written == IMAGES - committed, f"{context}: only what was missing is written"
    assert_consistent(index_dir, context)
    snapshot(index_dir).assert_equal(snapshot(captioned_reference), context)


@pytest.mark.parametrize("seed", trial_seeds())
def test_killed_removal_completes_when_run_again(seed, corpus, reference, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(reference, index_dir)
    delay = random.Random(seed).uniform(0.2, 0.8)  # the process starts in ~0.4 s
    context = f"removal killed after {delay:.2f} s (seed {seed})"
    kill_after(cli("remove", str(corpus / "a"), "--index", str(index_dir)), delay)
    assert_consistent(index_dir, context)
    with Index.open(index_dir) as index:
        index.remove(corpus / "a")
    assert_consistent(index_dir, context)
    expected = snapshot(reference)
    for modality in MODALITIES:
        expected.vectors[modality] = {
            uri: v for uri, v in expected.vectors[modality].items() if f"{corpus}/a/" not in uri}
    snapshot(index_dir).assert_equal(expected, context)


@pytest.mark.parametrize("seed", trial_seeds())
def test_killed_conversion_keeps_every_item(seed, reference, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(reference, index_dir)
    delay = random.Random(seed).uniform(0.2, 0.8)
    context = f"conversion killed after {delay:.2f} s (seed {seed})"
    kill_after(cli("convert", "hnsw", "--index", str(index_dir)), delay)
    assert_consistent(index_dir, context)
    with Index.open(index_dir) as index:
        index.convert("hnsw")
        assert {index.vectors(m).index_type for m in MODALITIES} == {"hnsw"}
    assert_consistent(index_dir, context)
    snapshot(index_dir).assert_equal(snapshot(reference), context)


def test_reference_build_is_complete(reference):
    with Index.open(reference, readonly=True) as index:
        counts = {modality: index.count(modality) for modality in MODALITIES}
    assert counts == {"image": IMAGES, "text": IMAGES, "audio": 0, "video": 0}


@pytest.fixture(scope="module")
def sound_corpus(tmp_path_factory) -> Path:
    """Sounds of one to three windows each, so kills land inside multi-window files too."""
    root = tmp_path_factory.mktemp("crash-sounds")
    rng = np.random.default_rng(0)
    for number in range(SOUNDS):
        color, shape = CLASSES[number % len(CLASSES)]
        write_sound(root / f"{number:03}.flac", render_sound(color, shape, rng, 1.0 + number % 3 * 5.0))
    return root


@pytest.fixture(scope="module")
def hearing_index(tiny_model, tmp_path_factory) -> Path:
    """An index with an audio tower (barely trained: crash safety does not need meaning)."""
    pairs = tmp_path_factory.mktemp("crash-pairs")
    rng = np.random.default_rng(1)
    for number, (color, shape) in enumerate(CLASSES[:4]):
        write_sound(pairs / f"{number}.wav", render_sound(color, shape, rng))
        (pairs / f"{number}.txt").write_text(f"{color} {shape}\n")
    index_dir = tmp_path_factory.mktemp("hearing") / "index"
    with Index.open(index_dir, model=tiny_model, create=True) as index:
        index.train_audio(pairs, AudioTrainingOptions(epochs=1, width=4, n_mels=16, held_out=0))
    return index_dir


@pytest.fixture(scope="module")
def sound_reference(sound_corpus, hearing_index, tmp_path_factory) -> Path:
    index_dir = tmp_path_factory.mktemp("sound-reference") / "index"
    shutil.copytree(hearing_index, index_dir)
    with Index.open(index_dir, batch_size=8) as index:
        index.add(sound_corpus)
    return index_dir


@pytest.mark.parametrize("seed", trial_seeds())
def test_killed_audio_build_resumes_to_the_same_index(seed, sound_corpus, hearing_index,
                                                      sound_reference, tmp_path):
    rng = random.Random(seed)
    windows = SOUNDS // 3 * (1 + 2 + 3)
    target, extra = rng.randint(0, windows), rng.uniform(0, 0.15)
    context = f"audio build killed {extra:.2f} s after {target} windows were committed (seed {seed})"
    index_dir = tmp_path / "index"
    shutil.copytree(hearing_index, index_dir)
    process = subprocess.Popen(cli("index", str(sound_corpus), "--index", str(index_dir),
                                   "--batch-size", "8", "--quiet"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and (committed_items(index_dir, "audio") or 0) < target:
        time.sleep(0.01)
    time.sleep(extra)
    process.send_signal(signal.SIGKILL)
    process.wait()
    print(f"{context}: {committed_items(index_dir, 'audio')} of {windows} windows committed at the kill")
    assert_consistent(index_dir, context)
    with Index.open(index_dir, batch_size=8) as index:
        index.add(sound_corpus)
    assert_consistent(index_dir, context)
    snapshot(index_dir).assert_equal(snapshot(sound_reference), context)
    assert len(snapshot(index_dir).vectors["audio"]) == windows
