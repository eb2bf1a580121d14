"""Generated captions scored against references with the COCO caption scorer (pycocoevalcap):
BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D, as COCO reports it).

The scorer tokenizes with Stanford's PTB tokenizer and computes METEOR, both in Java. Without
a `java` on the PATH, captions are tokenized in Python the same simple way (lower case,
punctuation split off and dropped; PTB differs on contractions and rarer symbols) and METEOR
is skipped; the result says so.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO

from ..core.errors import ModelLoadError, UsageError

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
NO_JAVA = ("skipped: METEOR needs Java and no `java` is on the PATH; install a Java runtime "
           "(e.g. apt-get install default-jre-headless) to score it")
_WORDS = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]+")


class CaptionScores(dict):
    """Metric name -> corpus score, in METRICS order; `skipped` holds each metric asked for but
    left out, with why and what to do."""

    def __init__(self, scores: dict[str, float], skipped: dict[str, str]) -> None:
        super().__init__(scores)
        self.skipped = skipped


def score_captions(candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                   metrics: Sequence[str] = METRICS) -> CaptionScores:
    """Corpus scores of one candidate caption per item against that item's reference captions.

    Keys are item ids (any hashable); both mappings must hold the same ids. BLEU, METEOR and
    ROUGE-L lie in [0, 1]; CIDEr is scaled by 10 as in COCO and can exceed 1. `metrics` picks
    some of METRICS (METEOR alone takes seconds: a Java process loading its paraphrase tables).
    """
    _check(candidates, references, metrics)
    scorers = _scorers()
    ids = list(candidates)
    tokenized = _tokenized({**{("candidate", i): [candidates[i]] for i in ids},
                            **{("reference", i): list(references[i]) for i in ids}})
    results = {i: tokenized["candidate", i] for i in ids}
    truths = {i: tokenized["reference", i] for i in ids}
    scores: dict[str, float] = {}
    skipped: dict[str, str] = {}
    if any(name.startswith("BLEU") for name in metrics):
        bleu, _ = scorers["bleu"].compute_score(truths, results, verbose=0)
        scores.update({f"BLEU-{n}": float(value) for n, value in enumerate(bleu, 1)})
    if "METEOR" in metrics:
        if shutil.which("java") is None:
            skipped["METEOR"] = NO_JAVA
        else:
            scores["METEOR"] = float(scorers["meteor"]().compute_score(truths, results)[0])
    if "ROUGE-L" in metrics:
        scores["ROUGE-L"] = float(scorers["rouge"]().compute_score(truths, results)[0])
    if "CIDEr" in metrics:
        scores["CIDEr"] = float(scorers["cider"]().compute_score(truths, results)[0])
    return CaptionScores({name: scores[name] for name in METRICS if name in metrics and name in scores},
                         skipped)


def _check(candidates: Mapping, references: Mapping, metrics: Sequence[str]) -> None:
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise UsageError(f"metrics must be some of {', '.join(METRICS)}, not {', '.join(unknown) or 'none'}")
    if not candidates:
        raise UsageError("no candidate captions to score")
    missing = [key for key in candidates if key not in references]
    extra = [key for key in references if key not in candidates]
    if missing or extra:
        example = (f"{missing[0]!r} has no references" if missing
                   else f"{extra[0]!r} has references but no candidate")
        raise UsageError(f"candidates and references must cover the same items: {example} "
                         f"({len(missing)} without references, {len(extra)} without a candidate)")
    for key, texts in references.items():
        if isinstance(texts, str) or not texts:
            raise UsageError(f"the references of {key!r} must be a non-empty list of captions")
    for key, text in candidates.items():
        if not isinstance(text, str):
            raise UsageError(f"the candidate of {key!r} must be one caption (a string)")


def _scorers() -> dict:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as error:
        raise ModelLoadError("caption scores need pycocoevalcap: "
                             "pip install 'retrieval[captions]'") from error
    return {"bleu": Bleu(4), "meteor": Meteor, "rouge": Rouge, "cider": Cider}


def _tokenized(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """Every caption lower-cased and tokenized with punctuation dropped, as COCO's evaluation does."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, PTBTokenizer

    if shutil.which("java") is None:
        return {key: [" ".join(word for word in _WORDS.findall(text.lower()) if word not in PUNCTUATIONS)
                      for text in texts] for key, texts in captions.items()}
    # One caption per line: any line break inside one would shift every caption after it.
    lines = {key: [{"caption": " ".join(text.split())} for text in texts] for key, texts in captions.items()}
    with _java_stderr() as stderr:
        try:
            tokenized = PTBTokenizer().tokenize(lines)
        except OSError as error:  # it writes a scratch file beside itself, in site-packages
            raise ModelLoadError(f"the caption scorer's tokenizer could not run ({error}); "
                                 "pycocoevalcap must be installed where it may write files") from error
        if any(len(tokenized.get(key, ())) != len(texts) for key, texts in captions.items()):
            raise ModelLoadError("the caption scorer's Java tokenizer failed: "
                                 f"{_last_line(stderr) or 'it wrote no tokens'}")
    return tokenized


@contextmanager
def _java_stderr() -> Iterator[IO[str]]:
    """The tokenizer's Java process chats on stderr (our own file descriptor 2): catch it."""
    with tempfile.TemporaryFile("w+") as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            yield caught
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _last_line(file: IO[str]) -> str:
    file.seek(0)
    lines = [line.strip() for line in file.read().splitlines() if line.strip()]
    return lines[-1] if lines else ""
