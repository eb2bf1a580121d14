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
    assert code == 2 and "--device 'bogus' is not a device" in error and "weights" not in error
    assert len(error.strip().splitlines()) == 1
    code, error = refused(folders, "--index", tmp_path / "index", "--model", tiny_model,
                          "--device", "cuda:7")
    assert code == 2 and "no CUDA GPU" in error


def test_follow_external_links_indexes_what_links_lead_to_outside_the_sources(tmp_path, tiny_model):
    outside = write_image(tmp_path / "elsewhere" / "far.png", (30, 200, 30))
    write_image(tmp_path / "src" / "near.png", (200, 30, 30))
    (tmp_path / "src" / "link.png").symlink_to(outside)
    index(tmp_path / "src", "--index", tmp_path / "kept", "--model", tiny_model, "--quiet")
    assert indexed(tmp_path / "kept") == ["near.png"]
    index(tmp_path / "src", "--index", tmp_path / "followed", "--model", tiny_model, "--quiet",
          "--follow-external-links")
    assert indexed(tmp_path / "followed") == ["link.png", "near.png"]


def generated_captions(index_dir: Path) -> dict[str, str]:
    """image -> how its generated caption was written (`caption_method`)."""
    with Index.open(index_dir, readonly=True) as opened:
        return {hit.metadata["image"]: hit.metadata["caption_method"]
                for hit in opened.search("a", target="text", k=100)}


def test_caption_method_top_p_and_recaption_choose_how_captions_are_written(tmp_path, tiny_model, tiny_coca):
    shapes = tmp_path / "shapes"
    for number, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        write_image(shapes / f"s{number}.png", colour)
    build = ("--index", tmp_path / "index", "--model", tiny_model, "--caption", "--caption-model", tiny_coca,
             "--caption-max-length", "2", "--quiet")
    index(shapes, *build, "--caption-method", "top-p", "--caption-top-p", "0.5")
    assert set(generated_captions(tmp_path / "index").values()) == {"top-p 0.5, up to 2 tokens"}
    # Another writer keeps the captions written unless --recaption asks to replace them.
    index(shapes, *build, "--caption-method", "beam", "--caption-beam-width", "2")
    assert set(generated_captions(tmp_path / "index").values()) == {"top-p 0.5, up to 2 tokens"}
    index(shapes, *build, "--caption-method", "beam", "--caption-beam-width", "2", "--recaption")
    written = generated_captions(tmp_path / "index")
    assert len(written) == 2 and set(written.values()) == {"beam width 2, up to 2 tokens"}


def test_caption_pretrained_names_the_weights_to_load(tmp_path, folders, tiny_model):
    missing = tmp_path / "no-such-checkpoint.pt"
    code, error = refused(folders, "--index", tmp_path / "index", "--model", tiny_model, "--caption",
                          "--caption-model", "coca_ViT-B-32", "--caption-pretrained", missing)
    assert code == 1 and f"coca_ViT-B-32@{missing}" in error
