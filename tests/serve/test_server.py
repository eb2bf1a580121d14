"""The search service through a real HTTP client against uvicorn on a loopback port: search by
text, upload, item and combined query; metadata, thumbnails and files; safety; live updates."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from support import write_image
from support.clips import write_clip
from support.serving import running_server
from support.sounds import render_sound, write_sound

from retrieval import Index
from retrieval.cli import cli
from retrieval.train.audio import AudioTrainingOptions


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Six images with captions, a text corpus and three sounds."""
    root = tmp_path_factory.mktemp("served")
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (90, 90, 90)]
    for number, colour in enumerate(colours):
        write_image(root / "photos" / f"img{number}.png", colour, size=(320, 240))
    (root / "photos" / "captions.tsv").write_text(
        "".join(f"img{n}.png#0\tpicture number {n}\n" for n in range(6)))
    (root / "notes.txt").write_text("a note about cats\na note about dogs\n")
    (root / "pairs").mkdir()
    rng = np.random.default_rng(0)
    for name, (color, shape) in {"low": ("red", "circle"), "mid": ("green", "square"),
                                 "high": ("blue", "triangle")}.items():
        sound = write_sound(root / "sounds" / f"{name}.wav", render_sound(color, shape, rng, seconds=2.0))
        shutil.copy(sound, root / "pairs" / sound.name)  # pairs for the audio tower, kept apart
        (root / "pairs" / f"{name}.txt").write_text(f"a {name} sound\n")
    return root


@pytest.fixture(scope="module")
def index_dir(corpus, tiny_model, tmp_path_factory) -> Path:
    """The corpus indexed with the tiny model and a barely trained audio tower."""
    path = tmp_path_factory.mktemp("served-index") / "index"
    with Index.open(path, model=tiny_model, create=True) as index:
        index.train_audio(corpus / "pairs", AudioTrainingOptions(epochs=1, width=4, n_mels=16,
                                                                  held_out=0), reindex=False)
        index.add(corpus / "photos", corpus / "notes.txt", corpus / "sounds")
    return path


@pytest.fixture(scope="module")
def url(index_dir) -> str:
    with running_server(index_dir) as base:
        yield base


def get(url: str, path: str, **params) -> httpx.Response:
    return httpx.get(url + path, params=params, timeout=30)


def post(url: str, data: dict | None = None, files: list | None = None) -> httpx.Response:
    return httpx.post(url + "/api/search", data=data or {}, files=files, timeout=30)


def local_search(index_dir: Path, **query) -> list[dict]:
    with Index.open(index_dir, readonly=True) as index:
        return [hit.to_dict() for hit in index.search(**query)]


def test_health_stats_and_self_hosted_docs(url, index_dir):
    assert get(url, "/api/health").json() == {"status": "ok", "items": 6 + 6 + 2 + 3}
    stats = get(url, "/api/stats").json()
    assert stats["counts"] == {"image": 6, "text": 8, "audio": 3, "video": 0}
    assert stats["audio_model"].startswith("tower:")
    spec = get(url, "/openapi.json").json()
    assert {"/api/search", "/api/items/{item_id}/thumbnail", "/api/items/{item_id}/file"} <= set(
        spec["paths"])
    docs = get(url, "/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert get(url, "/docs-assets/swagger-ui-bundle.js").status_code == 200
    page = get(url, "/").text
    assert "/static/app.js" in page and "http" not in page  # no external scripts or styles


def test_text_search_matches_the_library(url, index_dir, corpus):
    for query in ({"q": "picture number 3", "target": "text", "k": 3},
                  {"q": "a dog", "k": 4, "filter": "path:*img[12].png"},
                  {"q": "x", "under": str(corpus / "photos"), "min_score": -1.0}):
        served = get(url, "/api/search", **query).json()
        expected = local_search(index_dir, query=query["q"],
                                **{key: value for key, value in query.items() if key != "q"})
        assert served == json.loads(json.dumps(expected)), query
    assert post(url, {"q": "picture number 3", "target": "text", "k": "3"}).json() == \
        get(url, "/api/search", q="picture number 3", target="text", k=3).json()


def test_search_by_uploaded_image_and_sound_and_combined(url, corpus, index_dir):
    image = corpus / "photos" / "img4.png"
    hits = post(url, {"target": "image", "k": "1"},
                [("image", ("query.png", image.read_bytes(), "image/png"))]).json()
    assert hits[0]["uri"] == str(image) and hits[0]["score"] == pytest.approx(1, abs=1e-5)
    sound = corpus / "sounds" / "mid.wav"
    hits = post(url, {"k": "1"}, [("audio", ("q.wav", sound.read_bytes(), "audio/wav"))]).json()
    assert hits[0]["path"] == str(sound) and hits[0]["metadata"] == {"start": 0.0, "end": 2.0}
    combined = post(url, {"q": "picture number 4", "target": "image", "k": "6"},
                    [("image", ("a.png", image.read_bytes(), "image/png")),
                     ("audio", ("b.wav", sound.read_bytes(), "audio/wav"))]).json()
    with open(image, "rb") as picture, open(sound, "rb") as noise:
        expected = local_search(index_dir, query="picture number 4", image=picture, audio=noise,
                                target="image", k=6)
    assert [h["id"] for h in combined] == [h["id"] for h in expected]


def test_more_like_this_and_item_metadata(url, corpus):
    first = get(url, "/api/search", q="picture", target="image", k=1).json()[0]
    like = get(url, "/api/search", like=first["id"], target="image", k=2).json()
    assert like[0]["id"] == first["id"] and like[0]["score"] == pytest.approx(1, abs=1e-5)
    item = get(url, f"/api/items/{first['id']}").json()
    assert item["uri"] == first["uri"] and item["metadata"]["captions"] and "score" not in item
    missing = get(url, "/api/items/999999")
    assert missing.status_code == 404 and "no item with id 999999" in missing.json()["detail"]
    assert get(url, "/api/search", like=999999).status_code == 400


def test_thumbnails_are_sized_cached_and_drawn_for_captions(url, corpus):
    image = get(url, "/api/search", q="x", target="image", k=1).json()[0]
    response = get(url, f"/api/items/{image['id']}/thumbnail", size=64)
    assert response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) == 64
    again = httpx.get(f"{url}/api/items/{image['id']}/thumbnail", params={"size": 64},
                      headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304
    caption = get(url, "/api/search", q="picture number 2", target="text", k=1).json()[0]
    drawn = get(url, f"/api/items/{caption['id']}/thumbnail", size=64)
    assert drawn.status_code == 200
    assert get(url, f"/api/items/{image['id']}/thumbnail", size=5000).status_code == 422
    note = get(url, "/api/search", q="cats", filter="path:*notes.txt", target="text", k=1).json()[0]
    assert get(url, f"/api/items/{note['id']}/thumbnail").status_code == 404


def test_original_files_stream_with_ranges(url, corpus):
    image = get(url, "/api/search", q="x", target="image", k=1).json()[0]
    assert get(url, f"/api/items/{image['id']}/file").content == Path(image["path"]).read_bytes()
    # there is no path parameter to abuse: an extra one is ignored
    abused = httpx.get(f"{url}/api/items/{image['id']}/file", params={"path": "/etc/passwd"})
    assert abused.content == Path(image["path"]).read_bytes()
    sound = get(url, "/api/search", q="x", target="audio", k=1).json()[0]
    part = httpx.get(f"{url}/api/items/{sound['id']}/file", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == Path(sound["path"]).read_bytes()[:100]
    note = get(url, "/api/search", q="cats", target="text", k=1).json()[0]
    assert get(url, f"/api/items/{note['id']}/file").status_code == 404


@pytest.mark.parametrize("path", [
    "/static/../server.py", "/static/%2e%2e/server.py", "/static/..%2fserver.py",
    "/docs-assets/../../../../etc/passwd", "/api/items/..%2f..%2f..%2fetc%2fpasswd/file",
    "/%2e%2e/%2e%2e/etc/passwd", "/api/items/-1/file",
])
def test_no_path_reaches_files_outside_the_index(url, path):
    response = httpx.get(url + path)
    assert response.status_code in (400, 404, 422), path
    assert b"root:" not in response.content and b"create_app" not in response.content


def test_a_file_changed_or_swapped_after_indexing_is_not_served(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    write_image(folder / "a.png", (10, 20, 30))
    write_image(folder / "b.png", (200, 20, 30))
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(folder)
        ids = {Path(h.uri).name: h.id for h in index.search("x", k=2)}
    (folder / "a.png").unlink()
    (folder / "a.png").symlink_to("/etc/passwd")
    write_image(folder / "b.png", (1, 2, 3), size=(50, 50))
    with running_server(tmp_path / "index") as base:
        for name in ("a.png", "b.png"):
            response = httpx.get(f"{base}/api/items/{ids[name]}/file")
            assert response.status_code == 404 and "changed since it was indexed" in response.json()["detail"]


def test_files_with_names_that_are_not_utf8_are_served(tmp_path, tiny_model):
    """Such paths are stored escaped (a\\xffb.png); the server once opened the escaped text as
    a path: a 404, or the file whose name is spelled so."""
    folder = tmp_path / "photos"
    raw = os.path.join(os.fsencode(folder), b"a\xffb.png")
    folder.mkdir()
    write_image(tmp_path / "odd.png", (10, 20, 30))
    shutil.copy(tmp_path / "odd.png", raw)
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(folder)
        [hit] = index.search("x", k=2)
    assert hit.uri == f"{folder}/a\\xffb.png"
    write_image(folder / "a\\xffb.png", (200, 20, 30), size=(60, 50))  # the escaped spelling
    with running_server(tmp_path / "index") as base:
        response = httpx.get(f"{base}/api/items/{hit.id}/file")
    assert response.status_code == 200, response.text
    assert response.content == (tmp_path / "odd.png").read_bytes()


def test_bad_requests_get_4xx_with_a_clear_message(url, tmp_path, index_dir):
    huge = io.BytesIO()
    Image.new("1", (10_001, 10_001)).save(huge, "PNG")  # 100.02 MP in a few kB
    cases = [
        (post(url, {}, [("image", ("huge.png", huge.getvalue(), "image/png"))]), 413,
         "10001x10001 is 100.0 megapixels, over the 100 MP cap"),
        (post(url, {}), 400, "nothing to search for"),
        (post(url, {"target": "image"}, [("image", ("x.png", b"not an image", "image/png"))]), 400,
         "query image x.png: "),
        (post(url, {}, [("image", ("empty.png", b"", "image/png"))]), 400, "is empty"),
        (post(url, {}, [("audio", ("x.wav", b"RIFF....WAVE", "audio/wav"))]), 400, "query sound x.wav: "),
        (post(url, {"q": "x", "where": "1 = 1"}), 400, "raw SQL (where=) is off on this server"),
        (post(url, {"q": "x", "filter": "size>>3"}), 400, "filter term 'size>>3'"),
        (get(url, "/api/search", q="x", target="smell"), 422, "target"),
        (get(url, "/api/search", q="x", k=0), 422, "k"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in json.dumps(response.json())


def test_a_sound_on_an_index_without_audio_is_a_4xx_in_the_servers_words(tmp_path, tiny_model, corpus):
    """It was a 503 naming the Python parameter `audio_model`: no retry mends it."""
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(corpus / "notes.txt")
    with running_server(tmp_path / "index") as base:
        with open(corpus / "sounds" / "low.wav", "rb") as sound:
            response = post(base, {}, [("audio", ("low.wav", sound.read(), "audio/wav"))])
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("this index has no audio encoder") and "--audio-model" in detail
    assert "`" not in detail


def test_uploads_over_the_limit_are_refused(index_dir, corpus):
    with running_server(index_dir, max_upload_mb=0.05) as base:
        big = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
        data = io.BytesIO()
        Image.fromarray(big).save(data, "PNG")
        response = httpx.post(base + "/api/search",
                              files=[("image", ("big.png", data.getvalue(), "image/png"))])
        assert response.status_code == 413 and "upload too large" in response.json()["detail"]
        small = (corpus / "photos" / "img0.png").read_bytes()
        assert httpx.post(base + "/api/search", data={"target": "image"},
                          files=[("image", ("s.png", small, "image/png"))]).status_code == 200


def test_query_media_over_their_caps_are_refused_naming_the_option(index_dir, corpus, tmp_path):
    image = corpus / "photos" / "img0.png"  # 320x240: 0.08 megapixels
    sound = corpus / "sounds" / "mid.wav"  # 2 s
    video = write_clip(tmp_path / "clip.mp4", "mpeg4", "aac", [("red", "circle")], seed=0)  # 4 s
    uploads = {"image": ("q.png", image.read_bytes(), "image/png"),
               "audio": ("q.wav", sound.read_bytes(), "audio/wav"),
               "video": ("q.mp4", video.read_bytes(), "video/mp4")}
    caps = {"image": "--max-megapixels", "audio": "--max-audio-seconds", "video": "--max-video-seconds"}
    with running_server(index_dir, max_megapixels=0.05, max_audio_seconds=1.5,
                        max_video_seconds=3) as base:
        for field, option in caps.items():
            response = httpx.post(base + "/api/search", data={"target": "image"},
                                  files=[(field, uploads[field])], timeout=60)
            detail = response.json()["detail"]
            assert response.status_code == 413, response.text
            assert f"retrieve serve {option}" in detail and "\n" not in detail
    with running_server(index_dir, max_megapixels=0.1, max_audio_seconds=2.5,
                        max_video_seconds=5) as base:
        for field in caps:
            response = httpx.post(base + "/api/search", data={"target": "image"},
                                  files=[(field, uploads[field])], timeout=60)
            assert response.status_code == 200, response.text


def test_a_build_beside_the_server_is_seen_without_restart(index_dir, corpus, tmp_path, tiny_model):
    path = tmp_path / "index"
    shutil.copytree(index_dir, path)
    new = tmp_path / "new"
    for number in range(60):
        write_image(new / f"new{number}.png", (number * 4, 255 - number * 4, 128))
    failures: list[str] = []
    with running_server(path) as base:
        before = httpx.get(base + "/api/stats").json()["counts"]["image"]
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                response = httpx.get(base + "/api/search", params={"q": "x", "target": "image", "k": 100})
                hits = response.json() if response.status_code == 200 else []
                if response.status_code != 200 or any(not os.path.exists(h["path"]) for h in hits):
                    failures.append(response.text[:200])

        readers = [threading.Thread(target=hammer) for _ in range(2)]
        for reader in readers:
            reader.start()
        with Index.open(path, batch_size=8) as writer:
            writer.add(new)
        stop.set()
        for reader in readers:
            reader.join()
        after = httpx.get(base + "/api/search", params={"q": "x", "target": "image", "k": 100}).json()
    assert failures == []
    assert before == 6 and len(after) == 66
    assert sum(Path(h["path"]).parent == new for h in after) == 60


def test_the_cli_routes_searches_through_a_server(url, index_dir, corpus):
    runner = CliRunner()
    served = runner.invoke(cli, ["picture number 5", "--server", url, "--json", "-k", "3",
                                 "--target", "text"])
    here = runner.invoke(cli, ["picture number 5", "--index", str(index_dir), "--json", "-k", "3",
                               "--target", "text"])
    assert served.exit_code == 0 and here.exit_code == 0
    served_hits, here_hits = json.loads(served.stdout), json.loads(here.stdout)
    assert served_hits == get(url, "/api/search", q="picture number 5", k=3, target="text").json()
    # The server's towers pre-pack their weights, a one-shot CLI process's do not
    # (onnx_towers.open_session): the same hits, scores equal to the 7th decimal.
    assert [{**hit, "score": None} for hit in served_hits] == [{**hit, "score": None} for hit in here_hits]
    assert [hit["score"] for hit in served_hits] == pytest.approx([hit["score"] for hit in here_hits],
                                                                  abs=1e-5)
    image = runner.invoke(cli, ["--image", str(corpus / "photos" / "img1.png"), "--target", "image",
                                "--server", url, "-k", "1"], env={"RETRIEVAL_SERVER": ""})
    assert image.exit_code == 0 and "img1.png" in image.stdout
    bad = runner.invoke(cli, ["x", "--server", url, "--target", "audio", "--filter", "nope("])
    assert bad.exit_code == 2 and bad.stderr.startswith(f"error: server {url}: filter term 'nope('")
    down = runner.invoke(cli, ["x", "--server", "http://127.0.0.1:9"])
    assert down.exit_code == 1 and "cannot reach the server at http://127.0.0.1:9" in down.stderr


def test_serve_binds_to_localhost_unless_told_otherwise(index_dir, monkeypatch):
    calls = []
    monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets=None: calls.append(server.config))
    runner = CliRunner()
    assert runner.invoke(cli, ["serve", "--index", str(index_dir)]).exit_code == 0
    assert runner.invoke(cli, ["serve", "--index", str(index_dir), "--host", "0.0.0.0",
                               "--port", "9000", "--insecure"]).exit_code == 0
    open_to_all = runner.invoke(cli, ["serve", "--index", str(index_dir), "--host", "0.0.0.0"])
    assert open_to_all.exit_code == 2 and "give --token" in open_to_all.stderr
    assert [(c.host, c.port) for c in calls] == [("127.0.0.1", 8000), ("0.0.0.0", 9000)]
    missing = runner.invoke(cli, ["serve", "--index", str(index_dir.parent / "nothing")])
    assert missing.exit_code == 1 and "no index at" in missing.stderr
