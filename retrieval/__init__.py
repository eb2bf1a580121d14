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
    # The building blocks a tool measures or reuses on its own (scripts/benchmark.py does both).
    "MEMORY_INDEX_TYPES": "core.types", "INDEX_TYPES": "core.types",
    "default_workers": "core.concurrency", "prefetch_map": "core.concurrency",
    "load_image": "media.images", "CAPTION_FILE_NAMES": "media.captions",
    "walk_sources": "media.corpus", "read_items": "media.corpus",
    "OnnxTextEncoder": "encoders.onnx_towers", "load_text_tower": "encoders.onnx_towers",
    "export_towers": "encoders.onnx_export",
    "Store": "storage.store", "NewItem": "storage.store",
    "VectorIndex": "storage.vectors", "SearchKnobs": "storage.vectors",
    "OnDiskIndex": "storage.ondisk", "build_on_disk": "storage.ondisk",
    "connect_ray": "build.ray",
    "OnnxImageEncoder": "encoders.onnx_towers",
    "similar_pairs": "query.duplicates", "connected_groups": "query.duplicates",
}
_RENAMED = {"connect_ray": "connect"}  # exported under a name that says what it connects to

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), _RENAMED.get(name, name))
