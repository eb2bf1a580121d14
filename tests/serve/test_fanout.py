"""Sharded search: the merged hits of several shards equal those of one index over them all,
in one process and across servers."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image
from support import write_shape_folder
from support.serving import free_port, running_server, wait_until_healthy

from retrieval import Index
from retrieval.core.errors import RetrievalError, UsageError
from retrieval.encoders.clip import ClipEncoder
from retrieval.encoders.onnx_towers import OnnxImageEncoder, OnnxTextEncoder
from retrieval.serve.fanout import MAX_SHARDS, ShardedIndex, open_shards

QUERIES = ["a red circle", "a blue square", "a green triangle", "a red square"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> list[Path]:
    """Three folders of renders with captions: one corpus split three ways."""
    root = tmp_path_factory.mktemp("split")
    return [write_shape_folder(root / f"part{n}", seed=20 + n, per_class=2) for n in range(3)]


@pytest.fixture(scope="module")
def indexes(parts, trained_model, tmp_path_factory) -> tuple[Path, list[Path]]:
    """One index over every part, and one index (a shard) per part."""
    root = tmp_path_factory.mktemp("indexes")
    with Index.open(root / "whole", model=trained_model, create=True) as index:
        index.add(*parts)
    shards = []
    for number, part in enumerate(parts):
        with Index.open(root / f"shard{number}", model=trained_model, create=True) as index:
            index.add(part)
        shards.append(root / f"shard{number}")
    return root / "whole", shards


def ranked(hits) -> list[tuple[str, float]]:
    return [(hit.uri, hit.score) for hit in hits]


def assert_same_top_k(found: list[tuple[str, float]], index: Index, k: int, **query) -> None:
    """The scores one index ranks first, each hit scored as that index scores it: identical
    captions in several shards tie, and ties may come in any order. Scores agree to float
    noise: a shard encodes its files in other batches than the whole index does."""
    expected = ranked(index.search(k=k, **query))
    everything = dict(ranked(index.search(k=1000, **query)))
    assert [score for _, score in found] == pytest.approx([score for _, score in expected], abs=1e-5)
    assert all(everything[uri] == pytest.approx(score, abs=1e-5) for uri, score in found)


def test_shards_in_one_process_return_what_one_index_returns(indexes):
    whole, shards = indexes
    sharded = ShardedIndex(open_shards(shards, device="cpu"))
    with Index.open(whole, readonly=True, device="cpu") as index:
        for query in QUERIES:
            for target in ("image", "text"):
                found = ranked(sharded.search(query, k=8, target=target))
                assert_same_top_k(found, index, 8, query=query, target=target)
        best = sharded.search("a red circle", k=1, target="image")[0]
        shard, local = sharded.locate(best.id)
        assert shard is sharded.shards[best.id % MAX_SHARDS] and shard.item(local).uri == best.uri
        assert sharded.item(best.id).uri == best.uri
        like = sharded.search(like=best.id, k=3, target="image")  # vector from its shard, sent to all
        assert like[0].uri == best.uri and like[0].score == pytest.approx(1.0, abs=1e-5)
        assert_same_top_k(ranked(like), index, 3, like=index.store.item_id(best.uri, "image"),
                          target="image")
    assert sharded.stats()["counts"]["image"] == 3 * 18
    sharded.close()


@pytest.fixture
def encoded(monkeypatch) -> list[str]:
    """What the encoders are asked to encode, whichever runs (the model or its ONNX towers)."""
    calls: list[str] = []

    def spying(original, method: str):
        def spy(self, inputs, *args, **options):
            calls.append(method)
            return original(self, inputs, *args, **options)
        return spy

    for encoder, method in ((ClipEncoder, "encode_texts"), (ClipEncoder, "encode_images"),
                            (OnnxTextEncoder, "encode_texts"), (OnnxImageEncoder, "encode_images")):
        monkeypatch.setattr(encoder, method, spying(getattr(encoder, method), method))
    return calls


def test_the_query_is_encoded_once_and_its_vector_sent_to_every_shard(indexes, encoded):
    whole, shards = indexes
    sharded = ShardedIndex(open_shards(shards, device="cpu"))
    with Index.open(whole, readonly=True, device="cpu") as index:
        found = ranked(sharded.search("a red circle", k=8, target="image"))
        assert encoded == ["encode_texts"]  # once, not once per shard
        assert_same_top_k(found, index, 8, query="a red circle", target="image")
        query_image = index.search("a red circle", k=1, target="image")[0].path
        encoded.clear()
        with open(query_image, "rb") as upload:
            found = ranked(sharded.search(image=[upload], k=5, target="image"))
        assert encoded == ["encode_images"]
        assert_same_top_k(found, index, 5, image=query_image, target="image")
    sharded.close()
    with running_server(shards[1]) as second, running_server(shards[2]) as third, \
            running_server(shards[0], shard_urls=[second, third]) as front:
        encoded.clear()
        hits = httpx.get(f"{front}/api/search", params={"q": "a red circle", "k": 20}).json()
        assert encoded == ["encode_texts"]  # the shard servers got the vector, not the words
        assert {hit["id"] % MAX_SHARDS for hit in hits} == {0, 1, 2}


def test_stats_list_a_failing_local_shard_like_a_remote_one(indexes, monkeypatch):
    _, shards = indexes
    sharded = ShardedIndex(open_shards(shards, device="cpu"))
    broken = sharded.shards[1]

    def fail():
        raise RetrievalError("the index folder is gone")
    monkeypatch.setattr(broken, "stats", fail)
    stats = sharded.stats()
    assert stats["failed_shards"] == [broken.name]
    assert [s["name"] for s in stats["shards"]] == [sharded.shards[0].name, sharded.shards[2].name]
    sharded.close()


def test_a_shard_server_checks_the_vector_it_is_sent(indexes):
    _, shards = indexes
    with running_server(shards[0]) as url:
        for vector, says in (("[NaN, 1]", "finite"), ("[1e39, 1]", "finite"), ("[0.5, 0.5]", "numbers")):
            answer = httpx.get(f"{url}/api/search", params={"vector": vector, "vector_of": "image"})
            assert answer.status_code == 400 and "`vector`" in answer.json()["detail"], answer.text
            assert says in answer.json()["detail"]


def test_shards_of_different_models_are_refused_at_start(indexes, parts, tiny_model, tmp_path):
    _, shards = indexes
    with Index.open(tmp_path / "other", model=tiny_model, create=True) as other:
        other.add(parts[0])
    with pytest.raises(UsageError, match=f"shard {tmp_path / 'other'} embeds with .* share one model"):
        ShardedIndex(open_shards([shards[0], tmp_path / "other"], device="cpu"))


def png_bytes(path: str) -> bytes:
    out = io.BytesIO()
    Image.open(path).save(out, "PNG")
    return out.getvalue()


def test_a_server_fans_out_to_shard_servers_and_relays_their_files(indexes):
    whole, shards = indexes
    with running_server(shards[1]) as second, running_server(shards[2]) as third, \
            running_server(shards[0], shard_urls=[second, third]) as front, \
            Index.open(whole, readonly=True, device="cpu") as index:
        for query in QUERIES:
            hits = httpx.get(f"{front}/api/search", params={"q": query, "k": 8, "target": "text"}).json()
            assert_same_top_k([(h["uri"], h["score"]) for h in hits], index, 8, query=query,
                              target="text")
        hits = httpx.get(f"{front}/api/search", params={"q": "a blue triangle", "k": 20}).json()
        remote = next(h for h in hits if h["id"] % MAX_SHARDS == 2)  # held by the third server
        assert httpx.get(f"{front}/api/items/{remote['id']}").json()["uri"] == remote["uri"]
        image = httpx.get(f"{front}/api/items/{remote['id']}/file")
        assert image.status_code == 200 and image.content == Path(remote["path"]).read_bytes()
        thumbnail = httpx.get(f"{front}/api/items/{remote['id']}/thumbnail", params={"size": 64})
        assert thumbnail.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumbnail.content)).size[0] <= 64
        like = httpx.get(f"{front}/api/search",
                         params={"like": remote["id"], "k": 2, "target": "image"}).json()
        assert like[0]["id"] == remote["id"] and like[0]["score"] == pytest.approx(1.0, abs=1e-5)
        upload = {"image": ("q.png", png_bytes(remote["path"]), "image/png")}
        found = httpx.post(f"{front}/api/search", data={"k": "5", "target": "image"}, files=upload).json()
        assert found[0]["uri"] == remote["uri"]
        assert_same_top_k([(h["uri"], h["score"]) for h in found], index, 5,
                          image=remote["path"], target="image")
        stats = httpx.get(f"{front}/api/stats").json()
        assert [s["name"] for s in stats["shards"]][1:] == [second, third]
        assert httpx.get(f"{front}/api/items/{7 * MAX_SHARDS + 5}").status_code == 400  # no shard 5


def test_an_unreachable_shard_leaves_partial_results_naming_it(indexes):
    _, shards = indexes
    gone = f"http://127.0.0.1:{free_port()}"
    with running_server(shards[0], shard_urls=[gone]) as front:
        response = httpx.get(f"{front}/api/search", params={"q": "a red circle"})
        health = httpx.get(f"{front}/api/health").json()
        stats = httpx.get(f"{front}/api/stats")
    assert response.status_code == 200 and response.json()
    assert response.headers["x-failed-shards"] == gone
    assert stats.status_code == 200 and stats.json()["failed_shards"] == [gone]
    assert stats.headers["x-failed-shards"] == gone
    with Index.open(shards[0], readonly=True, device="cpu") as alive:
        assert stats.json()["counts"] == alive.stats()["counts"]
        assert [s["name"] for s in stats.json()["shards"]] == [str(alive.path)]
    assert health["status"] == "degraded" and health["shards"][gone] is False
    sharded = ShardedIndex(open_shards([], [gone]))
    with pytest.raises(RetrievalError, match=f"shard {gone}: unreachable"):
        sharded.search("a red circle")  # the library's search, asked for all, says which failed


def test_a_stopped_shard_costs_its_timeout_not_the_front(indexes, tmp_path):
    """A real shard server, stopped with SIGSTOP: it accepts connections and never answers."""
    _, shards = indexes
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index", str(shards[1]),
                              "--port", str(port), "--device", "cpu", "--no-access-log"],
                             stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url)
        os.kill(child.pid, signal.SIGSTOP)
        with running_server(shards[0], shard_urls=[url], shard_timeout=1) as front:
            answers = []

            def ask() -> None:
                answers.append(httpx.get(f"{front}/api/search", params={"q": "a red circle", "k": 3},
                                         timeout=60))

            askers = [threading.Thread(target=ask) for _ in range(4)]
            for asker in askers:
                asker.start()
            for asker in askers:
                asker.join()
            local = answers[0].json()[0]["id"]
            item = httpx.get(f"{front}/api/items/{local}", timeout=60)
            health = httpx.get(f"{front}/api/health", timeout=60).json()
    finally:
        os.kill(child.pid, signal.SIGCONT)
        child.terminate()
        child.wait(timeout=30)
    assert [a.status_code for a in answers] == [200] * 4
    assert all(a.headers["x-failed-shards"] == url and len(a.json()) == 3 for a in answers)
    assert item.status_code == 200  # items of local shards never wait on the stopped one
    assert health["status"] == "degraded" and health["shards"] == {str(shards[0]): True, url: False}


def test_sigterm_drains_and_exits_while_a_request_runs(indexes):
    """A request that would run for ten minutes does not keep a stopped server alive, and is
    answered: its SQL filter is stopped at once (it was cut off unanswered after the drain)."""
    _, shards = indexes
    port = free_port()
    child = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index", str(shards[1]),
                              "--port", str(port), "--device", "cpu", "--no-access-log", "--allow-sql",
                              "--where-timeout", "600"], stderr=subprocess.DEVNULL)
    forever = "id IN (WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n)"
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}")
        answers = []
        def ask() -> None:
            try:
                answers.append(httpx.get(f"http://127.0.0.1:{port}/api/search",
                                         params={"q": "x", "where": forever}, timeout=None))
            except httpx.HTTPError:  # the server closed it unanswered
                pass

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        time.sleep(1)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises it once drained
        asker.join(timeout=30)
        assert [answer.status_code for answer in answers] == [503]
        assert answers[0].json()["detail"] == ("the SQL filter (where) was stopped: the index is "
                                               "closing; ask again later")
    finally:
        child.kill()
