"""`retrieve evaluate` and `evaluate-entries`: one focused test per option no other test passes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import write_shape_folder

from retrieval.cli import cli


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """18 renders with a Flickr captions file and a Karpathy JSON that puts 6 in `test`."""
    folder = write_shape_folder(tmp_path_factory.mktemp("evaluate") / "shapes", seed=4, per_class=2)
    captions = dict(line.split("#0\t") for line in (folder / "captions.tsv").read_text().splitlines())
    (folder / "karpathy.json").write_text(json.dumps({"images": [
        {"filename": name, "split": "test" if number < 6 else "train", "sentences": [{"raw": text}]}
        for number, (name, text) in enumerate(sorted(captions.items()))]}))
    return folder


def evaluate(shapes: Path, model: str, *options: str, captions: str = "captions.tsv") -> dict:
    result = CliRunner().invoke(cli, ["evaluate", str(shapes), "--captions", str(shapes / captions),
                                      "--model", model, "--quiet", "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_split_measures_one_split_of_a_karpathy_file(shapes, tiny_model):
    assert evaluate(shapes, tiny_model, "--split", "test", captions="karpathy.json")["images"] == 6


def test_index_type_names_the_faiss_index_measured(shapes, tiny_model):
    assert evaluate(shapes, tiny_model)["kind"] == "flat"
    assert evaluate(shapes, tiny_model, "--index-type", "hnsw")["kind"] == "hnsw"


def test_depth_limits_the_ranks_known_through_the_index(shapes, tiny_model):
    deep, shallow = evaluate(shapes, tiny_model), evaluate(shapes, tiny_model, "--depth", "10")
    assert (deep["depth"], shallow["depth"]) == (18, 10)  # never more than the images
    for direction, scores in deep["indexed"].items():
        median = scores["median_rank"]
        assert shallow["indexed"][direction]["median_rank"] == (median if median <= 10 else None)
        capped = shallow["indexed"][direction]  # a mean rank, or a lower bound where some are past
        assert (capped["mean_rank"] is None) == (capped["mean_rank_at_least"] is not None) \
            == (capped["past_depth"] > 0)
    text = deep["indexed"]["text->image"]  # as deep as the images: every caption's image is ranked
    assert text["past_depth"] == 0 and 1 <= text["mean_rank"] <= 18  # once always null


def test_pretrained_and_device_reach_the_model(shapes, tiny_model):
    for options, culprit in ((["--model", "ViT-B-32", "--pretrained", "no-such-tag"], "no-such-tag"),
                             (["--model", tiny_model, "--device", "bogus"], "bogus")):
        result = CliRunner().invoke(cli, ["evaluate", str(shapes), "--captions",
                                          str(shapes / "captions.tsv"), *options])
        assert result.exit_code in (1, 2) and culprit in result.stderr, result.output
        assert len(result.stderr.splitlines()) == 1


def test_evaluate_entries_depth_ranks_that_many_entries(tmp_path, tiny_model):
    """30 text entries answered by the wrong ones: an untrained model ranks them anywhere."""
    for number in range(30):
        (tmp_path / "entries" / f"e{number}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "entries" / f"e{number}.txt").write_text(f"entry number {number}\n")
    (tmp_path / "queries.tsv").write_text("".join(f"entry number {n}\tentries/e{(n + 7) % 30}\n"
                                                  for n in range(30)))
    runner = CliRunner()
    built = runner.invoke(cli, ["index", str(tmp_path / "entries"), "--index", str(tmp_path / "index"),
                                "--model", tiny_model, "--quiet"])
    assert built.exit_code == 0, built.output

    def medians(depth: str) -> dict:
        result = runner.invoke(cli, ["evaluate-entries", str(tmp_path / "queries.tsv"), "--index",
                                     str(tmp_path / "index"), "--depth", depth, "--json"])
        assert result.exit_code == 0, result.output
        return {name: scores["median_rank"] for name, scores in json.loads(result.stdout).items()}

    deep, shallow = medians("50"), medians("10")
    assert deep.keys() == shallow.keys() and deep["text"] is not None
    assert all(shallow[name] == (rank if rank <= 10 else None) for name, rank in deep.items())
    assert any(rank > 10 for rank in deep.values())  # so depth 10 leaves some unranked


@pytest.fixture
def without_java(monkeypatch):
    """No `java` on the PATH: METEOR (a Java process of seconds) is skipped with its note. Scoring
    METEOR is proven by tests/train/test_caption_metrics.py; these tests prove options reach the writer."""
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs:
                        None if name == "java" else which(name, *args, **kwargs))


def captioning(shapes: Path, tiny_model: str, *options: str) -> dict:
    """`retrieve evaluate --captioning --json` of `shapes`' captions, scored under `tiny_model`."""
    result = CliRunner().invoke(cli, ["evaluate", str(shapes), "--captions", str(shapes / "captions.tsv"),
                                      "--captioning", "--model", tiny_model, "--device", "cpu", "--json",
                                      *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_captioning_top_p_and_max_length_reach_the_caption_writer(shapes, tiny_model, tiny_coca,
                                                                  without_java):
    found = captioning(shapes, tiny_model, "--caption-model", tiny_coca, "--caption-method", "top-p",
                       "--caption-top-p", "0.5", "--caption-max-length", "2")
    assert found["caption_model"] == tiny_coca and found["method"] == "top-p 0.5, up to 2 tokens"
    assert found["images"] == 18


def test_captioning_beam_width_reaches_the_caption_writer(shapes, tiny_model, tiny_coca, without_java):
    found = captioning(shapes, tiny_model, "--caption-model", tiny_coca, "--caption-beam-width", "2",
                       "--caption-max-length", "2")
    assert found["method"] == "beam width 2, up to 2 tokens"


def test_captioning_caption_pretrained_names_the_weights_to_load(shapes, tiny_model, tmp_path):
    missing = tmp_path / "no-such-checkpoint.pt"
    result = CliRunner().invoke(cli, ["evaluate", str(shapes), "--captions", str(shapes / "captions.tsv"),
                                      "--captioning", "--model", tiny_model,
                                      "--caption-model", "coca_ViT-B-32",
                                      "--caption-pretrained", str(missing)])
    assert result.exit_code == 1 and f"coca_ViT-B-32@{missing}" in result.stderr, result.output
    assert len(result.stderr.splitlines()) == 1
