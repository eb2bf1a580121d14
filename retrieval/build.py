"""Incremental builds: find what changed under the sources, embed only that, commit in batches.

The protocol, per file found:
1. same path, size and mtime as recorded -> unchanged, not even read;
2. otherwise read and hash it: same hash as recorded -> unchanged (only the stat is updated);
3. same hash as a recorded file that has disappeared -> moved: paths change, ids and vectors stay;
4. same hash as another recorded file -> copy: its vector is reused, nothing is encoded;
5. anything else is decoded, embedded and committed, a batch per SQLite transaction.
Recorded files under the sources that were not found are removed last.

Every transaction bumps the generation of the modality it touches; the FAISS files are brought
up to date at the end and tagged with that generation. A build killed half-way leaves SQLite
consistent and FAISS files that are merely stale; they are rebuilt from SQLite on next open.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from .audio import DEFAULT_MAX_AUDIO_SECONDS, AudioDecodeError, AudioWindow, load_audio, split_windows
from .captions import CaptionFormatError
from .corpus import (
    ItemSpec,
    Skipped,
    SourceFile,
    absolute_path,
    display_path,
    file_digest,
    is_under,
    read_items,
    text_digest,
    walk_sources,
)
from .errors import UsageError, counted
from .images import DEFAULT_MAX_MEGAPIXELS, ImageDecodeError, load_image
from .pipeline import default_workers, prefetch_map
from .store import MODALITIES, FileRow, NewItem
from .video import DEFAULT_MAX_VIDEO_SECONDS, VideoDecodeError, VideoSegment
from .video_segments import decode_segments, segment_vectors

if TYPE_CHECKING:
    import torch

    from .distributed import Shards
    from .index import Index
    from .ondisk import ShardRunner
    from .vectors import VectorIndex

TEXT_FLUSH = 4096  # texts to gather before encoding: big batches, bounded loss on a crash


@dataclass
class BuildOptions:
    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    progress: bool = False
    workers: int = field(default_factory=default_workers)
    engine: str = "local"  # or "ray": images are decoded and encoded by a Ray Data job
    address: str | None = None  # the Ray cluster; None starts a local one


# Why sounds wait: the index's reason, not the files', so it is said once (see `skipped_lines`).
NO_AUDIO_ENCODER = "no audio encoder yet"


@dataclass
class BuildReport:
    """What a build did, counted in files; `encoded` and `reused` count vectors."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    images_encoded: int = 0
    texts_encoded: int = 0
    audio_encoded: int = 0  # audio windows; a file has one per few seconds
    video_encoded: int = 0  # video segments; a file has one per few seconds
    vectors_reused: int = 0
    seconds: float = 0.0

    @property
    def items_per_second(self) -> float:
        encoded = self.images_encoded + self.texts_encoded + self.audio_encoded + self.video_encoded
        return encoded / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return (f"{self.new} new, {self.changed} changed, {self.unchanged} unchanged, "
                f"{self.moved} moved, {self.removed} removed, {len(self.skipped)} skipped; "
                f"encoded {counted(self.images_encoded, 'image')}, {counted(self.texts_encoded, 'text')}, "
                f"{counted(self.audio_encoded, 'audio window')} and "
                f"{counted(self.video_encoded, 'video segment')}, "
                f"reused {counted(self.vectors_reused, 'vector')} in {self.seconds:.1f} s "
                f"({self.items_per_second:.1f} items/s)")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["items_per_second"] = self.items_per_second
        return data


def skipped_lines(skipped: list[Skipped]) -> list[str]:
    """A warning per skipped file, but one for all the sounds waiting for an audio encoder."""
    lines, waiting = [], []
    for one in skipped:
        if one.reason.startswith(NO_AUDIO_ENCODER):
            waiting.append(one)
        else:
            lines.append(f"skipped {one.path}: {one.reason}")
    if waiting:
        lines.append(f"skipped {counted(len(waiting), 'sound')}: {waiting[0].reason}")
    return lines


class UnreadableFile(Exception):
    """A source file that cannot be read, or is empty; the message says which."""


def read_source(path: str) -> bytes:
    """A source file's bytes, for hashing and decoding."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise UnreadableFile(f"cannot read ({error.strerror})") from None
    if not data:
        raise UnreadableFile("empty file")
    return data


def preprocess_bytes(data: bytes, preprocess: Callable, input_side: int, max_megapixels: float
                     ) -> torch.Tensor:
    """An image file's bytes as the model's input tensor; raises ImageDecodeError."""
    # Twice the input side: the resize that follows smooths away draft decoding's
    # differences (vectors agree to ~1e-3), at a fraction of the decoding cost.
    image = load_image(io.BytesIO(data), max_megapixels, min_side=2 * input_side)
    return preprocess(image)


@dataclass
class _Prepared:
    """A file read, hashed and (when it needs encoding) decoded by a worker thread."""

    source: SourceFile
    row: FileRow | None
    digest: str = ""
    pixels: torch.Tensor | None = None
    windows: list[AudioWindow] | None = None
    segments: list[VideoSegment] | None = None
    vector: np.ndarray | None = None  # made by a distributed job
    error: str | None = None


class Builder:
    """One build or removal over an index; holds the index's write lock while it runs."""

    def __init__(self, index: Index, options: BuildOptions) -> None:
        self.index = index
        self.store = index.store
        self.options = options
        self.report = BuildReport()
        self.known: dict[str, FileRow] = {}
        self.gone: dict[str, FileRow] = {}
        self.gone_by_content: dict[tuple[str, str], FileRow] = {}
        # item id -> new vector, or None for a removed item; applied to FAISS at the end
        self.changes: dict[str, dict[int, np.ndarray | None]] = {m: {} for m in MODALITIES}
        self.base = {m: index._fresh_vectors(m) for m in MODALITIES}
        self.shards: Shards | None = None

    # -- the build --------------------------------------------------------------------------

    def run(self, sources: Sequence[str | Path], captions: Sequence[str | Path]) -> BuildReport:
        started = time.perf_counter()
        try:
            walk = walk_sources(sources, self.options.exclude, captions, self.options.include_hidden)
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        self.report.skipped += walk.skipped
        self.known = self.store.files_by_path()
        roots = [str(absolute_path(s)) for s in sources]
        keys = [display_path(root) for root in roots]  # stored paths are in display form
        unreadable = [s.path for s in walk.skipped]
        found = {f.key for f in walk.files}
        self.gone = {path: row for path, row in self.known.items()
                     if path not in found and is_under(path, keys) and not is_under(path, unreadable)}
        self.gone_by_content = {(row.kind, row.sha256): row for row in self.gone.values()}
        pending = [(f, self.known.get(f.key)) for f in walk.files if not self._unchanged(f)]
        if self.options.engine == "ray":
            self._embed_on_ray([source for source, _ in pending])
        self._index_images([p for p in pending if p[0].kind == "image"])
        self._index_audio([p for p in pending if p[0].kind == "audio"])
        self._index_video([p for p in pending if p[0].kind == "video"])
        self._index_texts([p for p in pending if p[0].kind in ("text", "captions")])
        self._remove(list(self.gone.values()))
        with self.store.conn:
            self.store.link_captions()
            self.store.set_sources(self.store.sources() + roots)
        self._finish_vectors()
        if self.shards is not None:  # their rows are committed now
            self.shards.clear()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _embed_on_ray(self, pending: list[SourceFile]) -> None:
        """Embed the images and new texts of `pending` files as Ray Data jobs writing shards."""
        from .distributed import SHARDS_FOLDER, Shards, connect, embed_images, embed_texts

        connect(self.options.address)
        shards = Shards(self.index.path / SHARDS_FOLDER)
        embed_images(self.index, [s for s in pending if s.kind == "image"], shards,
                     self.options.max_megapixels, self.options.progress)
        texts = self._unembedded_texts([s for s in pending if s.kind in ("text", "captions")])
        embed_texts(self.index, texts, shards, self.options.progress)
        self.shards = Shards(shards.folder)

    def _unembedded_texts(self, sources: list[SourceFile]) -> dict[str, str]:
        """The texts these files hold that no stored item has a vector for, by text hash.
        Files that cannot be read or parsed are left to the build, which reports them."""
        texts: dict[str, str] = {}
        for source in sources:
            try:
                specs = read_items(source, read_source(source.path))
            except (UnreadableFile, CaptionFormatError, ValueError):
                continue
            texts.update((text_digest(spec.text), spec.text) for spec in specs)
        stored = self.store.vectors_for_hashes("text", texts)
        return {digest: text for digest, text in texts.items() if digest not in stored}

    def remove(self, paths: Iterable[str | Path]) -> int:
        """Forget every recorded file at or under `paths`."""
        try:
            prefixes = [display_path(str(absolute_path(p))) for p in paths]
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        rows = [row for path, row in self.store.files_by_path().items() if is_under(path, prefixes)]
        self._remove(rows)
        with self.store.conn:
            self.store.link_captions()
            self.store.set_sources([s for s in self.store.sources() if not is_under(s, prefixes)])
        self._finish_vectors()
        return len(rows)

    def _unchanged(self, source: SourceFile) -> bool:
        row = self.known.get(source.key)
        same = (row is not None and row.kind == source.kind and row.size == source.size
                and row.mtime_ns == source.mtime_ns)
        self.report.unchanged += same
        return same

    # -- images -----------------------------------------------------------------------------

    def _index_images(self, pending: list[tuple[SourceFile, FileRow | None]]) -> None:
        if not pending:
            return
        size = self.index.encoder.batch_size  # loaded here: worker threads must not record its dim
        batch: list[_Prepared] = []
        made: list[_Prepared] = []  # embedded by a distributed job
        for item in self._to_encode(pending, "image", self._decode_image, size * 4,
                                    unit="img", desc="images"):
            (batch if item.vector is None else made).append(item)
            if len(batch) == size:
                self._encode_images(batch)
                batch = []
            if len(made) == TEXT_FLUSH:
                self._write_made_images(made)
                made = []
        if batch:
            self._encode_images(batch)
        if made:
            self._write_made_images(made)

    def _to_encode(self, pending: list[tuple[SourceFile, FileRow | None]], kind: str,
                   decode: Callable[[_Prepared, bytes], None], ahead: int, unit: str, desc: str
                   ) -> Iterator[_Prepared]:
        """Read, hash and decode files on worker threads; count the unreadable as skipped, settle
        the unchanged, moved and copied, and yield the rest, which need encoding."""
        # Every file row is written with its items and vectors, so these hashes all have vectors.
        known_hashes = {row.sha256 for row in self.known.values() if row.kind == kind}
        prepared = prefetch_map(lambda p: self._prepare(*p, known_hashes, decode), pending,
                                self.options.workers, ahead=ahead)
        for item in tqdm(prepared, total=len(pending), unit=unit, desc=desc,
                         disable=not self.options.progress):
            if item.error:
                self.report.skipped.append(Skipped(item.source.key, item.error))
            elif not self._settled_without_encoding(item):
                yield item

    def _prepare(self, source: SourceFile, row: FileRow | None, known_hashes: set[str],
                 decode: Callable[[_Prepared, bytes], None]) -> _Prepared:
        """Read and hash a file; decode it only when no indexed file has its content."""
        item = _Prepared(source, row)
        made = self.shards.row_for(source) if self.shards is not None else None
        if made is not None:  # a distributed job read and embedded it: not read again
            item.digest, item.error = made.sha256, made.error
            item.vector = made.vector if made.sha256 not in known_hashes else None
            return item
        try:
            data = read_source(source.path)
        except UnreadableFile as error:
            item.error = str(error)
            return item
        item.digest = file_digest(data)
        if item.digest not in known_hashes:  # else its vectors exist: no need to decode
            decode(item, data)
        return item

    def _decode_image(self, item: _Prepared, data: bytes) -> None:
        try:
            encoder = self.index.encoder
            item.pixels = preprocess_bytes(data, encoder.preprocess, encoder.input_side,
                                           self.options.max_megapixels)
        except ImageDecodeError as error:
            item.error = str(error)

    def _settled_without_encoding(self, item: _Prepared) -> bool:
        """Handle files whose content is already indexed: touched, moved or copied."""
        source, row = item.source, item.row
        if row is not None and row.sha256 == item.digest and row.kind == source.kind:
            with self.store.conn:
                self.store.touch_file(row.id, source.size, source.mtime_ns)
            self.report.unchanged += 1
            return True
        if row is None and self._move_from_gone(source, item.digest):
            return True
        if item.pixels is None and item.windows is None and item.segments is None and item.vector is None:
            stored = self.store.items_of_file_with_hash(item.digest, source.kind)  # a copy: reuse
            if source.kind == "image":
                self._write_images([item], [stored[0][1]])
            else:
                self._write_timed(item, [(m["start"], m["end"]) for m, _ in stored],
                                  [vector for _, vector in stored])
            self.report.vectors_reused += len(stored)
            return True
        return False

    def _move_from_gone(self, source: SourceFile, digest: str) -> bool:
        origin = self.gone_by_content.pop((source.kind, digest), None)
        if origin is None:
            return False
        with self.store.conn:
            self.store.move_file(origin.id, origin.path, source.key, source.root, source.size,
                                 source.mtime_ns)
        del self.gone[origin.path]
        self.report.moved += 1
        return True

    def _encode_images(self, batch: list[_Prepared]) -> None:
        import torch

        vectors = self.index.encoder.encode_image_tensors(torch.stack([i.pixels for i in batch]))
        self._write_images(batch, list(vectors))
        self.report.images_encoded += len(batch)

    def _write_made_images(self, made: list[_Prepared]) -> None:
        self._write_images(made, [item.vector for item in made])
        self.report.images_encoded += len(made)

    def _write_images(self, batch: list[_Prepared], vectors: list[np.ndarray]) -> None:
        changes = self.changes["image"]
        with self.store.conn:
            for item, vector in zip(batch, vectors):
                source = item.source
                file_id = self.store.upsert_file(source.key, source.root, source.kind, source.size,
                                                 source.mtime_ns, item.digest)
                existing = self.store.items_of_file(file_id) if item.row else {}
                if source.key in existing:
                    item_id = existing[source.key][0]
                    self.store.replace_vector(item_id, vector, item.digest)
                    self.report.changed += 1
                else:
                    new = NewItem(source.key, "image", vector, item.digest)
                    item_id = self.store.insert_items(file_id, [new])[0]
                    self.report.new += 1
                changes[item_id] = vector
            self.store.bump_generation("image")

    # -- audio ------------------------------------------------------------------------------

    def _index_audio(self, pending: list[tuple[SourceFile, FileRow | None]]) -> None:
        """Like images, but a file holds one item per window, all replaced when it changes."""
        if not pending:
            return
        encoder = self.index.audio_encoder_or_none()
        if encoder is None:
            reason = (f"{NO_AUDIO_ENCODER}: train one with `retrieve train-audio PAIRS --index "
                      f"{self.index.path}`, or build with --audio-model clap:NAME")
            self.report.skipped += [Skipped(source.key, reason) for source, _ in pending]
            return
        batch: list[_Prepared] = []
        for item in self._to_encode(pending, "audio", self._decode_audio, 2 * self.options.workers,
                                    unit="file", desc="audio"):
            batch.append(item)
            if sum(len(i.windows) for i in batch) >= encoder.batch_size:
                self._encode_audio(batch)
                batch = []
        if batch:
            self._encode_audio(batch)

    def _decode_audio(self, item: _Prepared, data: bytes) -> None:
        encoder = self.index.audio_encoder
        try:
            wave = load_audio(io.BytesIO(data), encoder.sample_rate, self.options.max_audio_seconds)
            item.windows = split_windows(wave, encoder.sample_rate)
        except AudioDecodeError as error:
            item.error = str(error)

    def _encode_audio(self, batch: list[_Prepared]) -> None:
        waves = [window.samples for item in batch for window in item.windows]
        vectors = iter(self.index.audio_encoder.encode_audio(waves))
        for item in batch:
            self._write_timed(item, [(w.start, w.end) for w in item.windows],
                              [next(vectors) for _ in item.windows])
        self.report.audio_encoded += len(waves)

    # -- video ------------------------------------------------------------------------------

    def _index_video(self, pending: list[tuple[SourceFile, FileRow | None]]) -> None:
        """Like audio: one item per segment, its frames and soundtrack fused into one vector."""
        if not pending:
            return
        for item in self._to_encode(pending, "video", self._decode_video, self.options.workers,
                                    unit="video", desc="video"):
            vectors = segment_vectors(self.index, item.segments)
            self._write_timed(item, [(s.start, s.end) for s in item.segments], list(vectors))
            self.report.video_encoded += len(item.segments)

    def _decode_video(self, item: _Prepared, data: bytes) -> None:
        try:
            item.segments = decode_segments(self.index, io.BytesIO(data), self.options.max_video_seconds)
        except VideoDecodeError as error:
            item.error = str(error)

    def _write_timed(self, item: _Prepared, spans: list[tuple[float, float]],
                     vectors: list[np.ndarray]) -> None:
        """A sound's windows or a video's segments: all of a file's items replaced at once."""
        source, changes = item.source, self.changes[item.source.kind]
        with self.store.conn:
            file_id = self.store.upsert_file(source.key, source.root, source.kind, source.size,
                                             source.mtime_ns, item.digest)
            stale = [item_id for item_id, *_ in self.store.items_of_file(file_id).values()]
            self.store.delete_items(stale)
            fresh = [NewItem(f"{source.key}#t={start:g},{end:g}", source.kind, vector,
                             f"{item.digest}#t={start:g}", meta={"start": start, "end": end})
                     for (start, end), vector in zip(spans, vectors)]
            new_ids = self.store.insert_items(file_id, fresh)
            self.store.bump_generation(source.kind)
        changes.update(dict.fromkeys(stale))
        changes.update({item_id: new.vector for item_id, new in zip(new_ids, fresh)})
        if item.row is None:
            self.report.new += 1
        else:
            self.report.changed += 1

    # -- texts and captions -----------------------------------------------------------------

    def _index_texts(self, pending: list[tuple[SourceFile, FileRow | None]]) -> None:
        queue: list[tuple[SourceFile, FileRow | None, str, list[ItemSpec]]] = []
        queued_texts = 0
        for source, row in pending:
            parsed = self._read_text_file(source, row)
            if parsed is not None:
                queue.append(parsed)
                queued_texts += len(parsed[3])
            if queued_texts >= TEXT_FLUSH:
                self._write_text_files(queue)
                queue, queued_texts = [], 0
        if queue:
            self._write_text_files(queue)

    def _read_text_file(self, source: SourceFile, row: FileRow | None
                        ) -> tuple[SourceFile, FileRow | None, str, list[ItemSpec]] | None:
        try:
            with open(source.path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            self.report.skipped.append(Skipped(source.key, f"cannot read ({error.strerror})"))
            return None
        digest = file_digest(data)
        if row is not None and row.sha256 == digest and row.kind == source.kind:
            with self.store.conn:
                self.store.touch_file(row.id, source.size, source.mtime_ns)
            self.report.unchanged += 1
            return None
        if row is None and self._move_from_gone(source, digest):
            return None
        try:
            return source, row, digest, read_items(source, data)
        except (CaptionFormatError, ValueError) as error:
            kind = "captions file" if source.kind == "captions" else "text file"
            self.report.skipped.append(Skipped(source.key, f"bad {kind}: {error}"))
            return None

    def _write_text_files(self, queue: list[tuple[SourceFile, FileRow | None, str, list[ItemSpec]]]
                          ) -> None:
        vectors = self._text_vectors([spec.text for *_, specs in queue for spec in specs])
        for source, row, digest, specs in queue:
            with self.store.conn:
                file_id = self.store.upsert_file(source.key, source.root, source.kind, source.size,
                                                 source.mtime_ns, digest)
                self._sync_text_items(file_id, specs, vectors)
                self.store.bump_generation("text")
            if row is None:
                self.report.new += 1
            else:
                self.report.changed += 1

    def _text_vectors(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Vectors by text hash: stored ones reused, shards' taken, the rest encoded in large batches."""
        digests = {text_digest(text): text for text in texts}
        vectors = self.store.vectors_for_hashes("text", digests)
        made = {} if self.shards is None else {  # encoded by a distributed job
            d: self.shards.texts[d] for d in digests if d not in vectors and d in self.shards.texts}
        vectors.update(made)
        missing = [(d, t) for d, t in digests.items() if d not in vectors]
        self.report.vectors_reused += len(texts) - len(missing) - len(made)
        encoder = self.index.encoder if missing else None
        step = 1024
        with tqdm(total=len(missing), unit="text", desc="texts",
                  disable=not self.options.progress or not missing) as bar:
            for start in range(0, len(missing), step):
                chunk = missing[start:start + step]
                encoded = encoder.encode_texts([text for _, text in chunk])
                vectors.update({digest: vector for (digest, _), vector in zip(chunk, encoded)})
                bar.update(len(chunk))
        self.report.texts_encoded += len(missing) + len(made)
        return vectors

    def _sync_text_items(self, file_id: int, specs: list[ItemSpec],
                         vectors: dict[str, np.ndarray]) -> None:
        """Make a file's stored items equal `specs`, touching only the ones that differ."""
        existing = self.store.items_of_file(file_id)
        stale: list[int] = []
        fresh: list[NewItem] = []
        for spec in specs:
            digest = text_digest(spec.text)
            current = existing.pop(spec.uri, None)
            if current is not None and current[1:] == (digest, spec.parent_ref):
                continue
            if current is not None:
                stale.append(current[0])
            fresh.append(NewItem(spec.uri, spec.modality, vectors[digest], digest, spec.text,
                                 spec.parent_ref, spec.meta))
        stale += [item_id for item_id, *_ in existing.values()]
        self.store.delete_items(stale)
        new_ids = self.store.insert_items(file_id, fresh)
        changes = self.changes["text"]
        changes.update(dict.fromkeys(stale))
        changes.update({item_id: item.vector for item_id, item in zip(new_ids, fresh)})

    # -- removal and FAISS ------------------------------------------------------------------

    def _remove(self, rows: list[FileRow]) -> None:
        if not rows:
            return
        with self.store.conn:
            removed = self.store.delete_files([row.id for row in rows])
            for modality, ids in removed.items():
                self.changes[modality].update(dict.fromkeys(ids))
                self.store.bump_generation(modality)
        self.report.removed += len(rows)

    def _finish_vectors(self) -> None:
        """Apply this build's changes to each FAISS index and save it, or rebuild a stale one."""
        for modality in MODALITIES:
            changes, vectors = self.changes[modality], self.base[modality]
            if self._needs_rebuild(vectors, changes, modality):
                self.index._rebuild_vectors(modality, self._shard_runner())
            elif changes:
                if vectors.can_remove:
                    vectors.remove(np.fromiter(changes, dtype=np.int64, count=len(changes)))
                added = [(i, v) for i, v in changes.items() if v is not None]
                if added:
                    vectors.add(np.array([i for i, _ in added], dtype=np.int64),
                                np.stack([v for _, v in added]))
                self.index._store_vectors(modality, vectors, self.store.generation(modality))
        self.index._write_manifest()

    def _shard_runner(self) -> ShardRunner | None:
        """Ray tasks fill an on-disk index's shards in a Ray build; local processes otherwise."""
        if self.options.engine != "ray":
            return None
        from .distributed import ray_runner

        return ray_runner()

    def _needs_rebuild(self, vectors: VectorIndex | None, changes: dict, modality: str) -> bool:
        """Stale, of another size or kind than the index should now have, or unable to remove."""
        if vectors is None or vectors.dim != self.index.dim_of(modality):
            return True
        if vectors.kind != self.index.kind_for(self.store.count(modality), modality):
            return True
        if not changes:
            return False
        if not vectors.can_add:  # an on-disk index is rebuilt in shards, as it was built
            return True
        if vectors.can_remove:
            return False
        held = set(vectors.ids().tolist())  # a graph can take new ids, not drop or replace one
        return any(v is None or i in held for i, v in changes.items())

