"""The COCO caption scores (pycocoevalcap): references score best, wrong captions lower, METEOR
skipped with a note without Java, bad input refused in one line."""

from __future__ import annotations

import shutil

import pytest

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

