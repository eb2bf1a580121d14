"""The search service: a JSON HTTP API over one index, and the web page that uses it.

The model loads once, so a warm query costs milliseconds. The index is opened read-only and
checked for newer commits on every search, so a build running beside the server shows up
without a restart. Requests run side by side: each thread reads SQLite on a connection of its
own, FAISS searches are read-only, and a reload swaps in a whole new FAISS index. Uploads are
decoded and encoded in a small bounded pool, and their bytes are counted as they stream in.

Safety: with a token (`token=`, `retrieve serve --token` or RETRIEVAL_TOKEN) every API route
needs `Authorization: Bearer <token>`; the page itself is served without one and sends the
token it is given in its URL (`#token=...`). Requests naming a Host not on the allow-list are
refused (DNS rebinding). Raw SQL (`where=`) is refused unless `allow_sql`. Files are only ever
served by item id, and only when they are the file that was indexed: under an indexed root,
after resolving links, and the very file (device, inode, size, mtime) the index recorded.

    retrieve serve --index indexes/photos            # http://127.0.0.1:8000, docs at /docs
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import io
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel

from ..core.errors import NoAudioEncoderError, QueryTooLargeError, RetrievalError, UsageError
from ..core.paths import is_under, path_from_display
from ..core.types import MAX_UPLOAD_MB_RANGE, Hit
from ..index import Index
from ..media.images import ImageDecodeError, load_image
from ..query.encode import MediaCaps
from .fanout import LocalShard, RemoteShard, ShardedIndex, open_shards

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20
NO_AUDIO_ENCODER = ("this index has no audio encoder: it was built without --audio-model and no "
                    "audio tower was trained (retrieve train-audio); search it with text or images")
DEFAULT_DEADLINE_S = 30.0  # a request still running after this is answered 503
DEFAULT_UPLOAD_WORKERS = 2  # uploads decoded and encoded at once; more wait for a turn
THUMBNAIL_SIZES = (64, 1024)  # smallest and largest side a thumbnail may be asked for
SERVED_MODALITIES = ("image", "audio", "video")  # files a page can show or play
MAX_ID = 2**63 - 1  # SQLite's integers: a larger id names nothing
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
Target = Literal["auto", "image", "text", "audio", "video"]
Modality = Literal["image", "text", "audio", "video"]
access_log = logging.getLogger("retrieval.access")

# The page runs only its own script and style, draws images from here, and cannot be framed.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Swagger UI's page starts itself with an inline script.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; frame-ancestors 'none'")


class Detail(BaseModel):
    """Every error reply: one line saying what was wrong."""

    detail: str | list


class Caption(BaseModel):
    text: str


class ItemInfo(BaseModel):
    """One item, with its file's size and mtime (seconds) and every caption of an image."""

    id: int
    modality: str
    uri: str
    path: str | None
    text: str | None
    size: int | None
    mtime: float | None
    metadata: dict
    captions: list[Caption]


def _errors(*statuses: int) -> dict:
    text = {400: "A bad request: the detail names the culprit", 401: "A token is needed (Bearer)",
            404: "No such item, or no file to serve",
            413: "An upload over a cap (bytes, megapixels, or seconds of sound or video)",
            422: "A request this index cannot answer: a sound or video on an index with no audio "
                 "encoder (or a field out of range)",
            503: "The index cannot answer now, or the request ran past its deadline"}
    return {status: {"model": Detail, "description": text[status]} for status in statuses}


class SearchService:
    """One read-only index, or a set of shards (`fanout.ShardedIndex`), shared by the request
    threads without a lock: every reader has its own SQLite connection per thread."""

    def __init__(self, index: Index | ShardedIndex, relative_paths: bool = False,
                 upload_workers: int = DEFAULT_UPLOAD_WORKERS) -> None:
        self.index = index
        self.relative_paths = relative_paths
        self.uploads = threading.BoundedSemaphore(upload_workers)

    def roots(self) -> list[str]:
        indexes = [self.index] if isinstance(self.index, Index) else [
            s.index for s in self.index.shards if isinstance(s, LocalShard)]
        return [root for index in indexes for root in index.store.sources()]

    def shown(self, data: dict) -> dict:
        """A hit's or item's dict, with paths relative to their root when asked to."""
        if not self.relative_paths:
            return data
        roots = self.roots()
        for key in ("path", "uri"):
            if isinstance(data.get(key), str):
                data[key] = _relative(data[key], roots)
        metadata = data.get("metadata") or {}
        if isinstance(metadata.get("image"), str):
            metadata["image"] = _relative(metadata["image"], roots)
        return data

    def search(self, **query) -> tuple[list[dict], list[str]]:
        """Hits as dicts, and the shards that did not answer (partial results)."""
        if isinstance(self.index, ShardedIndex):
            hits, failed = self.index.search_partial(**query)
        else:
            hits, failed = self.index.search(**query), []
        return [self.shown(hit.to_dict()) for hit in hits], failed

    def item(self, item_id: int) -> Hit:
        hit = self.index.item(item_id) if 0 <= item_id <= MAX_ID else None
        if hit is None:
            raise HTTPException(404, f"no item with id {item_id}")
        return hit

    def item_info(self, item_id: int) -> dict:
        hit = self.item(item_id)
        data = hit.to_dict()
        data.pop("score")
        captions = data["metadata"].get("captions") or []
        index, local = self.owner(item_id)
        row = None
        if isinstance(index, Index) and hit.path:
            row = index.store.file_row(hit.path)
        return self.shown({**data, "size": row.size if row else None,
                           "mtime": row.mtime_ns / 1e9 if row else None,
                           "captions": [{"text": text} for text in captions]})

    def item_vector(self, item_id: int) -> dict:
        self.item(item_id)  # a 404 for unknown ids
        modality, vector = self.index.item_vector(item_id)
        return {"id": item_id, "modality": modality, "vector": [float(x) for x in vector]}

    def stop_filters(self) -> None:
        """Stop the raw SQL filters running now and refuse new ones (the server is stopping):
        their requests are answered 503 instead of holding the exit."""
        indexes = [self.index] if isinstance(self.index, Index) else [
            s.index for s in self.index.shards if isinstance(s, LocalShard)]
        for index in indexes:
            index.store.interrupt()

    def close(self) -> None:
        """Stop waiting on shards (a hung one must not hold the exit) and close the index."""
        self.stop_filters()
        if isinstance(self.index, ShardedIndex):
            self.index.pool.shutdown(wait=False, cancel_futures=True)

    def health(self) -> dict:
        """Liveness; with shards, each shard's answer to its own health check."""
        if not isinstance(self.index, ShardedIndex):
            return {"status": "ok", "items": sum(self.index.stats()["counts"].values())}
        shards = self.index.health()
        local = [s.index for s in self.index.shards if isinstance(s, LocalShard)]
        return {"status": "ok" if all(shards.values()) else "degraded",
                "items": sum(sum(index.stats()["counts"].values()) for index in local),
                "shards": shards}

    def stats(self) -> dict:
        stats = self.index.stats()
        if self.relative_paths:
            stats["path"] = os.path.basename(stats["path"]) if stats.get("path") else None
            for shard in stats.get("shards", []):
                shard["path"] = os.path.basename(shard["path"] or "") or None
                if "://" not in shard["name"]:
                    shard["name"] = os.path.basename(shard["name"])
        return stats

    def owner(self, item_id: int) -> tuple[Index | RemoteShard, int]:
        """The index (or remote shard) holding an item, and the item's id there."""
        if not 0 <= item_id <= MAX_ID:
            raise HTTPException(404, f"no item with id {item_id}")
        if not isinstance(self.index, ShardedIndex):
            return self.index, item_id
        shard, local = self.index.locate(item_id)
        return (shard.index if isinstance(shard, LocalShard) else shard), local

    def indexed_file(self, index: Index, item_id: int) -> tuple[Path, int]:
        """The file behind an item of `index`, opened, if it is still the file that was indexed:
        its real path under an indexed root, and the opened file's identity the one recorded.
        Returns the path and an open descriptor; else 404."""
        hit = index.item(item_id)
        path = hit.path if hit is not None and hit.modality in SERVED_MODALITIES else None
        row = index.store.file_row(path) if path else None
        refused = HTTPException(404, f"item {item_id} has no indexed file to serve "
                                "(it holds text, or its file changed since it was indexed)")
        if row is None:
            raise refused
        from ..media.corpus import open_indexed_file

        anywhere = any(options.get("follow_external_links")
                       for options in index.store.source_options().values())
        opened = open_indexed_file(path_from_display(path), index.store.sources(), row.size,
                                   row.mtime_ns, anywhere)
        if opened is None:
            raise refused
        return opened


class LimitBody:
    """ASGI middleware counting a request's body as it streams in: a body over `limit` bytes
    (chunked or not) is answered 413 as soon as the limit is passed, not after reading it all."""

    def __init__(self, app, limit: int, message: str) -> None:
        self.app = app
        self.limit = limit
        self.message = message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        seen = 0
        started = refused = False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Answer now, and tell the app the client has gone, so it stops reading.
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def sending(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, send):
        body = json.dumps({"detail": self.message}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def create_app(index_dir: str | Path | Sequence[str | Path], device: str = "auto",
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, shard_urls: Sequence[str] = (), *,
               token: str | None = None, allow_sql: bool = False, where_timeout: float = 3.0,
               allowed_hosts: Sequence[str] = (), relative_paths: bool = False,
               shard_timeout: float = 10.0, deadline_s: float = DEFAULT_DEADLINE_S, int8: bool = False,
               upload_workers: int = DEFAULT_UPLOAD_WORKERS, max_megapixels: float | None = None,
               max_audio_seconds: float | None = None, max_video_seconds: float | None = None
               ) -> FastAPI:
    """The FastAPI application serving the index at `index_dir`; with several folders, or
    servers at `shard_urls`, it fans each search out to all of them as shards.

    `token`: required as a bearer token on every API route. `allowed_hosts`: Host names
    accepted beside the local ones ("*" accepts any). `allow_sql`: take raw SQL `where=`, run
    for at most `where_timeout` seconds. `relative_paths`: show paths relative to the roots.
    `shard_timeout`: seconds a remote shard may take. `deadline_s`: seconds a request may take.
    `int8`: encode text queries with the 8-bit text tower (as `Index.open(int8=True)`).
    `max_upload_mb`: the largest upload, counted as it streams in; `max_megapixels`,
    `max_audio_seconds`, `max_video_seconds`: the largest query image and longest query sound
    and video decoded (413 beyond; defaults as for indexing).
    """
    low, high = MAX_UPLOAD_MB_RANGE
    if not low <= max_upload_mb <= high:  # NaN too
        raise UsageError(f"`max_upload_mb` must be between {low:g} and {high:g} (megabytes), "
                         f"not {max_upload_mb:g}")
    caps = MediaCaps.given(max_megapixels, max_audio_seconds, max_video_seconds)  # bad ones first
    folders = [index_dir] if isinstance(index_dir, (str, Path)) else list(index_dir)
    if len(folders) == 1 and not shard_urls:
        index: Index | ShardedIndex = Index.open(folders[0], readonly=True, device=device, int8=int8)
    else:
        index = ShardedIndex(open_shards(folders, shard_urls, device, shard_timeout=shard_timeout,
                                         token=token, int8=int8))
    service = SearchService(index, relative_paths, upload_workers)
    limit = int(max_upload_mb * 2**20)
    hosts = {h.lower() for h in (*LOCAL_HOSTS, *allowed_hosts)}
    app = FastAPI(title="retrieval", summary="Search images, texts and sounds by meaning.",
                  docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.media_caps = caps
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _mount_docs(app)

    @app.exception_handler(RetrievalError)
    def engine_error(request: Request, error: RetrievalError) -> JSONResponse:
        if isinstance(error, QueryTooLargeError):  # the cap, named as the option that sets it
            option = "retrieve serve --" + error.parameter.replace("_", "-")
            return JSONResponse({"detail": str(error).replace(f"`{error.parameter}`", option)},
                                status_code=413)
        if isinstance(error, NoAudioEncoderError):  # the index's, not the request's: no retry mends it
            return JSONResponse({"detail": NO_AUDIO_ENCODER}, status_code=422)
        # the filter's time limit is the server operator's option, not the client's
        detail = str(error).replace("raise `where_timeout`", "ask the server's operator to raise "
                                    "its limit (retrieve serve --where-timeout)")
        return JSONResponse({"detail": detail}, status_code=400 if isinstance(error, UsageError) else 503)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.monotonic()
        path = request.url.path
        host = _host_name(request.headers.get("host") or "")
        if "*" not in hosts and host not in hosts:
            response = JSONResponse({"detail": f"host {host!r} is not served here; start the server "
                                     "with --allow-host NAME to accept it"}, status_code=400)
        elif token and path.startswith("/api/") and not _authorized(request, token):
            response = JSONResponse({"detail": "a token is needed: send Authorization: Bearer TOKEN "
                                     "(the page takes it as #token=TOKEN)"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        else:
            try:
                response = await asyncio.wait_for(call_next(request), deadline_s)
            except asyncio.TimeoutError:
                response = JSONResponse({"detail": f"the request took longer than {deadline_s:g} s "
                                         "and was stopped"}, status_code=503)
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
        if path == "/docs":
            response.headers["Content-Security-Policy"] = DOCS_CSP
        route = request.scope.get("route")
        access_log.info("%s %s %d %.1fms", request.method, getattr(route, "path", path),
                        response.status_code, (time.monotonic() - started) * 1000)
        return response

    app.add_middleware(LimitBody, limit=limit + 64 * 1024,  # room for the form's other fields
                       message=f"upload too large: the limit is {max_upload_mb:g} MB "
                       "(retrieve serve --max-upload-mb)")

    def run_search(uploads: bool, where: str | None, **query) -> Response:
        if where is not None and not allow_sql:
            raise HTTPException(400, "raw SQL (where=) is off on this server; use filter= "
                                "(e.g. filter=modality:image under:2020), or start it with --allow-sql")
        if where is not None:
            query.update(where=where, where_timeout=where_timeout)
        query.update(max_megapixels=caps.max_megapixels, max_audio_seconds=caps.max_audio_seconds,
                     max_video_seconds=caps.max_video_seconds)
        if uploads:
            with service.uploads:  # decoding and encoding: a few at a time, outside any lock
                hits, failed = service.search(**query)
        else:
            hits, failed = service.search(**query)
        headers = {"X-Failed-Shards": ", ".join(failed)} if failed else None
        return JSONResponse(hits, headers=headers)

    search_responses = {**_errors(400, 401, 413, 422, 503), 200: {
        "description": "Hits, best first; when some shards did not answer, the X-Failed-Shards "
                       "header names them (partial results)"}}

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/health", summary="Liveness, and how many items the index holds",
             responses=_errors(401, 503))
    def health() -> dict:
        return service.health()

    @app.get("/api/stats", summary="Model, vector size, counts and index type",
             responses={**_errors(401, 503), 200: {
                 "description": "The statistics; with shards, each answering shard's, the counts summed "
                                "over them, and those that did not answer in failed_shards and the "
                                "X-Failed-Shards header"}}, response_model=dict)
    def stats() -> JSONResponse:
        stats = service.stats()
        failed = stats.get("failed_shards")
        return JSONResponse(stats, headers={"X-Failed-Shards": ", ".join(failed)} if failed else None)

    @app.get("/api/search", summary="Search by text, a combined query or an item id",
             responses=search_responses, response_model=list[dict])
    def search_get(q: str | None = None, like: int | None = None,
                   k: Annotated[int, Query(ge=1, le=1000)] = 10,
                   target: Target = "auto", filter: str | None = None,
                   where: str | None = None, under: str | None = None,
                   min_score: float | None = None, vector: str | None = None,
                   vector_of: Modality = "image", dedup: bool = False):
        return run_search(False, where, query=q or None, like=_like(like), k=k, target=target,
                          filter=filter, under=under or None, min_score=min_score, dedup=dedup,
                          **_vector_query(vector, vector_of))

    @app.post("/api/search", summary="Search with uploaded images, sounds and videos, text and items",
              responses=search_responses, response_model=list[dict])
    def search_post(q: Annotated[str | None, Form()] = None,
                    like: Annotated[int | None, Form()] = None,
                    image: Annotated[list[UploadFile], File()] = (),
                    audio: Annotated[list[UploadFile], File()] = (),
                    video: Annotated[list[UploadFile], File()] = (),
                    k: Annotated[int, Form(ge=1, le=1000)] = 10,
                    target: Annotated[Target, Form()] = "auto",
                    filter: Annotated[str | None, Form()] = None,
                    where: Annotated[str | None, Form()] = None,
                    under: Annotated[str | None, Form()] = None,
                    min_score: Annotated[float | None, Form()] = None,
                    vector: Annotated[str | None, Form()] = None,
                    vector_of: Annotated[Modality, Form()] = "image",
                    dedup: Annotated[bool, Form()] = False):
        images = [_uploaded(upload, limit, "image") for upload in image]
        sounds = [_uploaded(upload, limit, "audio") for upload in audio]
        videos = [_uploaded(upload, limit, "video") for upload in video]
        return run_search(bool(images or sounds or videos), where, query=q or None, like=_like(like),
                          image=images or None, audio=sounds or None, video=videos or None, k=k,
                          target=target, filter=filter, under=under or None, min_score=min_score, dedup=dedup,
                          **_vector_query(vector, vector_of))

    @app.get("/api/items/{item_id}", summary="An item: its file's size and mtime, metadata and "
             "every caption of an image", responses=_errors(401, 404, 503))
    def item(item_id: int) -> ItemInfo:
        return service.item_info(item_id)

    @app.get("/api/items/{item_id}/vector", summary="An item's modality and stored vector "
             "(what a search's vector and vector_of fields take)", responses=_errors(401, 404, 503))
    def item_vector(item_id: int) -> dict:
        return service.item_vector(item_id)

    @app.get("/api/items/{item_id}/thumbnail", summary="A JPEG thumbnail of an image (or of a "
             "caption's image), cached", response_class=Response,
             responses={**_errors(401, 404, 503), 200: {"content": {"image/jpeg": {}}},
                        304: {"description": "Not modified (ETag)"}})
    def thumbnail(item_id: int, request: Request,
                  size: Annotated[int, Query(ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1])] = 256
                  ) -> Response:
        index, local = service.owner(item_id)
        if isinstance(index, RemoteShard):
            content, media_type = index.fetch(f"/api/items/{local}/thumbnail", {"size": size})
            return Response(content, media_type=media_type)
        path, descriptor = service.indexed_file(index, _image_of(index, local))
        try:
            stat = os.fstat(descriptor)
            tag = f'"{stat.st_size}-{stat.st_mtime_ns}-{size}"'
            if request.headers.get("if-none-match") == tag:
                return Response(status_code=304, headers={"ETag": tag})
            data = _thumbnail(str(path), stat.st_mtime_ns, size, descriptor)
        finally:
            os.close(descriptor)
        return Response(data, media_type="image/jpeg",
                        headers={"ETag": tag, "Cache-Control": "max-age=3600"})

    @app.get("/api/items/{item_id}/file", summary="The original file of an image or sound "
             "(with range requests, so sounds can seek)", response_class=FileResponse,
             responses={**_errors(401, 404, 503), 206: {"description": "Part of the file (Range)"}})
    def original(item_id: int) -> Response:
        index, local = service.owner(item_id)
        if isinstance(index, RemoteShard):  # relayed whole: no range requests through a relay
            content, media_type = index.fetch(f"/api/items/{local}/file")
            return Response(content, media_type=media_type)
        path, descriptor = service.indexed_file(index, local)
        # Served from the descriptor checked above, so a swap after the check changes nothing.
        return FileResponse(f"/dev/fd/{descriptor}", media_type=_media_type(path),
                            background=_Closing(descriptor), stat_result=os.fstat(descriptor))

    return app


class _Closing:
    """A background task closing a served file's descriptor once the response is sent."""

    def __init__(self, descriptor: int) -> None:
        self.descriptor = descriptor

    async def __call__(self) -> None:
        os.close(self.descriptor)


def _relative(path: str, roots: list[str]) -> str:
    """`path` shown from the folder holding its root: /data/photos/a.jpg is photos/a.jpg."""
    for root in roots:
        if is_under(path, [root]):
            return os.path.relpath(path, os.path.dirname(root.rstrip(os.sep)))
    return path


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` is `[::1]`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _media_type(path: Path) -> str:
    import mimetypes

    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _authorized(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _like(item_id: int | None) -> int | None:
    if item_id is not None and not 0 <= item_id <= MAX_ID:
        raise HTTPException(400, f"no item with id {item_id}")
    return item_id


def _mount_docs(app: FastAPI) -> None:
    """OpenAPI docs with a current Swagger UI (it reads OpenAPI 3.1) served from the installed
    swagger-ui-py package: the machines may have no internet."""
    spec = importlib.util.find_spec("swagger_ui")
    assets = Path(spec.submodule_search_locations[0]) / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="retrieval API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def _vector_query(vector: str | None, vector_of: str) -> dict:
    """A query vector sent as a JSON list of numbers, as search keywords."""
    if vector is None:
        return {}
    try:
        values = json.loads(vector)
        if not isinstance(values, list) or not values:
            raise ValueError
        return {"vector": [float(x) for x in values], "vector_of": vector_of}
    except (ValueError, TypeError, OverflowError):
        raise HTTPException(400, "vector must be a JSON list of numbers, e.g. [0.1, -0.3, ...]") from None


def _uploaded(upload: UploadFile, limit: int, kind: str) -> io.BytesIO:
    """An upload's bytes (at most `limit`), named for error messages."""
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{kind} upload {upload.filename!r} is larger than "
                            f"{limit / 2**20:.3g} MB")  # 0.01, not the 0.00999928 of whole bytes
    if not data:
        raise HTTPException(400, f"{kind} upload {upload.filename!r} is empty")
    stream = io.BytesIO(data)
    stream.name = upload.filename or f"{kind} upload"
    return stream


def _image_of(index: Index, item_id: int) -> int:
    """The image item of `index` to draw for an item: itself, or the image a caption belongs to."""
    hit = index.item(item_id)
    if hit is None:
        raise HTTPException(404, f"no item with id {item_id}")
    if hit.modality == "image":
        return item_id
    image_id = index.store.item_id(hit.metadata.get("image") or "", "image")
    if image_id is None:
        raise HTTPException(404, f"item {item_id} has no image to draw")
    return image_id


_thumbnails: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
_thumbnails_lock = threading.Lock()
THUMBNAILS_CACHED = 2048


def _thumbnail(path: str, mtime_ns: int, size: int, descriptor: int) -> bytes:
    """JPEG bytes of an image, read from its checked `descriptor`, scaled to fit `size`;
    cached by path, mtime and size."""
    key = (path, mtime_ns, size)
    with _thumbnails_lock:
        if key in _thumbnails:
            _thumbnails.move_to_end(key)
            return _thumbnails[key]
    try:
        with os.fdopen(os.dup(descriptor), "rb") as source:
            image = load_image(source, min_side=size)
    except ImageDecodeError as error:
        raise HTTPException(404, f"cannot draw {path}: {error}") from None
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    with _thumbnails_lock:
        _thumbnails[key] = out.getvalue()
        while len(_thumbnails) > THUMBNAILS_CACHED:
            _thumbnails.popitem(last=False)
    return out.getvalue()
