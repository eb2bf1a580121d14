"""Sharded search: one query fanned out to several index shards, their hits merged by score.

A shard is an index folder opened in this process, or a `retrieve serve` reached over HTTP.
Every shard must embed with the same model: scores are then cosine similarities in one space,
and the best k hits of all shards are the best k overall.

The query is encoded once, here, by the first local shard's model, and its vector is sent to
every shard; only a front with no local shard sends the query itself (each remote shard then
encodes it).

Hits get global ids, `local id * MAX_SHARDS + shard number`, so an id names its shard and a
later call (`item`, `like=`) goes back to it. "More like this" asks the owning shard for the
item's vector and sends that vector to every shard.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..core.errors import RetrievalError, UsageError
from ..core.types import Hit
from ..index import Index
from ..query.encode import MediaCaps
from ..query.filters import parse_filter
from .client import server_error

MAX_SHARDS = 1000
DEFAULT_SHARD_TIMEOUT_S = 10.0
MEDIA_CAPS = tuple(cap.name for cap in fields(MediaCaps))  # the search options that cap query media


class LocalShard:
    """An index folder opened read-only here; searched from many threads at once (each has
    its own SQLite connection)."""

    def __init__(self, folder: str | Path, device: str = "auto", int8: bool = False) -> None:
        self.index = Index.open(folder, readonly=True, device=device, int8=int8)
        self.name = str(self.index.path)

    def search(self, **query) -> list[Hit]:
        return self.index.search(**query)

    def item(self, item_id: int) -> Hit | None:
        return self.index.item(item_id)

    def item_vector(self, item_id: int) -> tuple[str, np.ndarray]:
        return self.index.item_vector(item_id)

    def stats(self) -> dict:
        return self.index.stats()

    def healthy(self) -> bool:
        return True

    def close(self) -> None:
        self.index.close()


class RemoteShard:
    """A `retrieve serve` at `url`, searched through its JSON API; every call gives up after
    `timeout` seconds (a stopped or hung shard costs that, never more)."""

    def __init__(self, url: str, timeout: float = DEFAULT_SHARD_TIMEOUT_S, token: str | None = None) -> None:
        import httpx

        self.name = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.client = httpx.Client(base_url=self.name, timeout=timeout, headers=headers)

    def healthy(self) -> bool:
        """The shard answers its health check within the timeout."""
        try:
            self._call("GET", "/api/health")
            return True
        except RetrievalError:
            return False

    def search(self, **query) -> list[Hit]:
        form, files = {}, []
        for name, value in query.items():
            if value is None:
                continue
            if name in ("image", "audio", "video"):
                files += [(name, (f"{name}-{n}", io.BytesIO(data))) for n, data in enumerate(value)]
            elif name == "vector":
                form[name] = json.dumps([float(x) for x in value])
            else:
                form[name] = str(value)
        if "query" in form:
            form["q"] = form.pop("query")
        found = self._call("POST", "/api/search", data=form, files=files or None)
        return [Hit.from_dict(hit) for hit in found]

    def item(self, item_id: int) -> Hit | None:
        data = self._call("GET", f"/api/items/{item_id}", missing_ok=True)
        return None if data is None else Hit.from_dict(data, score=1.0)

    def item_vector(self, item_id: int) -> tuple[str, np.ndarray]:
        data = self._call("GET", f"/api/items/{item_id}/vector")
        return data["modality"], np.asarray(data["vector"], np.float32)

    def stats(self) -> dict:
        return self._call("GET", "/api/stats")

    def fetch(self, path: str, params: dict | None = None) -> tuple[bytes, str]:
        """Raw bytes and media type of one of the shard's files or thumbnails."""
        response = self._send("GET", path, params=params)
        return response.content, response.headers.get("content-type", "application/octet-stream")

    def close(self) -> None:
        self.client.close()

    def _call(self, method: str, path: str, missing_ok: bool = False, **options):
        response = self._send(method, path, missing_ok, **options)
        return None if response is None else response.json()

    def _send(self, method: str, path: str, missing_ok: bool = False, **options):
        import httpx

        try:
            response = self.client.request(method, path, **options)
        except httpx.HTTPError as error:
            raise RetrievalError(f"shard {self.name}: unreachable ({error}); start it with "
                                 "retrieve serve, or leave it out") from None
        if response.status_code == 404 and missing_ok:
            return None
        if response.status_code >= 400:
            raise server_error(response, f"shard {self.name}")
        return response


Shard = LocalShard | RemoteShard


def open_shards(folders: Sequence[str | Path] = (), urls: Sequence[str] = (),
                device: str = "auto", shard_timeout: float = DEFAULT_SHARD_TIMEOUT_S,
                token: str | None = None, int8: bool = False) -> list[Shard]:
    """Local shards first, then remote ones; shard numbers follow this order. Remote shards
    give up after `shard_timeout` seconds and are sent `token` as a bearer token; local ones
    encode text queries with the 8-bit text tower for `int8`."""
    shards: list[Shard] = [LocalShard(folder, device, int8) for folder in folders]
    shards += [RemoteShard(url, shard_timeout, token) for url in urls]
    if not shards:
        raise UsageError("no shards: give at least one index folder or server URL")
    if len(shards) > MAX_SHARDS:
        raise UsageError(f"at most {MAX_SHARDS} shards, not {len(shards)}")
    return shards


class ShardedIndex:
    """Several shards searched as one index."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)
        # Remote shards wait on the network in a pool of their own, so a hung one never holds
        # up the work of local shards (which runs in the calling thread).
        remote = sum(isinstance(shard, RemoteShard) for shard in self.shards)
        self.pool = ThreadPoolExecutor(max_workers=max(1, 8 * remote))
        self.encoder = next((shard for shard in self.shards if isinstance(shard, LocalShard)), None)
        self._check_one_model()

    def _check_one_model(self) -> None:
        """Every shard answering now embeds with the first one's model (a shard that is down is
        checked by nobody: its searches fail soft); else a UsageError naming the odd shard."""
        try:
            stats = self.stats()
        except UsageError:
            raise
        except RetrievalError:  # none answers now: nothing to compare
            return
        models = [(s["name"], s["model"], s["dim"]) for s in stats["shards"]]
        name, model, dim = models[0]
        for other, other_model, other_dim in models[1:]:
            if (other_model, other_dim) != (model, dim):
                self.close()
                raise UsageError(f"shard {other} embeds with {_model_name(other_model)} ({other_dim} "
                                 f"numbers), not {_model_name(model)} ({dim}) as {name} does: "
                                 "shards must share one model")

    def locate(self, global_id: int) -> tuple[Shard, int]:
        """The shard holding a global id, and the id there."""
        number = global_id % MAX_SHARDS
        if global_id < 0 or number >= len(self.shards):
            raise UsageError(f"no item with id {global_id}: it names no shard of this service")
        return self.shards[number], global_id // MAX_SHARDS

    def search(self, query: str | None = None, **options) -> list[Hit]:
        """The best k hits of all shards, with global ids; options as `Index.search`'s. A shard
        that fails raises its error (see `search_partial` for results without it)."""
        hits, failed = self.search_partial(query, strict=True, **options)
        return hits

    def search_partial(self, query: str | None = None, *, like: int | None = None,
                       image: Sequence[BinaryIO] | None = None, audio: Sequence[BinaryIO] | None = None,
                       video: Sequence[BinaryIO] | None = None, k: int = 10, strict: bool = False,
                       **options) -> tuple[list[Hit], list[str]]:
        """The best k hits of the shards that answered, and the names of those that did not
        (unreachable, timed out or failing). A bad query (a UsageError) is raised as it is."""
        if like is not None:
            shard, local = self.locate(like)
            options["vector_of"], options["vector"] = shard.item_vector(local)
        parse_filter(options.get("filter"))  # a bad filter fails before any encoding
        caps = {name: options.pop(name) for name in MEDIA_CAPS if name in options}
        if self.encoder is not None:  # encoded once here; every shard gets the vector
            encoded = self.encoder.index.encode_query(
                query, text=options.pop("text", None), image=image, audio=audio, video=video,
                vector=options.pop("vector", None), vector_of=options.pop("vector_of", "image"),
                target=options.pop("target", "auto"), **caps)
            query = image = audio = video = None
            options.update(vector=encoded.vector, vector_of=encoded.vector_of, target=encoded.target)
        uploads = {name: [_read(f) for f in files] for name, files in
                   (("image", image), ("audio", audio), ("video", video)) if files}
        remote = {number: self.pool.submit(self._search_one, shard, query, k, uploads, options)
                  for number, shard in enumerate(self.shards) if isinstance(shard, RemoteShard)}
        answers: dict[int, list[Hit]] = {}
        failed: list[str] = []
        for number, shard in enumerate(self.shards):
            if isinstance(shard, LocalShard):
                answers[number] = self._search_one(shard, query, k, uploads, options)
        for number, future in remote.items():
            try:
                answers[number] = future.result()
            except UsageError:
                raise
            except RetrievalError:
                if strict:
                    raise
                failed.append(self.shards[number].name)
        hits = [replace(hit, id=hit.id * MAX_SHARDS + number,
                        duplicates=[{**d, "id": d["id"] * MAX_SHARDS + number} for d in hit.duplicates])
                for number, found in sorted(answers.items()) for hit in found]
        return sorted(hits, key=lambda hit: -hit.score)[:k], failed

    def health(self) -> dict[str, bool]:
        """Each shard's name and whether it answers."""
        checks = [self.pool.submit(shard.healthy) for shard in self.shards]
        return {shard.name: check.result() for shard, check in zip(self.shards, checks)}

    @staticmethod
    def _search_one(shard: Shard, query: str | None, k: int, uploads: dict[str, list[bytes]],
                    options: dict) -> list[Hit]:
        # Each shard reads its own copy of an upload: one stream cannot be read by several.
        if isinstance(shard, LocalShard):
            files = {name: [io.BytesIO(data) for data in datas] for name, datas in uploads.items()}
        else:
            files = uploads
        return shard.search(query=query, k=k, **files, **options)

    def item_vector(self, global_id: int) -> tuple[str, np.ndarray]:
        shard, local = self.locate(global_id)
        return shard.item_vector(local)

    def item(self, global_id: int) -> Hit | None:
        shard, local = self.locate(global_id)
        hit = shard.item(local)
        return None if hit is None else replace(hit, id=global_id)

    def stats(self) -> dict:
        """Each answering shard's statistics, the counts summed over them, and the names of the
        shards that did not answer (`failed_shards`), as a partial search lists them."""
        # Remote shards are asked first, all at once; local ones answer in this thread meanwhile,
        # inside the same try, so a failing local shard is listed like a remote one.
        remote = {number: self.pool.submit(shard.stats)
                  for number, shard in enumerate(self.shards) if isinstance(shard, RemoteShard)}
        answered: list[tuple[Shard, dict]] = []
        failed: list[str] = []
        for number, shard in enumerate(self.shards):
            try:
                answered.append((shard, remote[number].result() if number in remote else shard.stats()))
            except UsageError:
                raise
            except RetrievalError:
                failed.append(shard.name)
        if not answered:
            raise RetrievalError(f"no shard answered: {', '.join(failed)}")
        first = answered[0][1]
        counts = {m: sum(s["counts"].get(m, 0) for _, s in answered) for m in first["counts"]}
        return {**first, "path": None, "counts": counts,
                "shards": [{"name": shard.name, **s} for shard, s in answered], "failed_shards": failed}

    def close(self) -> None:
        self.pool.shutdown()
        for shard in self.shards:
            shard.close()


def _model_name(model: dict) -> str:
    return " ".join(filter(None, (model.get("name"), model.get("pretrained"))))


def _read(upload: BinaryIO) -> bytes:
    upload.seek(0)
    return upload.read()
