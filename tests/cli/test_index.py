"""`retrieve index`: one focused test per option that no other test file passes, each on a
handful of tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support import write_image
from support.clips import write_clip
from support.sounds import render_sound, write_sound
from support.tiny_clap import save_tiny_clap

from retrieval import Index
from retrieval.cli import cli


def index(*args: str | Path) -> dict:
    """`retrieve index ARGS --json`: its report."""
    result = CliRunner().invoke(cli, ["index", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def refused(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["index", *map(str, args)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1, result.stderr
    return result.exit_code, result.stderr


def indexed(index_dir: Path) -> list[str]:
    with Index.open(index_dir, readonly=True) as opened:
        return sorted(Path(hit.path).name for hit in opened.search("x", target="image", k=100))


@pytest.fixture
def folders(tmp_path) -> Path:
    root = tmp_path / "pictures"
    for number, folder in enumerate(["keep", "drafts", ".hidden"]):
        write_image(root / folder / f"{folder.strip('.')}.png", (60 * number, 90, 200))
    return root


def test_exclude_dir_leaves_a_folder_out_and_is_remembered(folders, tmp_path, tiny_model):
    index_dir = tmp_path / "index"
    index(folders, "--index", index_dir, "--model", tiny_model, "--exclude-dir", "drafts")
    assert indexed(index_dir) == ["keep.png"]
    index("--index", index_dir)  # a bare re-index walks the folder as it was told to
    assert indexed(index_dir) == ["keep.png"]


def test_include_hidden_indexes_hidden_folders_and_is_remembered(folders, tmp_path, tiny_model):
    index_dir = tmp_path / "index"
    index(folders, "--index", index_dir, "--model", tiny_model)
    assert indexed(index_dir) == ["drafts.png", "keep.png"]
    index(folders, "--index", index_dir, "--include-hidden")
    assert indexed(index_dir) == ["drafts.png", "hidden.png", "keep.png"]
    assert index("--index", index_dir)["removed"] == 0


def test_max_megapixels_skips_larger_images(tmp_path, tiny_model):
    write_image(tmp_path / "p" / "small.png", (10, 20, 30), size=(20, 20))
    write_image(tmp_path / "p" / "large.png", (10, 20, 30), size=(100, 100))
    report = index(tmp_path / "p", "--index", tmp_path / "index", "--model", tiny_model,
                   "--max-megapixels", "0.001")
    assert [Path(s["path"]).name for s in report["skipped"]] == ["large.png"]
    assert "megapixels" in report["skipped"][0]["reason"]
    assert indexed(tmp_path / "index") == ["small.png"]


def test_max_audio_seconds_skips_longer_sounds(tmp_path, tiny_model):
    rng = np.random.default_rng(0)
    write_sound(tmp_path / "s" / "short.wav", render_sound("red", "circle", rng, seconds=0.5))
    write_sound(tmp_path / "s" / "long.wav", render_sound("red", "circle", rng, seconds=2.0))
    clap = save_tiny_clap(tmp_path / "clap")
    report = index(tmp_path / "s", "--index", tmp_path / "index", "--model", tiny_model,
                   "--audio-model", f"clap:{clap}", "--max-audio-seconds", "1", "--quiet")
    assert [(Path(s["path"]).name, s["reason"].split(" (")[0]) for s in report["skipped"]] == [
        ("long.wav", "too long")]
    assert report["audio_encoded"] == 1


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """An 8 s video: a red circle for 4 s, then a cut to a blue square."""
    folder = tmp_path_factory.mktemp("clips")
    write_clip(folder / "cut.mp4", "mpeg4", "flac", [("red", "circle"), ("blue", "square")], seed=1)
    return folder


def test_max_video_seconds_skips_longer_videos(clip, tmp_path, tiny_model):
    report = index(clip, "--index", tmp_path / "index", "--model", tiny_model,
                   "--max-video-seconds", "5", "--quiet")
    assert [Path(s["path"]).name for s in report["skipped"]] == ["cut.mp4"]
    assert report["skipped"][0]["reason"].startswith("too long")


def test_scene_threshold_samples_a_frame_at_each_cut(clip, tmp_path, tiny_model):
    def video_vectors(*options: str) -> np.ndarray:
        index_dir = tmp_path / f"index{len(options)}"
        index(clip, "--index", index_dir, "--model", tiny_model, "--frame-rate", "0.2", *options,
              "--quiet")
        with Index.open(index_dir, readonly=True) as opened:
            assert opened.video_setting("scene_threshold") == (options[1] if options else "")
            return opened.store.all_vectors("video")[1]

    plain, with_cuts = video_vectors(), video_vectors("--scene-threshold", "0.3")
    assert plain.shape == with_cuts.shape
    assert not np.allclose(plain, with_cuts)  # the cut's frame joins the second segment's pool


def test_int8_encodes_with_8_bit_weights_on_the_cpu(tmp_path, folders, tiny_model):
    index(folders, "--index", tmp_path / "float", "--model", tiny_model, "--device", "cpu")
    index(folders, "--index", tmp_path / "int8", "--model", tiny_model, "--device", "cpu", "--int8")
    with Index.open(tmp_path / "float", readonly=True) as exact_index:
        exact = exact_index.store.all_vectors("image")[1]
    with Index.open(tmp_path / "int8", readonly=True) as quantised_index:
        quantised = quantised_index.store.all_vectors("image")[1]
    assert not np.array_equal(exact, quantised)
    assert np.abs(exact - quantised).max() < 0.05
    code, error = refused(folders, "--index", tmp_path / "gpu", "--model", tiny_model,
                          "--device", "cuda:0", "--int8")
    assert code == 2 and "--int8" in error


def test_device_reaches_the_encoder(tmp_path, folders, tiny_model):
    code, error = refused(folders, "--index", tmp_path / "index", "--model", tiny_model,
                          "--device", "bogus")
    assert code == 1 and "bogus" in error
