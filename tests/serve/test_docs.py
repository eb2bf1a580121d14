"""/docs in a real browser, offline: Swagger UI reads the OpenAPI 3.1 description and shows
every route; the description documents each status a route answers."""

from __future__ import annotations

import httpx
import pytest
from support import write_image
from support.browser import chromium, skip_without_chromium
from support.serving import running_server

from retrieval import Index

skip_without_chromium()


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("docs")
    write_image(root / "photos" / "a.png", (200, 30, 30))
    with Index.open(root / "index", model=tiny_model, create=True) as index:
        index.add(root / "photos")
    with running_server(root / "index") as url:
        yield url


def test_docs_render_every_route_offline(served):
    with chromium() as browser:
        page = browser.new_page()
        foreign: list[str] = []
        page.on("request", lambda request: foreign.append(request.url)
                if not request.url.startswith(served + "/") else None)
        page.goto(f"{served}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        text = page.inner_text("body")
        paths = {page.locator(".opblock-summary-path").nth(n).inner_text()
                 for n in range(page.locator(".opblock-summary-path").count())}
    assert "does not specify a valid version field" not in text
    assert {"/api/search", "/api/items/{item_id}", "/api/items/{item_id}/file", "/api/health"} <= {
        p.replace("\u200b", "") for p in paths}
    assert foreign == []


def test_every_status_is_documented_and_enums_are_anchored(served):
    spec = httpx.get(f"{served}/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    search = spec["paths"]["/api/search"]["get"]
    assert {"200", "400", "401", "413", "503"} <= set(search["responses"])
    assert {"200", "401", "404", "503"} <= set(spec["paths"]["/api/items/{item_id}/file"]["get"]["responses"])
    target = next(p for p in search["parameters"] if p["name"] == "target")["schema"]
    assert target["enum"] == ["auto", "image", "text", "audio", "video"]
    empty = httpx.post(f"{served}/api/search", files={"nothing": ("", b"")})
    assert empty.status_code == 400 and "nothing to search for" in empty.json()["detail"]
