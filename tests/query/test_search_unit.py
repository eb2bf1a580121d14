"""The Searcher over a hand-made store and its vectors, no model: nearest items by vector or by
an item's own vector, filters, a best window per sound, and hits hydrated from SQLite."""

from __future__ import annotations

import numpy as np
import pytest
from support.vectors import unit_vector as unit

from retrieval.context import IndexContext
from retrieval.core.errors import UsageError
from retrieval.encoders.spec import ModelSpec
from retrieval.query.search import Searcher
from retrieval.storage.store import NewItem, Store

DIM = 4


@pytest.fixture
def searcher(tmp_path) -> Searcher:
    """Three images (one with two captions), and a sound cut into three windows."""
    store = Store(tmp_path / "meta.sqlite")
    context = IndexContext.assemble(tmp_path, store, ModelSpec("never-loaded"))
    context.settings.record_dim(DIM, "hand-made vectors")
    with store.conn:
        for name, vector in (("red", unit(1, 0, 0, 0)), ("green", unit(0, 1, 0, 0)),
                             ("reddish", unit(1, 0.3, 0, 0))):
            file_id = store.upsert_file(f"/p/{name}.png", "/p", "image", 1, 1, name)
            store.insert_items(file_id, [NewItem(f"/p/{name}.png", "image", vector, name)])
        file_id = store.upsert_file("/p/captions.tsv", "/p", "captions", 1, 1, "c")
        store.insert_items(file_id, [
            NewItem("/p/captions.tsv#0", "text", unit(1, 0, 0.2, 0), "c0", "a red square", "red.png"),
            NewItem("/p/captions.tsv#1", "text", unit(1, 0, 0.4, 0), "c1", "something red", "red.png")])
        file_id = store.upsert_file("/s/hum.wav", "/s", "audio", 1, 1, "hum")
        store.insert_items(file_id, [
            NewItem(f"/s/hum.wav#t={start},{start + 5}", "audio", vector, f"w{start}",
                    meta={"start": float(start), "end": float(start + 5)})
            for start, vector in ((0, unit(0, 0, 0, 1)), (5, unit(0, 1, 0, 0.2)), (10, unit(0, 0, 1, 0)))])
        store.link_captions()
        for modality in ("image", "text", "audio"):
            store.bump_generation(modality)
    yield Searcher(context)
    store.close()


def paths(hits) -> list[str]:
    return [hit.path for hit in hits]


def test_nearest_by_a_vector_best_first(searcher):
    hits = searcher.search(vector=unit(1, 0.1, 0, 0), target="image", k=3)
    assert paths(hits) == ["/p/red.png", "/p/reddish.png", "/p/green.png"]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].score == pytest.approx(float(unit(1, 0.1, 0, 0) @ unit(1, 0, 0, 0)), abs=1e-5)


def test_an_image_hit_carries_its_captions_and_a_caption_its_image(searcher):
    [red] = searcher.search(vector=unit(1, 0, 0, 0), target="image", k=1)
    assert red.text == "a red square"
    assert red.metadata == {"captions": ["a red square", "something red"]}
    [caption] = searcher.search(vector=unit(1, 0, 0.2, 0), vector_of="text", target="text", k=1)
    assert caption.text == "a red square" and caption.metadata == {"image": "/p/red.png"}


def test_like_searches_with_an_items_own_vector(searcher):
    [green] = searcher.search(vector=unit(0, 1, 0, 0), target="image", k=1)
    hits = searcher.search(like=green.id, target="image", k=1)
    assert hits[0].id == green.id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UsageError, match="no item with id 999"):
        searcher.search(like=999)


def test_filters_and_minimum_score(searcher):
    query = unit(1, 0, 0, 0)
    green = searcher.search(vector=query, target="image", where="path LIKE '%green%'")
    assert paths(green) == ["/p/green.png"]
    close = searcher.search(vector=query, target="image", min_score=0.9)
    assert paths(close) == ["/p/red.png", "/p/reddish.png"]
    assert searcher.search(vector=query, target="video") == []  # nothing of that kind: no model needed


def test_a_sound_is_found_once_at_its_best_window(searcher):
    [hit] = searcher.search(vector=unit(0, 1, 0, 0), target="audio", k=5)
    assert hit.path == "/s/hum.wav" and hit.metadata == {"start": 5.0, "end": 10.0}


def test_hydrate_leaves_out_items_removed_since(searcher):
    [red] = searcher.search(vector=unit(1, 0, 0, 0), target="image", k=1)
    hits = searcher.hydrate(np.array([red.id, 12345]), np.array([0.9, 0.8]))
    assert [h.id for h in hits] == [red.id] and hits[0].score == pytest.approx(0.9)
    assert searcher.item(red.id).score == 1.0 and searcher.item(12345) is None


def test_bad_requests_name_the_parameter(searcher):
    with pytest.raises(UsageError, match="k must be at least 1"):
        searcher.search(vector=unit(1, 0, 0, 0), k=0)
    with pytest.raises(UsageError, match="has 3 numbers"):
        searcher.search(vector=[1, 0, 0])
    with pytest.raises(UsageError, match="target must be one of"):
        searcher.search(vector=unit(1, 0, 0, 0), target="smell")
    for bad in (float("inf"), float("nan"), 1e39):  # 1e39 overflows float32
        with pytest.raises(UsageError, match="^`vector` must hold finite numbers"):
            searcher.search(vector=[bad, 0, 0, 0])
