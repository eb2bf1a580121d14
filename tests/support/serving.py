"""Test support: serve an index with the real HTTP stack (uvicorn) on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi.testclient import TestClient

from retrieval.serve.app import create_app


def local_client(app, host: str = "localhost") -> TestClient:
    """A test client of `app` that calls it by `host`: by default one it serves unasked (its
    Host allow-list refuses TestClient's own `testserver`)."""
    return TestClient(app, base_url=f"http://{host}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, seconds: float = 60) -> None:
    """Return once the server at `url` (another process, still starting) answers its health check."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"no server answered at {url} within {seconds:g} s")


@contextmanager
def running_server(index_dir: Path, **options) -> Iterator[str]:
    """The base URL of a server for `index_dir`, running in a thread until the block ends."""
    config = uvicorn.Config(create_app(index_dir, device="cpu", **options), host="127.0.0.1",
                            port=free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
