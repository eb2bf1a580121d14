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
    "Index": "index", "Hit": "index",
    "BuildReport": "build",
    "ClipEncoder": "encoders", "load_encoder": "encoders", "ModelSpec": "models",
    "parse_query": "query", "QueryTerm": "query",
    "RetrievalError": "errors", "UsageError": "errors", "ModelLoadError": "errors",
    "IndexNotFoundError": "errors", "IndexFormatError": "errors",
    "ModelMismatchError": "errors", "IndexLockedError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
