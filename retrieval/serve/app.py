"""The search service: a JSON HTTP API over one index, and the web page that uses it.

The model loads once, so a warm query costs milliseconds. The index is opened read-only and
checked for newer commits on every search, so a build running beside the server shows up
without a restart. Files are only ever served by item id, and only when they are the file
that was indexed (same place under a source of the index, same size and mtime).

    retrieve serve --index indexes/photos            # http://127.0.0.1:8000, docs at /docs
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image

from ..core.errors import RetrievalError, UsageError
from ..core.paths import is_under, path_from_display
from ..core.types import TARGETS, Hit
from ..index import Index
from ..media.images import ImageDecodeError, load_image
from .fanout import LocalShard, RemoteShard, ShardedIndex, open_shards

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20
THUMBNAIL_SIZES = (64, 1024)  # smallest and largest side a thumbnail may be asked for
SERVED_MODALITIES = ("image", "audio", "video")  # files a page can show or play
MODALITY_PATTERN = "^(image|text|audio|video)$"


class SearchService:
    """One read-only index, or a set of shards (`fanout.ShardedIndex`), shared by the request
    threads, one search at a time."""

    def __init__(self, index: Index | ShardedIndex) -> None:
        self.index = index
        self.lock = threading.Lock()

    def search(self, **query) -> list[dict]:
        with self.lock:
            return [hit.to_dict() for hit in self.index.search(**query)]

    def item(self, item_id: int) -> Hit:
        with self.lock:
            hit = self.index.item(item_id)
        if hit is None:
            raise HTTPException(404, f"no item with id {item_id}")
        return hit

    def item_vector(self, item_id: int) -> dict:
        self.item(item_id)  # a 404 for unknown ids
        with self.lock:
            modality, vector = self.index.item_vector(item_id)
        return {"id": item_id, "modality": modality, "vector": [float(x) for x in vector]}

    def stats(self) -> dict:
        with self.lock:
            return self.index.stats()

    def owner(self, item_id: int) -> tuple[Index | RemoteShard, int]:
        """The index (or remote shard) holding an item, and the item's id there."""
        if not isinstance(self.index, ShardedIndex):
            return self.index, item_id
        shard, local = self.index.locate(item_id)
        return (shard.index if isinstance(shard, LocalShard) else shard), local

    def indexed_file(self, index: Index, item_id: int) -> Path:
        """The file behind an item of `index`, if it is still the file that was indexed; else 404."""
        with self.lock:
            hit = index.item(item_id)
            path = hit.path if hit is not None and hit.modality in SERVED_MODALITIES else None
            row = index.store.file_row(path) if path else None
            sources = index.store.sources()
        real = path_from_display(path) if row is not None else ""  # stored paths are escaped
        if row is None or not is_under(real, sources) or not _same_file(real, row.size, row.mtime_ns):
            raise HTTPException(404, f"item {item_id} has no indexed file to serve "
                                "(it holds text, or its file changed since it was indexed)")
        return Path(real)


def create_app(index_dir: str | Path | Sequence[str | Path], device: str = "auto",
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, shard_urls: Sequence[str] = ()) -> FastAPI:
    """The FastAPI application serving the index at `index_dir`; with several folders, or
    servers at `shard_urls`, it fans each search out to all of them as shards."""
    folders = [index_dir] if isinstance(index_dir, (str, Path)) else list(index_dir)
    if len(folders) == 1 and not shard_urls:
        service = SearchService(Index.open(folders[0], readonly=True, device=device))
    else:
        service = SearchService(ShardedIndex(open_shards(folders, shard_urls, device)))
    limit = int(max_upload_mb * 2**20)
    app = FastAPI(title="retrieval", summary="Search images, texts and sounds by meaning.",
                  docs_url=None, redoc_url=None)
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _mount_docs(app)

    @app.exception_handler(RetrievalError)
    def engine_error(request: Request, error: RetrievalError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400 if isinstance(error, UsageError) else 503)

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit + 64 * 1024:  # room for the form's other fields
            return JSONResponse({"detail": f"upload too large: the limit is {max_upload_mb:g} MB "
                                 "(retrieve serve --max-upload-mb)"}, status_code=413)
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/api/health", summary="Liveness, and how many items the index holds")
    def health() -> dict:
        return {"status": "ok", "items": sum(service.stats()["counts"].values())}

    @app.get("/api/stats", summary="Model, vector size, counts and index type")
    def stats() -> dict:
        return service.stats()

    @app.get("/api/search", summary="Search by text, a combined query or an item id")
    def search_get(q: str | None = None, like: int | None = None,
                   k: Annotated[int, Query(ge=1, le=1000)] = 10,
                   target: Annotated[str, Query(pattern="|".join(TARGETS))] = "auto",
                   where: str | None = None, under: str | None = None,
                   min_score: float | None = None, vector: str | None = None,
                   vector_of: Annotated[str, Query(pattern=MODALITY_PATTERN)] = "image",
                   dedup: bool = False) -> list[dict]:
        return service.search(query=q or None, like=like, k=k, target=target, where=where,
                              under=under, min_score=min_score, dedup=dedup,
                              **_vector_query(vector, vector_of))

    @app.post("/api/search", summary="Search with uploaded images, sounds and videos, text and items")
    def search_post(q: Annotated[str | None, Form()] = None,
                    like: Annotated[int | None, Form()] = None,
                    image: Annotated[list[UploadFile], File()] = (),
                    audio: Annotated[list[UploadFile], File()] = (),
                    video: Annotated[list[UploadFile], File()] = (),
                    k: Annotated[int, Form(ge=1, le=1000)] = 10,
                    target: Annotated[str, Form(pattern="|".join(TARGETS))] = "auto",
                    where: Annotated[str | None, Form()] = None,
                    under: Annotated[str | None, Form()] = None,
                    min_score: Annotated[float | None, Form()] = None,
                    vector: Annotated[str | None, Form()] = None,
                    vector_of: Annotated[str, Form(pattern=MODALITY_PATTERN)] = "image",
                    dedup: Annotated[bool, Form()] = False) -> list[dict]:
        images = [_uploaded(upload, limit, "image") for upload in image]
        sounds = [_uploaded(upload, limit, "audio") for upload in audio]
        videos = [_uploaded(upload, limit, "video") for upload in video]
        return service.search(query=q or None, like=like, image=images or None,
                              audio=sounds or None, video=videos or None, k=k, target=target,
                              where=where, under=under, min_score=min_score, dedup=dedup,
                              **_vector_query(vector, vector_of))

    @app.get("/api/items/{item_id}", summary="An item's metadata")
    def item(item_id: int) -> dict:
        data = service.item(item_id).to_dict()
        data.pop("score")
        return data

    @app.get("/api/items/{item_id}/vector", summary="An item's modality and stored vector "
             "(what a search's vector and vector_of fields take)")
    def item_vector(item_id: int) -> dict:
        return service.item_vector(item_id)

    @app.get("/api/items/{item_id}/thumbnail", summary="A JPEG thumbnail of an image (or of a "
             "caption's image), cached", response_class=Response)
    def thumbnail(item_id: int, request: Request,
                  size: Annotated[int, Query(ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1])] = 256
                  ) -> Response:
        index, local = service.owner(item_id)
        if isinstance(index, RemoteShard):
            content, media_type = index.fetch(f"/api/items/{local}/thumbnail", {"size": size})
            return Response(content, media_type=media_type)
        path = service.indexed_file(index, _image_of(service, index, local))
        stat = path.stat()
        tag = f'"{stat.st_size}-{stat.st_mtime_ns}-{size}"'
        if request.headers.get("if-none-match") == tag:
            return Response(status_code=304, headers={"ETag": tag})
        data = _thumbnail(str(path), stat.st_mtime_ns, size)
        return Response(data, media_type="image/jpeg",
                        headers={"ETag": tag, "Cache-Control": "max-age=3600"})

    @app.get("/api/items/{item_id}/file", summary="The original file of an image or sound "
             "(with range requests, so sounds can seek)", response_class=FileResponse)
    def original(item_id: int) -> Response:
        index, local = service.owner(item_id)
        if isinstance(index, RemoteShard):  # relayed whole: no range requests through a relay
            content, media_type = index.fetch(f"/api/items/{local}/file")
            return Response(content, media_type=media_type)
        return FileResponse(service.indexed_file(index, local))

    return app


def _mount_docs(app: FastAPI) -> None:
    """OpenAPI docs with Swagger UI's files served from here: the machines may have no internet."""
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

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
    except (ValueError, TypeError):
        raise HTTPException(400, "vector must be a JSON list of numbers, e.g. [0.1, -0.3, ...]") from None


def _uploaded(upload: UploadFile, limit: int, kind: str) -> io.BytesIO:
    """An upload's bytes (at most `limit`), named for error messages."""
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"{kind} upload {upload.filename!r} is larger than "
                            f"{limit / 2**20:g} MB")
    if not data:
        raise HTTPException(400, f"{kind} upload {upload.filename!r} is empty")
    stream = io.BytesIO(data)
    stream.name = upload.filename or f"{kind} upload"
    return stream


def _image_of(service: SearchService, index: Index, item_id: int) -> int:
    """The image item of `index` to draw for an item: itself, or the image a caption belongs to."""
    with service.lock:
        hit = index.item(item_id)
        if hit is None:
            raise HTTPException(404, f"no item with id {item_id}")
        if hit.modality == "image":
            return item_id
        image_id = index.store.item_id(hit.metadata.get("image") or "", "image")
    if image_id is None:
        raise HTTPException(404, f"item {item_id} has no image to draw")
    return image_id


@lru_cache(maxsize=2048)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes:
    """JPEG bytes of an image scaled to fit `size`; cached by path, mtime and size."""
    try:
        image = load_image(path, min_side=size)
    except ImageDecodeError as error:
        raise HTTPException(404, f"cannot draw {path}: {error}") from None
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def _same_file(path: str, size: int, mtime_ns: int) -> bool:
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return stat.st_size == size and stat.st_mtime_ns == mtime_ns
