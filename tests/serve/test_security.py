"""The service as an attacker meets it: tokens, Host names (DNS rebinding), raw SQL, swapped
symlinks, endless uploads, out-of-range ids; and item details as the page reads them."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import httpx
import pytest
from support import write_image
from support.serving import running_server

from retrieval import Index


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("guarded")
    for number in range(3):
        write_image(root / "photos" / f"img{number}.png", (80 * number, 90, 200 - 60 * number))
    (root / "photos" / "captions.tsv").write_text(
        "img0.png#0\tfirst caption\nimg0.png#1\tsecond caption\nimg1.png#0\tanother\n")
    index_dir = root / "index"
    with Index.open(index_dir, model=tiny_model, create=True) as index:
        index.add(root / "photos")
    return root / "photos", index_dir


def image_id(base: str, name: str, headers: dict | None = None) -> int:
    hits = httpx.get(f"{base}/api/search", params={"q": "x", "target": "image", "k": 10,
                                                   "filter": f"path:*{name}"}, headers=headers).json()
    return hits[0]["id"]


def test_item_details_give_size_mtime_and_every_caption(photos):
    folder, index_dir = photos
    with running_server(index_dir) as base:
        item = httpx.get(f"{base}/api/items/{image_id(base, 'img0.png')}").json()
    stat = (folder / "img0.png").stat()
    assert item["path"] == str(folder / "img0.png") and item["modality"] == "image"
    assert item["size"] == stat.st_size and item["mtime"] == pytest.approx(stat.st_mtime_ns / 1e9)
    assert item["captions"] == [{"text": "first caption"}, {"text": "second caption"}]


def test_a_token_guards_every_api_route_but_not_the_page(photos):
    with running_server(photos[1], token="s3cret") as base:
        assert httpx.get(f"{base}/api/health").status_code == 401
        assert httpx.get(f"{base}/api/search", params={"q": "x"},
                         headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{base}/api/health", headers=good).status_code == 200
        item = image_id(base, "img1.png", good)
        assert httpx.get(f"{base}/api/items/{item}/file").status_code == 401
        assert httpx.get(f"{base}/api/items/{item}/file", headers=good).status_code == 200
        page = httpx.get(f"{base}/")
        assert page.status_code == 200
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"


def test_a_rebinding_host_is_refused(photos):
    """A page on evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    with running_server(photos[1]) as base:
        port = base.rsplit(":", 1)[1]
        evil = httpx.get(f"{base}/api/search", params={"q": "x"}, headers={"Host": f"evil.example:{port}"})
        assert evil.status_code == 400 and "evil.example" in evil.json()["detail"]
        assert httpx.get(f"{base}/api/health", headers={"Host": f"localhost:{port}"}).status_code == 200
    with running_server(photos[1], allowed_hosts=["search.lan"]) as base:
        assert httpx.get(f"{base}/api/health", headers={"Host": "search.lan"}).status_code == 200


def test_ids_beyond_int64_are_404(photos):
    with running_server(photos[1]) as base:
        for route in ("", "/vector", "/thumbnail", "/file"):
            response = httpx.get(f"{base}/api/items/{2**64}{route}")
            assert response.status_code == 404, (route, response.text)
        assert httpx.get(f"{base}/api/search", params={"like": 2**64}).status_code == 400


def test_relative_paths_hide_the_roots(photos):
    folder, index_dir = photos
    with running_server(index_dir, relative_paths=True) as base:
        hit = httpx.get(f"{base}/api/search", params={"q": "x", "target": "image", "k": 1}).json()[0]
        stats = httpx.get(f"{base}/api/stats").json()
    assert hit["path"].startswith("photos/") and str(folder.parent) not in hit["uri"]
    assert stats["path"] == "index"


def test_raw_sql_is_refused_unless_allowed_and_then_cannot_hang_the_server(photos):
    endless = "length(randomblob(200000000)) > 0"
    with running_server(photos[1]) as base:
        refused = httpx.get(f"{base}/api/search", params={"q": "x", "where": "1"})
        assert refused.status_code == 400 and "--allow-sql" in refused.json()["detail"]
    forever = "id IN (WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n)"
    with running_server(photos[1], allow_sql=True, where_timeout=2) as base:
        results = {}

        def ask(name, where):
            results[name] = httpx.get(f"{base}/api/search", params={"q": "x", "where": where}, timeout=60)

        askers = [threading.Thread(target=ask, args=(name, where))
                  for name, where in (("blob", endless), ("loop", forever))]
        for asker in askers:
            asker.start()
        health = httpx.get(f"{base}/api/health", timeout=60)  # answered beside them
        for asker in askers:
            asker.join()
    assert health.status_code == 200
    assert results["blob"].status_code == 400 and "too big" in results["blob"].json()["detail"]
    assert results["loop"].status_code == 400 and "time limit" in results["loop"].json()["detail"]
    assert "its limit (retrieve serve --where-timeout)" in results["loop"].json()["detail"]
    assert "where_timeout" not in results["loop"].json()["detail"]  # no client can set it


def test_a_symlink_swapped_for_a_file_outside_is_not_served(tmp_path, tiny_model):
    folder = tmp_path / "photos"
    real = write_image(tmp_path / "elsewhere" / "real.png", (10, 200, 30))
    write_image(folder / "kept.png", (200, 10, 30))
    (folder / "linked.png").symlink_to(folder / "kept.png")  # inside the source: indexed
    (folder / "outside.png").symlink_to(real)  # leads outside: skipped
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        report = index.add(folder)
    assert any("outside the sources" in s.reason for s in report.skipped)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"top secret " * 100)
    with running_server(tmp_path / "index") as base:
        hits = httpx.get(f"{base}/api/search", params={"q": "x", "target": "image", "k": 10}).json()
        assert sorted(Path(h["path"]).name for h in hits) == ["kept.png", "linked.png"]
        linked = next(h["id"] for h in hits if h["path"].endswith("linked.png"))
        assert httpx.get(f"{base}/api/items/{linked}/file").status_code == 200
        (folder / "linked.png").unlink()
        (folder / "linked.png").symlink_to(secret)
        stat = (folder / "kept.png").stat()
        os.truncate(secret, stat.st_size)  # same size and mtime as the file it replaces
        os.utime(secret, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        for route in ("/file", "/thumbnail"):
            assert httpx.get(f"{base}/api/items/{linked}{route}").status_code == 404


def test_a_chunked_upload_is_refused_once_past_the_limit(photos):
    """A body with no length, streamed forever, is answered 413 after about the limit."""
    with running_server(photos[1], max_upload_mb=1) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(b"POST /api/search HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
            part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
                    b"Content-Type: image/png\r\n\r\n")
            conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            chunk = b"x" * 65536
            sent = 0
            answer = b""
            conn.settimeout(0.05)
            while sent < 200 * 2**20 and not answer:
                try:
                    conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                    answer = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:  # the server closed the connection after answering
                    break
            conn.settimeout(30)
            answer = answer or conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    assert sent < 8 * 2**20  # refused while streaming, not after 200 MB


def test_the_access_log_has_one_line_per_request_without_secrets(photos, caplog):
    with caplog.at_level("INFO", logger="retrieval.access"):
        with running_server(photos[1], token="s3cret") as base:
            httpx.get(f"{base}/api/search", params={"q": "private words"},
                      headers={"Authorization": "Bearer s3cret"})
            httpx.get(f"{base}/api/items/1", headers={"Authorization": "Bearer s3cret"})
    lines = [r.getMessage() for r in caplog.records if r.name == "retrieval.access"]
    assert lines[0].startswith("GET /api/search 200 ") and lines[0].endswith("ms")
    assert lines[1].startswith("GET /api/items/{item_id} 200 ")
    assert not any("s3cret" in line or "private" in line for line in lines)
