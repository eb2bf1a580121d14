"""Audio as a modality, end to end: train the audio tower against a tiny trained CLIP on
synthetic captioned sounds (pitch = colour, pattern = shape), index held-out sounds, and search
in every direction through the API and the CLI; windows, incremental updates and bad audio."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner
from support.sounds import render_sound, write_sound
from support.tiny_model import CLASSES, caption_for, render_shape

from retrieval import Index
from retrieval.cli import cli
from retrieval.core.errors import ModelLoadError, UsageError
from retrieval.train.audio import AudioTrainingOptions, read_audio_pairs

# A small tower trains in a few seconds and separates the nine classes.
FAST = AudioTrainingOptions(epochs=20, width=8, n_mels=32, learning_rate=3e-3, held_out=0.2)
FAST_CLI = ["--epochs", "20", "--width", "8", "--learning-rate", "3e-3", "--held-out", "0.2"]


def class_of(path: str) -> str:
    color, shape, *_ = Path(path.split("#")[0]).stem.split("_")
    return caption_for(color, shape)


def recall_at_1(pairs: list[tuple[str, str]]) -> float:
    return sum(expected == found for expected, found in pairs) / len(pairs)


def write_pairs(root: Path, seed: int, per_class: int = 10, partner: str = "caption") -> Path:
    """Training pairs in folder layout: each sound with a caption file or an image beside it."""
    rng = np.random.default_rng(seed)
    for color, shape in CLASSES:
        for copy in range(per_class):
            stem = root / f"{color}_{shape}_{copy}"
            write_sound(stem.with_suffix(".wav"), render_sound(color, shape, rng))
            if partner == "caption":
                stem.with_suffix(".txt").write_text(caption_for(color, shape) + "\n")
            else:
                render_shape(color, shape, rng).save(stem.with_suffix(".png"))
    return root


def write_library(root: Path, seed: int = 99, per_class: int = 3) -> Path:
    """Held-out sounds (flac) and renders (png) of every class, with captions for the renders."""
    rng = np.random.default_rng(seed)
    (root / "pictures").mkdir(parents=True)
    lines = []
    for color, shape in CLASSES:
        for copy in range(per_class):
            name = f"{color}_{shape}_{copy}"
            write_sound(root / "sounds" / f"{name}.flac", render_sound(color, shape, rng, seconds=1.5))
            render_shape(color, shape, rng).save(root / "pictures" / f"{name}.png")
            lines.append(f"{name}.png#0\t{caption_for(color, shape)}")
    (root / "pictures" / "captions.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def library(made_once) -> Path:
    return made_once("audio-library", write_library)


@pytest.fixture(scope="module")
def caption_pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("caption-pairs"), seed=1)


@pytest.fixture(scope="module")
def trained_through_the_cli(made_once, trained_model, library) -> tuple[Path, TrainedOutput]:
    """An index of the library built with `retrieve index`, whose tower `retrieve train-audio`
    trained on image pairs, and what train-audio wrote (once a run for all workers, which only
    read it: the API retrains on caption pairs in a copy, in
    test_retraining_replaces_the_tower_and_re_encodes_the_audio)."""
    root = made_once("audio-trained", lambda root: train_through_the_cli(root, trained_model, library))
    return root / "index", TrainedOutput((root / "stdout").read_text(), (root / "stderr").read_text())


class TrainedOutput(NamedTuple):
    stdout: str
    stderr: str


def train_through_the_cli(root: Path, trained_model: str, library: Path) -> None:
    pairs = write_pairs(root / "pairs", seed=2, partner="image")
    index_dir = root / "index"
    runner = CliRunner()
    built = runner.invoke(cli, ["index", str(library / "pictures"), str(library / "sounds"),
                                "--index", str(index_dir), "--model", trained_model, "--json", "--quiet"])
    assert built.exit_code == 0, built.output
    first = json.loads(built.stdout)
    assert (first["images_encoded"], first["texts_encoded"], first["audio_encoded"]) == (27, 9, 0)
    assert len(first["skipped"]) == 27 and "train-audio" in first["skipped"][0]["reason"]
    trained = runner.invoke(cli, ["train-audio", str(pairs), "--index", str(index_dir), *FAST_CLI, "--json"])
    assert trained.exit_code == 0, trained.output
    (root / "stdout").write_text(trained.stdout)
    (root / "stderr").write_text(trained.stderr)


@pytest.fixture(scope="module")
def audio_index(trained_through_the_cli) -> Path:
    """The library's index with a trained tower (built once; copy it to change it)."""
    return trained_through_the_cli[0]


def copy_of(index_path: Path, tmp_path: Path) -> Path:
    shutil.copytree(index_path, tmp_path / "index")
    return tmp_path / "index"


def test_text_to_audio_and_audio_to_image_through_the_api(audio_index, library):
    with Index.open(audio_index, readonly=True) as index:
        text_to_audio = [(caption_for(c, s), class_of(index.search(caption_for(c, s), target="audio",
                                                                   k=1)[0].uri))
                         for c, s in CLASSES]
        sounds = sorted((library / "sounds").glob("*.flac"))
        audio_to_image = [(class_of(str(p)), class_of(index.search(audio=p, target="image", k=1)[0].uri))
                          for p in sounds]
    assert recall_at_1(text_to_audio) >= 0.9, text_to_audio
    assert recall_at_1(audio_to_image) >= 0.9, audio_to_image


def test_image_to_audio_audio_to_text_and_audio_to_audio(audio_index, library):
    with Index.open(audio_index, readonly=True) as index:
        pictures = sorted((library / "pictures").glob("*.png"))
        image_to_audio = [(class_of(str(p)), class_of(index.search(image=p, target="audio", k=1)[0].uri))
                          for p in pictures]
        sounds = sorted((library / "sounds").glob("*.flac"))
        audio_to_text = [(class_of(str(p)), index.search(audio=p, target="text", k=1)[0].text)
                         for p in sounds]
        # auto: a sound finds sounds first, itself best of all
        same = [index.search(audio=p, k=1)[0] for p in sounds]
    assert recall_at_1(image_to_audio) >= 0.9, image_to_audio
    assert recall_at_1(audio_to_text) >= 0.9, audio_to_text
    assert [hit.path for hit in same] == [str(p) for p in sounds]
    assert all(hit.modality == "audio" and hit.score > 0.999 for hit in same)


def test_audio_hits_are_files_at_their_best_window(audio_index, library, tmp_path):
    """A long file is cut into windows; a hit is the file once, at the window that matched."""
    rng = np.random.default_rng(5)
    wave = np.concatenate([render_sound("blue", "square", rng, seconds=7.0),
                           render_sound("red", "circle", rng, seconds=5.0)])
    write_sound(tmp_path / "long" / "recording.wav", wave)
    with Index.open(copy_of(audio_index, tmp_path)) as index:
        report = index.add(tmp_path / "long")
        assert report.audio_encoded == 3  # 12 s in 5 s windows: 0-5, 5-10, and 7-12 at the end
        hits = index.search("a red circle", target="audio", k=30)
        long_hits = [hit for hit in hits if hit.path.endswith("recording.wav")]
        assert len(long_hits) == 1  # aggregated per file
        assert long_hits[0].metadata == {"start": 7.0, "end": 12.0}
        assert long_hits[0].uri.endswith("recording.wav#t=7,12")
        assert len({hit.path for hit in hits}) == len(hits) == 28
        blue = index.search("a blue square", target="audio", k=30)
        assert next(h for h in blue if h.path.endswith("recording.wav")).metadata["start"] == 0.0


def test_combined_queries_mix_text_image_and_audio_terms(audio_index, library):
    sound = library / "sounds" / "green_triangle_0.flac"
    picture = library / "pictures" / "green_triangle_1.png"
    with Index.open(audio_index, readonly=True) as index:
        mixed = index.search(f"a green triangle + {sound} + 0.5:{picture}", target="audio", k=3)
        assert all(class_of(hit.uri) == "a green triangle" for hit in mixed)
        together = index.search(text="a green triangle", image=picture, audio=sound, target="image", k=1)
        assert class_of(together[0].uri) == "a green triangle"
        # subtracting the sound's own vector from itself leaves nothing to search for
        with pytest.raises(UsageError, match="cancel out"):
            index.search(f"{sound} - {sound}", target="audio")


def test_train_audio_and_search_through_the_cli(trained_through_the_cli, library):
    """Image pairs: the tower learns to land sounds next to their pictures."""
    path, trained = trained_through_the_cli
    index_dir = str(path)
    runner = CliRunner()
    report = json.loads(trained.stdout)
    assert report["pairs"] == 90 and report["held_out"] == 18
    assert len(report["epochs"]) == FAST.epochs and report["identity"].startswith("tower:")
    assert f"epoch {FAST.epochs}/{FAST.epochs}: loss" in trained.stderr  # a line per epoch, with recall

    def top(*args: str) -> dict:
        result = runner.invoke(cli, [*args, "--index", index_dir, "--json", "-k", "1"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)[0]

    text_to_audio = [(caption_for(c, s), class_of(top(caption_for(c, s), "--target", "audio")["uri"]))
                     for c, s in CLASSES]
    audio_to_image = [(class_of(str(p)), class_of(top("--audio", str(p), "--target", "image")["uri"]))
                      for p in sorted((library / "sounds").glob("*.flac"))]
    assert recall_at_1(text_to_audio) >= 0.9, text_to_audio
    assert recall_at_1(audio_to_image) >= 0.9, audio_to_image
    hit = top("a red square", "--target", "audio")
    assert hit["modality"] == "audio" and set(hit["metadata"]) == {"start", "end"}
    info = runner.invoke(cli, ["info", "--index", index_dir])
    assert "audio   tower:" in info.output and "audio   27" in info.output


def test_audio_updates_incrementally(audio_index, library, tmp_path):
    folder = tmp_path / "sounds"
    shutil.copytree(library / "sounds", folder)
    with Index.open(copy_of(audio_index, tmp_path)) as index:
        first = index.add(folder)
        assert first.new == 27 and first.audio_encoded == 0  # same content as indexed ones
        assert first.vectors_reused == 27
        again = index.add(folder)
        assert (again.new, again.changed, again.audio_encoded) == (0, 0, 0)
        assert again.unchanged == 27

        (folder / "red_circle_0.flac").rename(folder / "renamed.flac")
        ids_before = {h.id for h in index.search("a red circle", target="audio", k=60)}
        moved = index.add(folder)
        assert moved.moved == 1 and moved.audio_encoded == 0
        assert ids_before == {h.id for h in index.search("a red circle", target="audio", k=60)}

        rng = np.random.default_rng(3)
        write_sound(folder / "blue_square_1.flac", render_sound("blue", "square", rng, seconds=11.0))
        changed = index.add(folder)
        assert changed.changed == 1 and changed.audio_encoded == 3
        assert index.count("audio") == 27 + 27 + 2  # that file now has three windows

        assert index.remove(folder) == 27
        assert index.count("audio") == 27
        assert len(index.vectors("audio")) == 27
        paths = {h.path for h in index.search("a blue square", target="audio", k=50)}
        assert not any(str(folder) in p for p in paths)


@pytest.mark.parametrize("name, content, reason", [
    ("empty.wav", b"", "empty file"),
    ("noise.wav", bytes(range(256)) * 8, "not a readable audio file"),
    ("words.mp3", b"this is not an mp3 at all\n" * 20, "not a readable audio file"),
    ("silent.wav", None, "silent"),
    ("short.wav", None, "too short"),
    ("long.wav", None, "too long"),
])
def test_bad_audio_is_skipped_with_a_reason_and_counted(audio_index, tmp_path, name, content, reason):
    folder = tmp_path / "incoming"
    rng = np.random.default_rng(0)
    write_sound(folder / "good.wav", render_sound("red", "circle", rng))
    waves = {"silent.wav": np.zeros(16000, np.float32), "short.wav": render_sound("red", "circle", rng, 0.02),
             "long.wav": render_sound("red", "circle", rng, seconds=3.0)}
    if content is None:
        write_sound(folder / name, waves[name])
    else:
        (folder / name).write_bytes(content)
    with Index.open(copy_of(audio_index, tmp_path)) as index:
        report = index.add(folder, max_audio_seconds=2.0)
        assert [s.path for s in report.skipped] == [str(folder / name)]
        assert reason in report.skipped[0].reason
        assert report.new == 1 and index.count("audio") == 28


def test_bad_audio_warnings_on_the_cli(audio_index, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "broken.ogg").write_bytes(b"OggS" + bytes(100))
    index_dir = str(copy_of(audio_index, tmp_path))
    result = CliRunner().invoke(cli, ["index", str(folder), "--index", index_dir])
    assert result.exit_code == 0, result.output
    assert f"warning: skipped {folder / 'broken.ogg'}: not a readable audio file" in result.stderr
    assert "1 skipped" in result.stdout


def test_without_an_audio_encoder_sounds_wait_and_audio_queries_explain(tmp_path, tiny_model, library):
    runner = CliRunner()
    index_dir = str(tmp_path / "index")
    built = runner.invoke(cli, ["index", str(library / "sounds"), "--index", index_dir,
                                "--model", tiny_model])
    assert built.exit_code == 0 and "27 skipped" in built.stdout
    # once a line per sound (28 on a real corpus): the reason is the index's, said once
    assert built.stderr.splitlines() == [
        f"warning: skipped 27 sounds: no audio encoder yet: train one with `retrieve train-audio "
        f"PAIRS --index {index_dir}`, or build with --audio-model clap:NAME"]
    with Index.open(index_dir) as index:
        assert index.count("audio") == 0 and index.store.is_empty()
        with pytest.raises(ModelLoadError, match="no audio encoder yet"):
            index.audio_encoder  # noqa: B018
    searched = runner.invoke(cli, ["--audio", str(library / "sounds" / "red_circle_0.flac"),
                                   "--index", index_dir])
    assert searched.exit_code == 1


def test_retraining_replaces_the_tower_and_re_encodes_the_audio(audio_index, caption_pairs, tmp_path):
    path = copy_of(audio_index, tmp_path)
    with Index.open(path) as index:
        old = index.audio_model
        before = index.store.all_vectors("audio")[1]
        report = index.train_audio(caption_pairs, AudioTrainingOptions(**{**vars(FAST), "seed": 7}))
        assert report.epochs[-1].recall_at_1 >= 0.9, report.epochs  # captions teach it too
        assert report.identity != old and index.audio_model == report.identity
        assert index.count("audio") == 27
        assert not np.allclose(index.store.all_vectors("audio")[1], before)
    towers = sorted(p.name for p in path.glob("audio_tower_*.safetensors"))
    assert towers == [f"audio_tower_{report.identity.removeprefix('tower:')}.safetensors"]


def test_pairs_files_name_audio_with_an_image_or_a_caption(tmp_path):
    (tmp_path / "pairs.csv").write_text("audio,caption\na.wav,a dog barking\nb.wav,rain\n")
    (tmp_path / "pairs.jsonl").write_text('{"audio": "a.wav", "image": "a.jpg"}\n')
    pairs = read_audio_pairs(tmp_path / "pairs.csv")
    assert [(p.audio.name, p.captions) for p in pairs] == [("a.wav", ("a dog barking",)),
                                                           ("b.wav", ("rain",))]
    [pair] = read_audio_pairs(tmp_path / "pairs.jsonl")
    assert pair.image == tmp_path / "a.jpg" and pair.audio == tmp_path / "a.wav"
    (tmp_path / "bad.csv").write_text("sound,caption\na.wav,x\n")
    with pytest.raises(UsageError, match="no 'audio' column"):
        read_audio_pairs(tmp_path / "bad.csv")
    (tmp_path / "lonely").mkdir()
    write_sound(tmp_path / "lonely" / "a.wav", np.ones(1600, np.float32) * 0.1)
    with pytest.raises(UsageError, match="no audio file has an image or a .txt caption"):
        read_audio_pairs(tmp_path / "lonely")


@pytest.mark.parametrize("name, content, message", [
    ("missing.wav", None, "no such file"),
    ("bad.wav", b"RIFF\x00\x00\x00\x00WAVEjunk", "not a readable audio file"),
    ("quiet.wav", "silent", "silent"),
])
def test_a_bad_query_sound_is_one_line_and_exit_2(audio_index, tmp_path, name, content, message):
    path = tmp_path / name
    if content == "silent":
        write_sound(path, np.zeros(8000, np.float32))
    elif content is not None:
        path.write_bytes(content)
    result = CliRunner().invoke(cli, ["--audio", str(path), "--index", str(audio_index)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: query sound {path}: ") and message in result.stderr
    assert result.stderr.count("\n") == 1
