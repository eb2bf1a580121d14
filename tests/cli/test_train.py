"""`retrieve train`: one focused test per option, each on a few renders and one short epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file
from support import write_shape_folder

from retrieval.cli import cli

QUICK = ["--epochs", "1", "--batch-size", "6", "--learning-rate", "1e-2", "--warmup-steps", "0",
         "--held-out", "0"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """18 renders with a Flickr captions file and a Karpathy JSON that puts 6 in `train`."""
    folder = write_shape_folder(tmp_path_factory.mktemp("train") / "shapes", seed=3, per_class=2)
    names = sorted(p.name for p in folder.glob("*.png"))
    captions = dict(line.split("#0\t") for line in (folder / "captions.tsv").read_text().splitlines())
    (folder / "karpathy.json").write_text(json.dumps({"images": [
        {"filename": name, "split": "train" if number < 6 else "test",
         "sentences": [{"raw": captions[name]}]} for number, name in enumerate(names)]}))
    return folder


def train(shapes: Path, output: Path, model: str, *options: str) -> dict:
    result = CliRunner().invoke(cli, ["train", str(shapes), "--captions", str(shapes / "captions.tsv"),
                                      "--output", str(output), "--model", model, *QUICK, *options,
                                      "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def weights(output: Path) -> dict:
    [file] = [p for p in output.glob("*.safetensors") if "state" not in p.name]
    return load_file(file)


def same_weights(first: Path, second: Path) -> bool:
    a, b = weights(first), weights(second)
    return a.keys() == b.keys() and all((a[name] == b[name]).all() for name in a)


@pytest.fixture(scope="module")
def baseline(shapes, tiny_model, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("baseline") / "tuned"
    train(shapes, output, tiny_model, "--train", "projections")
    return output


def test_the_same_run_twice_saves_the_same_weights(shapes, tiny_model, baseline, tmp_path):
    train(shapes, tmp_path / "again", tiny_model, "--train", "projections")
    assert same_weights(baseline, tmp_path / "again")  # so the differences below are the options'


def test_seed(shapes, tiny_model, baseline, tmp_path):
    train(shapes, tmp_path / "seeded", tiny_model, "--train", "projections", "--seed", "5")
    assert not same_weights(baseline, tmp_path / "seeded")


def test_weight_decay(shapes, tiny_model, baseline, tmp_path):
    train(shapes, tmp_path / "decayed", tiny_model, "--train", "projections", "--weight-decay", "5")
    assert not same_weights(baseline, tmp_path / "decayed")


def test_split_trains_on_one_split_of_a_karpathy_file(shapes, tiny_model, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(shapes), "--captions", str(shapes / "karpathy.json"),
                                      "--split", "train", "--output", str(tmp_path / "tuned"),
                                      "--model", tiny_model, *QUICK, "--train", "projections", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["pairs"] == 6


def test_train_and_freeze_choose_what_learns(shapes, tiny_model, tmp_path):
    every = train(shapes, tmp_path / "all", tiny_model, "--train", "all")["trainable_parameters"]
    projections = train(shapes, tmp_path / "p", tiny_model, "--train", "projections")["trainable_parameters"]
    no_image = train(shapes, tmp_path / "f", tiny_model, "--freeze", "image")["trainable_parameters"]
    assert 0 < projections < no_image < every
    frozen = weights(tmp_path / "f")
    untouched = weights(tmp_path / "p")  # projections only: the image tower's body is as it was
    body = [name for name in frozen if name.startswith("visual.") and "proj" not in name]
    assert body and all((frozen[name] == untouched[name]).all() for name in body)


def test_adapter_rank(shapes, tiny_model, tmp_path):
    rank = {r: train(shapes, tmp_path / f"r{r}", tiny_model, "--train", "adapters", "--adapter-rank",
                     str(r))["trainable_parameters"] for r in (2, 4)}
    assert 0 < rank[2] < rank[4]  # two low-rank factors per adapted layer, each wider


def test_device_reaches_the_model(shapes, tiny_model, tmp_path):
    assert train(shapes, tmp_path / "cpu", tiny_model, "--train", "projections", "--device", "cpu")
    result = CliRunner().invoke(cli, ["train", str(shapes), "--captions", str(shapes / "captions.tsv"),
                                      "--output", str(tmp_path / "o"), "--model", tiny_model,
                                      "--device", "bogus"])
    assert result.exit_code == 2 and "--device 'bogus' is not a device" in result.stderr
    assert len(result.stderr.splitlines()) == 1
