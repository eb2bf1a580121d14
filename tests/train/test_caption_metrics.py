"""The COCO caption scores (pycocoevalcap): references score best, wrong captions lower, METEOR
skipped with a note without Java, bad input refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.core.errors import UsageError
from retrieval.train import caption_metrics
from retrieval.train.caption_metrics import METRICS, score_captions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")

# -- scores -------------------------------------------------------------------------------------

REFERENCES = {
    "dog": ["a brown dog runs across the green grass", "a dog running on a lawn"],
    "beach": ["two children build a sandcastle on the beach", "kids playing in the sand"],
    "bike": ["a man rides his bike down a steep hill", "a cyclist going downhill"],
    17: ["a woman in a red coat waits for the bus", "a woman standing at a bus stop"],
}


def firsts() -> dict:
    return {key: texts[0] for key, texts in REFERENCES.items()}


@needs_java
@pytest.mark.slow  # a Java start of its own; the evaluate --captioning test scores every metric
def test_a_reference_caption_scores_best_on_every_metric():
    perfect = score_captions(firsts(), REFERENCES)
    assert list(perfect) == list(METRICS) and perfect.skipped == {}
    for name in METRICS:
        if name != "CIDEr":
            assert perfect[name] == pytest.approx(1.0, abs=1e-6), name
    # CIDEr-D is 10 times a mean cosine with each reference: the second ones differ.
    assert 0 < perfect["CIDEr"] < 10


def test_wrong_captions_score_lower():
    cheap = [name for name in METRICS if name != "METEOR"]  # METEOR starts a Java process each time
    perfect = score_captions(firsts(), REFERENCES, metrics=cheap)
    half = score_captions({**firsts(), "dog": "a man rides his bike", 17: "two children"}, REFERENCES,
                          metrics=cheap)
    wrong = score_captions({key: "an empty room" for key in REFERENCES}, REFERENCES, metrics=cheap)
    for name in cheap:
        assert perfect[name] > half[name] > wrong[name], name
    assert wrong["CIDEr"] == 0 and wrong["BLEU-1"] < 0.2


def test_without_java_meteor_is_skipped_with_a_note_and_the_rest_agree(monkeypatch):
    candidates = {**firsts(), "beach": "Two children, building a sand-castle!"}
    with_java = score_captions(candidates, REFERENCES, metrics=["BLEU-4", "ROUGE-L", "CIDEr"]) \
        if shutil.which("java") else None
    monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
    without = score_captions(candidates, REFERENCES)
    assert "METEOR" not in without and list(without) == [name for name in METRICS if name != "METEOR"]
    assert "Java" in without.skipped["METEOR"] and "\n" not in without.skipped["METEOR"]
    if with_java is not None:
        for name, value in with_java.items():
            assert without[name] == pytest.approx(value), name


@pytest.mark.parametrize("candidates, references, metrics, message", [
    ({"a": "x"}, {"b": ["x"]}, METRICS, "'a' has no references"),
    ({"a": "x"}, {"a": ["x"], "b": ["y"]}, METRICS, "'b' has references but no candidate"),
    ({}, {}, METRICS, "no candidate captions"),
    ({"a": "x"}, {"a": []}, METRICS, "references of 'a' must be a non-empty list"),
    ({"a": "x"}, {"a": "x"}, METRICS, "references of 'a' must be a non-empty list"),
    ({"a": ["x"]}, {"a": ["x"]}, METRICS, "candidate of 'a' must be one caption"),
    ({"a": "x"}, {"a": ["x"]}, ["SPICE"], "metrics must be some of BLEU-1"),
])
def test_mismatched_input_is_refused_in_one_line(candidates, references, metrics, message):
    with pytest.raises(UsageError, match=message) as raised:
        score_captions(candidates, references, metrics)
    assert "\n" not in str(raised.value)



# -- evaluate --captioning ------------------------------------------------------------------------

def test_evaluate_captioning_scores_the_tiny_cocas_captions(trained_model, trained_coca, tmp_path):
    # The CLI's `evaluate --captioning` runs in README's blocks (tests/cli/test_readme.py).
    from support import write_shape_folder

    from retrieval import CaptionOptions, ModelSpec, evaluate_captioning
    from retrieval.encoders.clip import load_encoder

    shapes = write_shape_folder(tmp_path / "shapes", seed=31, per_class=2)
    found = evaluate_captioning(shapes, shapes / "captions.tsv", model=ModelSpec.parse(trained_model),
                                caption_model=ModelSpec.parse(trained_coca),
                                options=CaptionOptions(max_length=8), device="cpu").to_dict()
    assert found["images"] == found["references"] == 18 and found["caption_model"] == trained_coca
    expected = [name for name in METRICS if shutil.which("java") or name != "METEOR"]
    assert list(found["scores"]) == expected
    # The renders' captions have three words ("a red circle"): no 4-grams, so BLEU-4 says nothing.
    assert found["scores"]["BLEU-3"] >= 0.8 and found["images_per_second"] > 0
    # Each image's caption, against the references of another image: lower on every metric.
    names = sorted(found["captions"])
    truths = {name: [line.split("\t")[1] for line in (shapes / "captions.tsv").read_text().splitlines()
                     if line.startswith(Path(name).name + "#")] for name in names}
    shifted = score_captions({name: found["captions"][names[i - 3]] for i, name in enumerate(names)}, truths,
                             metrics=["BLEU-3", "CIDEr"])
    assert shifted["BLEU-3"] < found["scores"]["BLEU-3"] and shifted["CIDEr"] < found["scores"]["CIDEr"]
    # CLIP-score: the mean cosine of each image with its caption, above that with another's.
    encoder = load_encoder(ModelSpec.parse(trained_model), "cpu")
    images = encoder.encode_images([Image.open(name).convert("RGB") for name in names])
    captions = encoder.encode_texts([found["captions"][name] for name in names])
    assert found["clip_score"] == pytest.approx(float(np.mean(np.sum(images * captions, axis=1))), abs=1e-4)
    assert float(np.mean(np.sum(images * np.roll(captions, 3, axis=0), axis=1))) < found["clip_score"]
