"""Retrieval by meaning, end to end: a tiny CLIP trained for seconds on rendered shapes finds
held-out renders by their caption and their caption by the render, through API and CLI."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from support.tiny_model import CLASSES, caption_for

from retrieval import Index
from retrieval.cli import cli


def class_of(path: str) -> str:
    color, shape, _ = Path(path).stem.split("_")
    return caption_for(color, shape)


def recall_at_1(pairs: list[tuple[str, str]]) -> float:
    return sum(expected == found for expected, found in pairs) / len(pairs)


def test_text_to_image_and_image_to_text_through_the_api(tmp_path, shape_folder, trained_model):
    with Index.open(tmp_path / "index", model=trained_model, create=True) as index:
        report = index.add(shape_folder)
        assert report.images_encoded == 27 and report.skipped == []
        text_to_image = [(caption_for(c, s), class_of(index.search(caption_for(c, s), k=1)[0].uri))
                         for c, s in CLASSES]
        image_to_text = [(class_of(str(path)), index.search(image=path, target="text", k=1)[0].text)
                         for path in sorted(shape_folder.glob("*.png"))]
    assert recall_at_1(text_to_image) >= 0.9, text_to_image
    assert recall_at_1(image_to_text) >= 0.9, image_to_text


def test_text_to_image_and_image_to_text_through_the_cli(tmp_path, shape_folder, trained_model):
    index_dir = str(tmp_path / "index")
    runner = CliRunner()
    built = runner.invoke(cli, ["index", str(shape_folder), "--index", index_dir,
                                "--model", trained_model, "--quiet"])
    assert built.exit_code == 0, built.output

    def top(*args: str) -> dict:
        result = runner.invoke(cli, [*args, "--index", index_dir, "--json", "-k", "1"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)[0]

    text_to_image = [(caption_for(c, s), class_of(top(caption_for(c, s))["uri"]))
                     for c, s in CLASSES]
    image_to_text = [(class_of(str(path)), top("--image", str(path))["text"])
                     for path in sorted(shape_folder.glob("*.png"))]
    assert recall_at_1(text_to_image) >= 0.9, text_to_image
    assert recall_at_1(image_to_text) >= 0.9, image_to_text
