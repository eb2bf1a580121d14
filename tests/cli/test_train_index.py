"""`retrieve train-audio`, `train-fusion` and `train-temporal`: one focused test per option,
each on a handful of tiny files and an epoch or two."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from support import held_lock, write_image
from support.clips import write_clip
from support.sounds import render_sound, write_sound
from support.tiny_model import CLASSES, caption_for

from retrieval import Index
from retrieval.cli import cli


def run(*args: str | Path) -> dict:
    """`retrieve ARGS --json`: what it printed."""
    result = CliRunner().invoke(cli, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def losses(report: dict) -> list[float]:
    return [epoch["loss"] for epoch in report["epochs"]]


def copy_of(index_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(index_dir, tmp_path / "index")
    return tmp_path / "index"


# -- train-audio ----------------------------------------------------------------------------------

AUDIO = ["--epochs", "2", "--width", "4", "--held-out", "0", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def sounds(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(an index whose 6 sounds wait for an audio encoder, training pairs of 8 captioned sounds)."""
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for number, (color, shape) in enumerate(CLASSES[:8]):
        write_sound(root / "pairs" / f"{number}.wav", render_sound(color, shape, rng, seconds=0.5))
        (root / "pairs" / f"{number}.txt").write_text(caption_for(color, shape) + "\n")
        if number < 6:
            write_sound(root / "library" / f"{number}.wav", render_sound(color, shape, rng, seconds=0.5))
    built = CliRunner().invoke(cli, ["index", str(root / "library"), "--index", str(root / "index"),
                                     "--model", tiny_model, "--quiet"])
    assert built.exit_code == 0 and "6 skipped" in built.stdout, built.output
    return root / "index", root / "pairs"


@pytest.fixture(scope="module")
def audio_baseline(sounds) -> dict:
    index_dir, pairs = sounds
    return run("train-audio", pairs, "--index", index_dir, *AUDIO)


def test_train_audio_reindexes_unless_told_not_to(sounds, audio_baseline, tmp_path):
    index_dir, pairs = sounds
    with Index.open(index_dir, readonly=True) as index:
        assert index.count("audio") == 6  # the baseline encoded the sounds that waited
    copy = copy_of(index_dir, tmp_path)
    run("train-audio", pairs, "--index", copy, *AUDIO, "--seed", "1", "--no-reindex")
    with Index.open(copy, readonly=True) as index:
        assert index.count("audio") == 0  # the old tower's vectors are dropped, none made anew


def test_train_audio_device_reaches_the_model(sounds, tmp_path):
    index_dir, pairs = sounds
    result = CliRunner().invoke(cli, ["train-audio", str(pairs), "--index", str(copy_of(index_dir, tmp_path)),
                                      *AUDIO, "--device", "bogus"])
    assert result.exit_code == 2 and "--device 'bogus' is not a device" in result.stderr, result.output
    assert len(result.stderr.splitlines()) == 1


# -- train-fusion ---------------------------------------------------------------------------------

FUSION = ["--epochs", "2", "--held-out", "0", "--batch-size", "4"]


@pytest.fixture(scope="module")
def entries(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(an index of 6 entries, each an image with a caption file of the same stem; queries)."""
    root = tmp_path_factory.mktemp("entries")
    lines = []
    for number, (color, shape) in enumerate(CLASSES[:6]):
        write_image(root / "entries" / f"e{number}.png", (40 * number, 200 - 30 * number, 90))
        (root / "entries" / f"e{number}.txt").write_text(caption_for(color, shape) + "\n")
        lines.append(f"{caption_for(color, shape)}\tentries/e{number}\n")
    (root / "queries.tsv").write_text("".join(lines))
    run("index", root / "entries", "--index", root / "index", "--model", tiny_model, "--quiet")
    return root / "index", root / "queries.tsv"


@pytest.fixture(scope="module")
def fusion_baseline(entries) -> dict:
    index_dir, queries = entries
    return run("train-fusion", queries, "--index", index_dir, *FUSION)


# -- train-temporal -------------------------------------------------------------------------------

TEMPORAL = ["--epochs", "2", "--held-out", "0", "--batch-size", "2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    """(an index of one 4 s clip, training pairs of three captioned 4 s clips)."""
    root = tmp_path_factory.mktemp("videos")
    (root / "pairs").mkdir()
    (root / "library").mkdir()
    for number, (color, shape) in enumerate(CLASSES[:3]):
        write_clip(root / "pairs" / f"{number}.mp4", "mpeg4", "flac", [(color, shape)], seed=number)
        (root / "pairs" / f"{number}.txt").write_text(caption_for(color, shape) + "\n")
    write_clip(root / "library" / "clip.mp4", "mpeg4", "flac", [CLASSES[4]], seed=9)
    run("index", root / "library", "--index", root / "index", "--model", tiny_model, "--quiet")
    return root / "index", root / "pairs"


@pytest.fixture(scope="module")
def temporal_baseline(videos) -> dict:
    index_dir, pairs = videos
    return run("train-temporal", pairs, "--index", index_dir, *TEMPORAL)


def test_train_temporal_kind(videos, temporal_baseline, tmp_path):
    index_dir, pairs = videos
    assert temporal_baseline["identity"].startswith("bilstm:")
    report = run("train-temporal", pairs, "--index", copy_of(index_dir, tmp_path), *TEMPORAL,
                 "--kind", "transformer")
    assert report["identity"].startswith("transformer:")
    with Index.open(tmp_path / "index", readonly=True) as index:
        assert index.video_setting("temporal") == report["identity"]


def test_train_temporal_reindexes_unless_told_not_to(videos, temporal_baseline, tmp_path):
    index_dir, pairs = videos
    with Index.open(index_dir, readonly=True) as index:
        assert index.count("video") == 1  # the baseline re-encoded the clip with its encoder
    copy = copy_of(index_dir, tmp_path)
    run("train-temporal", pairs, "--index", copy, *TEMPORAL, "--seed", "1", "--no-reindex")
    with Index.open(copy, readonly=True) as index:
        assert index.count("video") == 0


# -- every trainer's schedule options ---------------------------------------------------------------

# command: (fixture of (index, training input), fixture of its baseline run, the baseline's options
# (each trainer's other batch size differs from its baseline's), whether a second run checks that
# the same options train the same, so the difference is the option's)
TRAINERS = {
    "train-audio": ("sounds", "audio_baseline", [*AUDIO, "--no-reindex"], "2", False),
    "train-fusion": ("entries", "fusion_baseline", FUSION, "2", True),
    "train-temporal": ("videos", "temporal_baseline", TEMPORAL, "3", False),
}


@pytest.mark.parametrize("command", TRAINERS)
@pytest.mark.parametrize("option", ["--seed 3", "--batch-size", "--learning-rate 0.1"])
def test_schedule_options_change_the_training(command, option, request, tmp_path):
    data, baseline, fixed, other_batch_size, repeat = TRAINERS[command]
    index_dir, source = request.getfixturevalue(data)
    option_args = option.split() if " " in option else [option, other_batch_size]
    changed = run(command, source, "--index", copy_of(index_dir, tmp_path), *fixed, *option_args)
    assert losses(changed) != losses(request.getfixturevalue(baseline))
    if repeat:
        again = run(command, source, "--index", tmp_path / "index", *fixed, *option_args)
        assert losses(again) == losses(changed)  # so the difference is the option's


# -- every writer waits with --wait -----------------------------------------------------------------

@pytest.mark.parametrize("command", ["train-audio", "train-fusion", "train-temporal"])
def test_a_trainer_with_wait_waits_for_the_writer_before_it(command, tmp_path, tiny_model, monkeypatch):
    index_dir = tmp_path / "index"
    Index.open(index_dir, model=tiny_model, create=True).close()
    args = [command, str(tmp_path / "missing.csv"), "--index", str(index_dir)]
    said_waiting = threading.Event()
    echo = click.echo

    def noticing_echo(message=None, *options, **named):
        if str(message).startswith("waiting for "):
            said_waiting.set()
        echo(message, *options, **named)

    monkeypatch.setattr(click, "echo", noticing_echo)
    locked = threading.Event()

    def other_writer():  # holds the lock until the command says it waits for it
        with held_lock(index_dir):
            locked.set()
            said_waiting.wait(timeout=60)

    holder = threading.Thread(target=other_writer)
    holder.start()
    locked.wait()
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1 and "add --wait to wait for it" in refused.stderr
    waited = CliRunner().invoke(cli, [*args, "--wait"])
    holder.join()
    assert waited.stderr.startswith(f"waiting for pid {os.getpid()} (")
    # then on to the command itself, once the lock is free: nothing to train on here
    assert waited.exit_code == 2 and waited.stderr.splitlines()[-1].startswith("error: ")
