"""Video search end to end: synthetic clips whose 4 s segments each show one shape class with its
sound, in two containers, indexed as fused segment vectors; a caption or a video query finds the
right clip at the right moment, through the API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.clips import SEGMENT, write_clip
from support.sounds import write_captioned_sounds
from support.tiny_model import CLASSES, caption_for

from retrieval import Index
from retrieval.cli import cli
from retrieval.core.errors import UsageError
from retrieval.train.audio import AudioTrainingOptions

# clip name -> container settings and the class each 4 s segment shows and sounds like
CLIPS = {
    "first.mp4": ("libx264", "aac", [("red", "circle"), ("blue", "square"), ("green", "triangle")]),
    "second.webm": ("libvpx-vp9", "libopus", [("green", "square"), ("red", "triangle"), ("blue", "circle")]),
}


@pytest.fixture(scope="module")
def video_index(tmp_path_factory, trained_model) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("videos")
    folder = root / "clips"
    folder.mkdir()
    for seed, (name, (video_codec, audio_codec, classes)) in enumerate(CLIPS.items()):
        write_clip(folder / name, video_codec, audio_codec, classes, seed)
    with Index.open(root / "index", model=trained_model, create=True) as index:
        index.train_audio(write_captioned_sounds(root / "pairs"), AudioTrainingOptions(
            epochs=15, width=8, n_mels=32, learning_rate=3e-3, held_out=0), reindex=False)
        report = index.add(folder)
        assert report.skipped == [] and report.video_encoded == 6  # 12 s in 4 s segments, twice
    return root / "index", folder


def truth() -> list[tuple[str, str, float]]:
    """(caption, clip, segment start) for every segment of every clip."""
    return [(caption_for(*cls), name, SEGMENT * number)
            for name, (_, _, classes) in CLIPS.items() for number, cls in enumerate(classes)]


def test_a_caption_finds_its_clip_at_its_moment(video_index):
    index_dir, folder = video_index
    with Index.open(index_dir, readonly=True) as index:
        for caption, clip, start in truth():
            hit = index.search(caption, target="video", k=1)[0]
            assert (Path(hit.path).name, hit.modality) == (clip, "video"), caption
            assert abs(hit.metadata["start"] - start) <= SEGMENT, (caption, hit.metadata)
            assert hit.uri == f"{folder / clip}#t={hit.metadata['start']:g},{hit.metadata['end']:g}"
        # auto: an index of videos answers words with video moments
        assert index.search("a blue square", k=1)[0].modality == "video"
        hits = index.search("a red circle", target="video", k=5)
        assert len(hits) == 2 and len({h.path for h in hits}) == 2  # one hit per clip


def test_a_video_query_and_the_command_line(video_index, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # lines are cut to the terminal's width; tmp paths are long
    index_dir, folder = video_index
    query = write_clip(tmp_path / "query.mkv", "mpeg4", "flac", [("blue", "square")], seed=9)
    with Index.open(index_dir, readonly=True) as index:
        hit = index.search(video=query, target="video", k=1)[0]
    assert Path(hit.path).name == "first.mp4" and hit.metadata["start"] == 4.0
    result = CliRunner().invoke(cli, ["a green triangle", "--target", "video", "--index", str(index_dir),
                                      "--json", "-k", "1"])
    assert result.exit_code == 0, result.output
    [found] = json.loads(result.stdout)
    assert Path(found["path"]).name == "first.mp4" and found["metadata"]["start"] == 8.0
    by_video = CliRunner().invoke(cli, ["--video", str(query), "--index", str(index_dir), "-k", "1"])
    assert by_video.exit_code == 0 and "first.mp4#t=4,8" in by_video.stdout
    with Index.open(index_dir, readonly=True) as index:  # a video is an entry too, its best segment a part
        [entry] = index.search_entries("a red circle", k=1)
        assert set(entry.parts) == {"video"} and entry.parts["video"].metadata["start"] == 0.0
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    refused = CliRunner().invoke(cli, ["--video", str(bad), "--index", str(index_dir)])
    assert refused.exit_code == 2 and f"query video {bad}: not a readable video" in refused.stderr


def test_videos_update_incrementally_and_bad_ones_are_skipped(video_index, tmp_path):
    import shutil

    index_dir, folder = video_index
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    (folder / "broken.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(200))
    try:
        with Index.open(copy) as index:
            report = index.add(folder)
            assert report.unchanged == 2 and report.video_encoded == 0
            assert [(Path(s.path).name, s.reason.split(" (")[0]) for s in report.skipped] == [
                ("broken.webm", "not a readable video file")]
            assert index.remove(folder / "second.webm") == 1
            assert index.count("video") == 3 and len(index.vectors("video")) == 3
    finally:
        (folder / "broken.webm").unlink()


def test_video_sampling_and_default_fusion_are_recorded_by_the_index(tmp_path, tiny_model):
    folder = tmp_path / "clips"
    folder.mkdir()
    write_clip(folder / "a.mp4", "libx264", "aac", [("red", "circle"), ("blue", "square")], seed=3)
    runner = CliRunner()
    index_dir = str(tmp_path / "index")
    built = runner.invoke(cli, ["index", str(folder), "--index", index_dir, "--model", tiny_model,
                                "--frame-rate", "2", "--temporal", "max", "--fusion", "sum", "--quiet"])
    assert built.exit_code == 0, built.output
    with Index.open(index_dir) as index:
        assert [index.video_setting(k) for k in ("frame_rate", "temporal")] == ["2.0", "max"]
        assert index.store.get_info("fusion") == "sum"
        before = index.store.all_vectors("video")[1]
        with pytest.raises(UsageError, match="holds videos sampled with other settings"):
            index.configure(frame_rate=4)
        index.remove(folder)
        index.configure(temporal="mean")
        index.add(folder)
        assert not np.allclose(index.store.all_vectors("video")[1], before)  # mean pools otherwise
        index.configure(fusion="rrf")  # the entry fusion may change at any time


def test_a_trained_temporal_encoder_pools_the_segments(video_index, tmp_path):
    """Train a Bi-LSTM over frame vectors on captioned clips; the index's videos are re-encoded
    with it, recorded by identity, and still found at the right moment."""
    import shutil

    index_dir, folder = video_index
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for number, (color, shape) in enumerate(CLASSES):
        write_clip(pairs / f"c{number}.mkv", "mpeg4", "flac", [(color, shape)], seed=20 + number)
        (pairs / f"c{number}.txt").write_text(caption_for(color, shape) + "\n")
    result = CliRunner().invoke(cli, ["train-temporal", str(pairs), "--index", str(copy), "--held-out", "0",
                                      "--epochs", "40", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["identity"].startswith("bilstm:") and report["examples"] == 9
    with Index.open(copy, readonly=True) as index:
        assert index.video_setting("temporal") == report["identity"]
        assert index.count("video") == 6  # re-encoded from the folders indexed before
        found = [(Path(index.search(caption, target="video", k=1)[0].path).name, clip)
                 for caption, clip, _ in truth()]
    assert sum(a == b for a, b in found) >= 5, found
    assert (copy / f"temporal_bilstm_{report['identity'].split(':')[1]}.safetensors").is_file()
