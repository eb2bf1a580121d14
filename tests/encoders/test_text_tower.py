"""The torch-free text path: BPE tokens and text vectors equal open_clip's, and a text query
from the command line never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval import Index
from retrieval.encoders.clip import load_encoder
from retrieval.encoders.spec import ModelSpec
from retrieval.encoders.text_tower import TOWER_FILE, export_text_tower, load_text_tower
from retrieval.encoders.tokenizer import ClipTokenizer

TEXTS = ["a dog in the park", "", "x", "two " * 100, "ünïcödé 猫 text", "it's 3.14 &amp; <b>",
         "CAFÉ's naïve co-op", "emoji 😀👍", "  spaced\tout\n", "<end_of_text> mid", "a" * 300]


@pytest.fixture(scope="module")
def tokenizers():
    return ClipTokenizer(), open_clip.get_tokenizer("ViT-B-32")


def test_tokens_equal_open_clip(tokenizers):
    ours, theirs = tokenizers
    np.testing.assert_array_equal(ours(TEXTS), theirs(TEXTS).numpy())


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=80))
def test_tokens_equal_open_clip_on_any_text(tokenizers, text):
    ours, theirs = tokenizers
    np.testing.assert_array_equal(ours([text]), theirs([text]).numpy())


@pytest.fixture(scope="module")
def quick_gelu_model(tmp_path_factory, tiny_model) -> str:
    """The tiny model's config with QuickGELU, as OpenAI's CLIP models use."""
    source = Path(tiny_model.removeprefix("local-dir:"))
    folder = tmp_path_factory.mktemp("quick-gelu")
    config = json.loads((source / "open_clip_config.json").read_text())
    config["model_cfg"]["quick_gelu"] = True
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    for weights in source.glob("*.safetensors"):
        (folder / weights.name).write_bytes(weights.read_bytes())
    return f"local-dir:{folder}"


@pytest.mark.parametrize("which", ["tiny_model", "quick_gelu_model"])
def test_numpy_tower_equals_torch(which, request, tmp_path):
    encoder = load_encoder(ModelSpec.parse(request.getfixturevalue(which)), "cpu")
    assert export_text_tower(encoder, tmp_path)
    tower = load_text_tower(tmp_path, encoder.spec.identity)
    assert tower.config.activation == ("quick_gelu" if which == "quick_gelu_model" else "gelu")
    assert np.abs(tower.encode_texts(TEXTS) - encoder.encode_texts(TEXTS)).max() < 1e-5
    assert load_text_tower(tmp_path, "some-other-model") is None


def test_a_damaged_tower_falls_back_to_the_model(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    with Index.open(index_dir, model=tiny_model, create=True) as index:
        index.add(photo_folder)
        expected = [h.id for h in index.search("a red picture")]
    assert (index_dir / TOWER_FILE).is_file()
    (index_dir / TOWER_FILE).write_bytes(b"garbage")
    with Index.open(index_dir, readonly=True) as index:
        assert [h.id for h in index.search("a red picture")] == expected


def test_cli_text_query_does_not_import_torch(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    with Index.open(index_dir, model=tiny_model, create=True) as index:
        index.add(photo_folder)
        expected = [h.id for h in index.search("a red picture", k=3)]
    probe = ("import sys, json; from retrieval.cli import main; sys.argv = ['retrieve', "
             f"'a red picture', '--index', {str(index_dir)!r}, '--json', '-k', '3']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print(json.dumps(sorted(m for m in ('torch', 'open_clip') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    hits_json, imported = done.stdout.rsplit("\n", 2)[:2]
    assert json.loads(imported) == []
    assert [h["id"] for h in json.loads(hits_json)] == expected
