"""`retrieve serve`: the app each option makes, served by a stand-in for uvicorn's loop."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from support import write_image

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
    """`retrieve serve ARGS`: a test client of the app it would have served."""
    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, **options: apps.append(app))

    def run(*args: str | Path) -> TestClient:
        result = CliRunner().invoke(cli, ["serve", *map(str, args)])
        assert result.exit_code == 0, result.output
        return TestClient(apps[-1])
    return run


def upload(client: TestClient, path: Path):
    return client.post("/api/search", files={"image": (path.name, path.read_bytes(), "image/png")},
                       data={"target": "image", "k": "10"})


def test_max_upload_mb_refuses_larger_queries(serve, indexes, pictures):
    query = pictures / "a" / "a1.png"
    assert upload(serve("--index", indexes[0]), query).status_code == 200
    refused = upload(serve("--index", indexes[0], "--max-upload-mb", "0.0001"), query)
    assert refused.status_code == 413 and "is larger than" in refused.text


def test_shard_index_searches_another_folder_beside_the_index(serve, indexes):
    alone = serve("--index", indexes[0]).get("/api/search", params={"q": "x", "k": 10, "target": "image"})
    both = serve("--index", indexes[0], "--shard-index", indexes[1]).get(
        "/api/search", params={"q": "x", "k": 10, "target": "image"})
    assert {Path(hit["path"]).parent.name for hit in alone.json()} == {"a"}
    assert {Path(hit["path"]).parent.name for hit in both.json()} == {"a", "b"}


def test_shard_searches_another_server(serve, indexes):
    client = serve("--index", indexes[0], "--shard", "http://127.0.0.1:9")
    answer = client.get("/api/search", params={"q": "x", "target": "image"})
    assert answer.status_code >= 500 and "http://127.0.0.1:9" in answer.text


def test_device_reaches_the_model(serve, indexes, pictures):
    refused = upload(serve("--index", indexes[0], "--device", "bogus"), pictures / "a" / "a1.png")
    assert refused.status_code >= 400 and "bogus" in refused.text
