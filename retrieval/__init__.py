"""Cross-modal retrieval: embed images and texts with open_clip, search them with FAISS.

    from retrieval import Index
    with Index.open("indexes/photos", create=True) as index:
        index.add("~/Pictures", captions=["captions.tsv"])
        for hit in index.search("a dog in the park", k=5):
            print(hit.score, hit.uri, hit.text)

Names are imported lazily so `retrieve` starts without loading torch until it must.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Index": "index", "Hit": "core.types",
    "BuildReport": "build.report",
    "ClipEncoder": "encoders.clip", "load_encoder": "encoders.clip", "ModelSpec": "encoders.spec",
    "parse_query": "query.parse", "QueryTerm": "query.parse",
    "TrainingOptions": "train.clip", "AudioTrainingOptions": "train.audio",
    "FusionTrainingOptions": "train.fusion",
    "Captioner": "encoders.captioner", "load_captioner": "encoders.captioner",
    "CaptionOptions": "encoders.caption_spec", "caption_model_spec": "encoders.caption_spec",
    "score_captions": "train.caption_metrics", "evaluate_captioning": "train.captioning",
    "RetrievalError": "core.errors", "UsageError": "core.errors", "ModelLoadError": "core.errors",
    "IndexNotFoundError": "core.errors", "IndexFormatError": "core.errors",
    "ModelMismatchError": "core.errors", "IndexLockedError": "core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
