"""`retrieve serve`: the app each option makes, served by a stand-in for uvicorn's loop."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from support import write_image
from support.serving import local_client

from retrieval.cli import cli


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    for number in range(3):
        write_image(root / "a" / f"a{number}.png", (80 * number, 40, 200))
        write_image(root / "b" / f"b{number}.png", (200, 80 * number, 40))
    return root


@pytest.fixture(scope="module")
def indexes(pictures, tiny_model) -> tuple[Path, Path]:
    for part in ("a", "b"):
        built = CliRunner().invoke(cli, ["index", str(pictures / part), "--index",
                                         str(pictures / f"index-{part}"), "--model", tiny_model, "--quiet"])
        assert built.exit_code == 0, built.output
    return pictures / "index-a", pictures / "index-b"


@pytest.fixture
def serve(monkeypatch):
    """`retrieve serve ARGS`, with `ask` called on a test client of its app while the app is
    served (in place of uvicorn's loop: the command closes the app once that loop ends): what
    `ask` returns. `host` is the Host the client calls the app by."""
    def run(*args: str | Path, ask: Callable[[TestClient], Any], host: str = "localhost") -> Any:
        answers = []
        monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets=None: answers.append(
            ask(local_client(server.config.app, host))))
        result = CliRunner().invoke(cli, ["serve", *map(str, args)])
        assert result.exit_code == 0, result.output
        return answers[0]
    return run


def upload(path: Path) -> Callable[[TestClient], Any]:
    return lambda client: client.post(
        "/api/search", files={"image": (path.name, path.read_bytes(), "image/png")},
        data={"target": "image", "k": "10"})


def images_like(query: str) -> Callable[[TestClient], Any]:
    return lambda client: client.get("/api/search", params={"q": query, "k": 10, "target": "image"})


def test_max_upload_mb_refuses_larger_queries(serve, indexes, tmp_path):
    query = tmp_path / "noise.png"  # about 30 KB: noise does not compress
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), np.uint8)).save(query)
    assert serve("--index", indexes[0], ask=upload(query)).status_code == 200
    refused = serve("--index", indexes[0], "--max-upload-mb", "0.01", ask=upload(query))
    assert refused.status_code == 413 and "is larger than 0.01 MB" in refused.text


@pytest.mark.parametrize("megabytes", ["0.0001", "0", "-1", "nan", "inf", "1e6"])
def test_max_upload_mb_out_of_range_is_one_line_naming_the_range(indexes, megabytes, monkeypatch):
    monkeypatch.setattr("uvicorn.Server.run", lambda server, sockets=None: None)  # never serve
    result = CliRunner().invoke(cli, ["serve", "--index", str(indexes[0]), "--max-upload-mb", megabytes])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"error: --max-upload-mb must be between 0.01 and 1024 (megabytes), "
                             f"not {float(megabytes):g}\n")


def test_max_megapixels_refuses_larger_query_images(serve, indexes, pictures):
    query = pictures / "a" / "a1.png"
    refused = serve("--index", indexes[0], "--max-megapixels", "0.0001", ask=upload(query))
    assert refused.status_code == 413 and "(raise it with retrieve serve --max-megapixels)" in refused.text


def test_max_audio_and_video_seconds_reach_the_service(serve, indexes):
    caps = serve("--index", indexes[0], "--max-audio-seconds", "2.5", "--max-video-seconds", "7",
                 ask=lambda client: client.app.state.media_caps)
    assert (caps.max_audio_seconds, caps.max_video_seconds) == (2.5, 7)
    refused = CliRunner().invoke(cli, ["serve", "--index", str(indexes[0]), "--max-video-seconds", "0"])
    assert refused.exit_code == 2 and "--max-video-seconds" in refused.stderr


def test_shard_index_searches_another_folder_beside_the_index(serve, indexes):
    alone = serve("--index", indexes[0], ask=images_like("x"))
    both = serve("--index", indexes[0], "--shard-index", indexes[1], ask=images_like("x"))
    assert {Path(hit["path"]).parent.name for hit in alone.json()} == {"a"}
    assert {Path(hit["path"]).parent.name for hit in both.json()} == {"a", "b"}


def test_shard_searches_another_server(serve, indexes):
    answer = serve("--index", indexes[0], "--shard", "http://127.0.0.1:9", ask=images_like("x"))
    # Nothing listens there: the local hits come back, the header names the shard that failed.
    assert answer.status_code == 200 and answer.headers["x-failed-shards"] == "http://127.0.0.1:9"
    assert {Path(hit["path"]).parent.name for hit in answer.json()} == {"a"}


def test_device_reaches_the_model(serve, indexes, pictures):
    query = pictures / "a" / "a1.png"
    assert serve("--index", indexes[0], "--device", "cpu", ask=upload(query)).status_code == 200
    refused = CliRunner().invoke(cli, ["serve", "--index", str(indexes[0]), "--device", "bogus"])
    assert refused.exit_code == 2 and "--device 'bogus' is not a device" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1


def test_int8_reaches_the_index_and_its_shards(serve, indexes):
    def int8_and_search(client: TestClient) -> tuple[list[bool], int]:
        index = client.app.state.service.index
        opened = [index] if not hasattr(index, "shards") else [s.index for s in index.shards]
        return [i.context.encoders.int8 for i in opened], images_like("x")(client).status_code
    assert serve("--index", indexes[0], "--int8", ask=int8_and_search) == ([True], 200)
    assert serve("--index", indexes[0], "--shard-index", indexes[1], "--int8",
                 ask=int8_and_search) == ([True, True], 200)
    assert serve("--index", indexes[0], ask=int8_and_search) == ([False], 200)


def stats(client: TestClient):
    return client.get("/api/stats")


def test_allow_host_serves_another_host_name(serve, indexes):
    assert serve("--index", indexes[0], "--allow-host", "search.lan", ask=stats, host="search.lan"
                 ).status_code == 200
    refused = serve("--index", indexes[0], ask=stats, host="search.lan")
    assert refused.status_code == 400 and "'search.lan' is not served here" in refused.text


def test_relative_paths_hide_the_indexed_folders(serve, indexes, pictures):
    [absolute] = serve("--index", indexes[0], ask=images_like("x")).json()[:1]
    [relative] = serve("--index", indexes[0], "--relative-paths", ask=images_like("x")).json()[:1]
    assert absolute["path"].startswith(str(pictures))
    assert not relative["path"].startswith("/") and str(pictures) not in relative["uri"]


def test_shard_timeout_gives_up_on_a_shard_that_never_answers(serve, indexes):
    with socket.socket() as silent:  # accepts connections (its backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"

        def ask(client: TestClient) -> tuple[float, Any]:
            shard = client.app.state.service.index.shards[1]
            return shard.client.timeout.read, images_like("x")(client)
        timeout, answer = serve("--index", indexes[0], "--shard", url, "--shard-timeout", "0.2", ask=ask)
    assert timeout == 0.2
    assert answer.status_code == 200 and answer.headers["x-failed-shards"] == url
