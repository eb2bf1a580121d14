"""Searching through a running `retrieve serve`, for a CLI that need not load any model."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from ..core.errors import RetrievalError, UsageError
from ..core.paths import existing_file
from ..core.types import Hit

TIMEOUT_S = 60.0


def search_server(url: str, text: str | None, images: list[str], sounds: list[str],
                  **options) -> list[Hit]:
    """POST a search to the server at `url`; its errors come back as the engine's errors."""
    import httpx

    form = {name: str(value) for name, value in options.items() if value is not None}
    if text:
        form["q"] = text
    with ExitStack() as files:
        uploads = [(field, (Path(path).name, files.enter_context(_opened(path, field)))) for field, paths
                   in (("image", images), ("audio", sounds)) for path in paths]
        try:
            response = httpx.post(url.rstrip("/") + "/api/search", data=form, files=uploads or None,
                                  timeout=TIMEOUT_S)
        except httpx.HTTPError as error:
            raise RetrievalError(f"cannot reach the server at {url} ({error}); start it with "
                                 "retrieve serve, or search the index itself") from None
    if response.status_code >= 400:
        raise server_error(response, f"server {url}")
    return [Hit.from_dict(hit) for hit in response.json()]


def server_error(response, who: str) -> RetrievalError:
    """The engine's error for a server's error reply: a usage error for 4xx, named by `who`."""
    return (UsageError if response.status_code < 500 else RetrievalError)(f"{who}: {_detail(response)}")


def _opened(path: str, field: str):
    found = existing_file(path)
    if found is None:
        kind = "image" if field == "image" else "sound"
        raise UsageError(f"query {kind} {path}: no such file")
    return open(found, "rb")


def _detail(response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return f"HTTP {response.status_code}"
    if isinstance(detail, list):  # FastAPI's validation errors: name the field and the problem
        return "; ".join(f"{'.'.join(map(str, d.get('loc', [])[1:]))}: {d.get('msg')}" for d in detail)
    return str(detail)
