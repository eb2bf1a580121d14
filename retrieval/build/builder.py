"""Incremental builds: find what changed under the sources, embed only that, commit in batches.

The protocol, per file found:
1. same path, size and mtime as recorded -> unchanged, not even read;
2. same path, size and mtime as a file skipped before -> skipped again, not read nor warned about;
3. otherwise read and hash it: same hash as recorded -> unchanged (only the stat is updated);
4. same hash as a recorded file that has disappeared -> moved: paths change, ids and vectors stay;
5. same hash as another recorded file, or as a file encoded earlier in this run -> copy: its
   vector is reused, nothing is encoded;
6. anything else is decoded, embedded and committed, a batch per SQLite transaction (texts and
   captions too: a text file's items go in with each batch, its hash once all are in).
Recorded files under the sources that were not found are removed last. No single file stops a
build: an unexpected error on one undoes that file's writes and becomes one warning naming it.

Every transaction bumps the generation of the modality it touches; the FAISS files are brought
up to date at the end and tagged with that generation. A build killed half-way leaves SQLite
consistent and FAISS files that are merely stale; they are rebuilt from SQLite on next open.
"""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ..core.concurrency import default_workers, prefetch_map
from ..core.errors import UsageError
from ..core.paths import absolute_path, display_path, is_under, path_from_display
from ..core.types import MODALITIES
from ..media.audio import DEFAULT_MAX_AUDIO_SECONDS, AudioDecodeError, AudioWindow, load_audio, split_windows
from ..media.captions import CaptionFormatError
from ..media.corpus import (
    ItemSpec,
    Skipped,
    SourceFile,
    WalkOptions,
    file_digest,
    read_items,
    text_digest,
    walk_sources,
)
from ..media.images import DEFAULT_MAX_MEGAPIXELS, ImageDecodeError, ImageFacts, hashing_available
from ..media.video import DEFAULT_MAX_VIDEO_SECONDS, VideoDecodeError, VideoSegment
from ..storage.folder import SHARDS_FOLDER
from ..storage.store import FileRow, NewItem, SkippedRow
from .captions import CaptionRequest, CaptionWriter
from .reading import (
    EmptyFile,
    UnreadableFile,
    measure_bytes,
    preprocess_and_measure,
    read_source,
    unexpected,
)
from .report import NO_AUDIO_ENCODER, BuildReport
from .stop_points import batch_committed

if TYPE_CHECKING:
    import torch

    from ..context import IndexContext
    from ..encoders.clip import ClipEncoder
    from ..encoders.onnx_towers import OnnxImageEncoder
    from ..storage.ondisk import ShardRunner
    from .ray import Shards

MADE_FLUSH = 4096  # vectors made by a distributed job, written per transaction


@dataclass
class BuildOptions:
    # How sources are walked; None: as recorded for each source (the defaults for a new one).
    exclude: tuple[str, ...] | None = None
    include_hidden: bool | None = None
    follow_external_links: bool | None = None
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_video_seconds: float = DEFAULT_MAX_VIDEO_SECONDS
    progress: bool = False
    workers: int = field(default_factory=default_workers)
    engine: str = "local"  # or "ray": images are decoded and encoded by a Ray Data job
    address: str | None = None  # the Ray cluster; None starts a local one
    # The captions a model writes for images (see build.captions); None: none. `recaption`
    # replaces those another model, or the same one another way, wrote.
    captions: CaptionRequest | None = None
    recaption: bool = False


@dataclass
class _Prepared:
    """A file read, hashed and (when it needs encoding) decoded by a worker thread."""

    source: SourceFile
    row: FileRow | None
    digest: str = ""
    pixels: torch.Tensor | np.ndarray | None = None  # as the image encoder's `preprocess` makes it
    facts: ImageFacts | None = None  # an image's size and perceptual hashes, from its decode
    windows: list[AudioWindow] | None = None
    segments: list[VideoSegment] | None = None
    vector: np.ndarray | None = None  # made by a distributed job
    error: str | None = None
    lasting: bool = False  # the error is the content's: remembered until the file changes

    @property
    def decoded(self) -> bool:
        return not (self.pixels is None and self.windows is None and self.segments is None
                    and self.vector is None)


@dataclass
class _TextFile:
    """A text or captions file being written: its items go in with each batch of texts, and
    its hash, size and mtime once the last is in, so a killed build resumes where it was."""

    source: SourceFile
    row: FileRow | None
    digest: str
    file_id: int = 0
    waiting: int = 0  # items still to be written
    failed: bool = False

    @property
    def is_new(self) -> bool:
        return self.row is None or not self.row.sha256  # no hash: a killed build began it


@dataclass
class _Outcome:
    failed: bool = False


class Builder:
    """One build or removal over an index; holds the index's write lock while it runs."""

    def __init__(self, context: IndexContext, options: BuildOptions) -> None:
        self.context = context
        self.encoders = context.encoders
        self.store = context.store
        self.options = options
        self.report = BuildReport()
        self.known: dict[str, FileRow] = {}
        self.gone: dict[str, FileRow] = {}
        self.gone_by_content: dict[tuple[str, str], FileRow] = {}
        self.known_bad: dict[str, SkippedRow] = {}
        self.still_bad: set[str] = set()  # paths skipped in this run, remembered as such
        # The limit a file of each kind was judged under: changing it judges the file again.
        self.conditions = {"image": f"max_megapixels={options.max_megapixels}",
                           "audio": f"max_audio_seconds={options.max_audio_seconds}",
                           "video": f"max_video_seconds={options.max_video_seconds}"}
        # Contents claimed for encoding in this run: a copy waits for its vector instead.
        self.claimed: set[tuple[str, str]] = set()
        self.claim_lock = threading.Lock()
        self.copies: list[_Prepared] = []
        self.failed: dict[tuple[str, str], tuple[str, bool]] = {}  # content -> why it was skipped
        self.text_bar: tqdm | None = None
        # item id -> new vector, or None for a removed item; applied to FAISS at the end
        self.changes: dict[str, dict[int, np.ndarray | None]] = {m: {} for m in MODALITIES}
        self.base = {m: context.vectors.fresh(m) for m in MODALITIES}
        self.shards: Shards | None = None

    # -- the build --------------------------------------------------------------------------

    def run(self, sources: Sequence[str | Path], captions: Sequence[str | Path]) -> BuildReport:
        """Index `sources` and the captions files `captions`, and record both, with the
        options each source was walked with, for the next bare build."""
        started = time.perf_counter()
        try:
            roots = [str(absolute_path(s)) for s in sources]
            captions_paths = [str(absolute_path(c)) for c in captions]
            walk_options = self._walk_options(roots)
            walk = walk_sources(sources, captions_files=captions, options=walk_options)
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        with self.store.conn:  # first, so that a bare build after a kill finishes this one
            self.store.set_sources(self.store.sources() + roots)
            self.store.set_source_options({**self.store.source_options(),
                                           **{root: asdict(o) for root, o in walk_options.items()}})
            self.store.set_captions_files(self.store.captions_files() + captions_paths)
        self.report.skipped += walk.skipped
        self.known = self.store.files_by_path()
        self.known_bad = self.store.skipped_files()
        keys = [display_path(path) for path in roots + captions_paths]  # stored paths' form
        unreadable = [s.path for s in walk.skipped]
        found = {f.key for f in walk.files}
        self.gone = {path: row for path, row in self.known.items()
                     if path not in found and is_under(path, keys) and not is_under(path, unreadable)}
        self.gone_by_content = {(row.kind, row.sha256): row for row in self.gone.values()}
        pending = [(f, self.known.get(f.key)) for f in walk.files
                   if not self._unchanged(f) and not self._known_bad(f)]
        if self.options.engine == "ray":
            self._embed_on_ray([source for source, _ in pending])
        self._index_images([p for p in pending if p[0].kind == "image"])
        self._measure_unmeasured_images()
        self._index_audio([p for p in pending if p[0].kind == "audio"])
        self._index_video([p for p in pending if p[0].kind == "video"])
        self.encoders.release_image_tower()  # the texts' tower need not share memory with it
        self._index_texts([p for p in pending if p[0].kind in ("text", "captions")])
        self._remove(list(self.gone.values()))
        recovered = [path for path in self.store.skipped_files() if path not in self.still_bad
                     and is_under(path, keys) and not is_under(path, unreadable)]
        with self.store.conn:
            self.store.link_captions()
            self.store.forget_skipped(recovered)  # indexed now, gone, or judged anew
        CaptionWriter(self.context, self.options.captions, self.options.recaption,
                      self.options.max_megapixels, self.changes["text"], self.report, self._text_vectors,
                      self.options.workers, self.options.progress).run()
        self._finish_vectors()
        if self.shards is not None:  # their rows are committed now
            self.shards.clear()
        self.report.seconds = time.perf_counter() - started
        return self.report

    def _embed_on_ray(self, pending: list[SourceFile]) -> None:
        """Embed the images and new texts of `pending` files as Ray Data jobs writing shards;
        Ray is joined (or started, which takes seconds) only when the shards lack some."""
        from .ray import Shards, connect, embed_images, embed_texts

        shards = Shards(self.context.folder / SHARDS_FOLDER)
        images = shards.images_to_embed(pending)
        texts = shards.texts_to_embed(
            self._unembedded_texts([s for s in pending if s.kind in ("text", "captions")]))
        if images or texts:
            connect(self.options.address)
            embed_images(self.encoders, images, shards, self.options.max_megapixels, self.options.progress)
            embed_texts(self.encoders, texts, shards, self.options.progress)
        self.shards = Shards(shards.folder)
        if self.shards.dim:  # the driver may never load the model (texts alone): record it here
            self.context.settings.record_dim(self.shards.dim, self.encoders.spec)

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

    def _walk_options(self, roots: list[str]) -> dict[str, WalkOptions]:
        """Each source's walk: the options given, else those recorded for it."""
        recorded = self.store.source_options()
        chosen = {}
        for root in roots:
            before = WalkOptions(**{name: value for name, value in recorded.get(root, {}).items()
                                    if name in WalkOptions.__dataclass_fields__})
            exclude, hidden = self.options.exclude, self.options.include_hidden
            external = self.options.follow_external_links
            chosen[root] = WalkOptions.of(before.exclude_dirs if exclude is None else exclude,
                                          before.include_hidden if hidden is None else hidden,
                                          before.follow_external_links if external is None else external)
        return chosen

    def remove(self, paths: Iterable[str | Path]) -> int:
        """Forget every recorded file at or under `paths`, and sources and captions files there."""
        try:
            named = [str(absolute_path(p)) for p in paths]
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        prefixes = [display_path(path) for path in named]
        rows = [row for path, row in self.store.files_by_path().items() if is_under(path, prefixes)]
        self._remove(rows)
        with self.store.conn:
            self.store.link_captions()
            self.store.set_sources([s for s in self.store.sources() if not is_under(s, named)])
            self.store.set_source_options({source: options for source, options
                                           in self.store.source_options().items()
                                           if not is_under(source, named)})
            self.store.set_captions_files([c for c in self.store.captions_files()
                                           if not is_under(c, named)])
            self.store.forget_skipped([p for p in self.store.skipped_files() if is_under(p, prefixes)])
        self._finish_vectors()
        return len(rows)

    def _unchanged(self, source: SourceFile) -> bool:
        row = self.known.get(source.key)
        same = (row is not None and row.kind == source.kind and row.size == source.size
                and row.mtime_ns == source.mtime_ns)
        self.report.unchanged += same
        return same

    def _known_bad(self, source: SourceFile) -> bool:
        """Skipped before, under the same limits, and unchanged since: not read again."""
        row = self.known_bad.get(source.key)
        same = row is not None and (row.size, row.mtime_ns, row.conditions) == (
            source.size, source.mtime_ns, self.conditions.get(source.kind, ""))
        if same:
            self.report.skipped_unchanged += 1
            self.still_bad.add(source.key)
        return same

    def _skip(self, source: SourceFile, reason: str, lasting: bool = False, digest: str = "") -> None:
        """Report a file the build cannot use; a `lasting` reason (its content) is remembered
        with its size and mtime, so it is not read nor warned about again until it changes.
        Called outside transactions."""
        self.report.skipped.append(Skipped(source.key, reason))
        if digest:
            self.failed[(source.kind, digest)] = (reason, lasting)
        if lasting:
            with self.store.conn:
                self.store.remember_skipped(SkippedRow(source.key, source.size, source.mtime_ns,
                                                       self.conditions.get(source.kind, ""), reason))
            self.still_bad.add(source.key)

    @contextmanager
    def _guard(self, source: SourceFile, digest: str = "") -> Iterator[_Outcome]:
        """One file's work: an error no check foresaw becomes one warning naming the file, and
        the build goes on. Wrap the writes in their own transaction or savepoint, so they are
        undone. Errors of the database itself (disk full, read-only) still end the build."""
        outcome = _Outcome()
        try:
            yield outcome
        except sqlite3.OperationalError:
            raise
        except Exception as error:  # no single file may stop a build
            outcome.failed = True
            self._skip(source, unexpected(error), digest=digest)

    # -- images -----------------------------------------------------------------------------

    def _index_images(self, pending: list[tuple[SourceFile, FileRow | None]]) -> None:
        if not pending:
            return
        size = self.encoders.batch_size
        # Chosen here, on this thread (worker threads must not record its dim); a tower's
        # session opens meanwhile, as the workers hash and decode the first batches.
        preprocessing = self.encoders.image_preprocessing
        batch: list[_Prepared] = []
        made: list[_Prepared] = []  # embedded by a distributed job
        # Two batches decoded ahead keep the encoder fed (decoding is a few percent of the
        # encoding's time) and hold 2 x 32 x 0.6 MB of pixels for ViT-B-32, not more.
        for item in self._to_encode(pending, "image", partial(self._decode_image, preprocessing),
                                    size * 2, unit="img", desc="images"):
            (batch if item.vector is None else made).append(item)
            if len(batch) == size:
                self._encode_images(batch)
                batch = []
            if len(made) == MADE_FLUSH:
                self._write_made_images(made)
                made = []
        if batch:
            self._encode_images(batch)
        if made:
            self._write_made_images(made)
        self._settle_copies()

    def _to_encode(self, pending: list[tuple[SourceFile, FileRow | None]], kind: str,
                   decode: Callable[[_Prepared, bytes], None], ahead: int, unit: str, desc: str
                   ) -> Iterator[_Prepared]:
        """Read, hash and decode files on worker threads; skip the unusable, settle the
        unchanged, moved and copied, and yield the rest, which need encoding. Copies of a file
        encoded in this run wait in `copies` for its vector (see `_settle_copies`)."""
        # Every file row is written with its items and vectors, so these hashes all have vectors.
        known_hashes = {row.sha256 for row in self.known.values() if row.kind == kind}
        prepared = prefetch_map(lambda p: self._prepare(*p, known_hashes, decode), pending,
                                self.options.workers, ahead=ahead)
        for item in tqdm(prepared, total=len(pending), unit=unit, desc=desc,
                         disable=not self.options.progress):
            if item.error:
                self._skip(item.source, item.error, item.lasting, item.digest)
            elif item.decoded:
                yield item
            elif not self._settled_without_encoding(item):
                self.copies.append(item)

    def _prepare(self, source: SourceFile, row: FileRow | None, known_hashes: set[str],
                 decode: Callable[[_Prepared, bytes], None]) -> _Prepared:
        """Read and hash a file; decode it only when no indexed file has its content and no
        other file of this run claimed it first."""
        item = _Prepared(source, row)
        made = self.shards.row_for(source) if self.shards is not None else None
        if made is not None:  # a distributed job read and embedded it: not read again
            item.digest, item.error = made.sha256, made.error
            item.vector = made.vector if made.sha256 not in known_hashes else None
            return item
        try:
            data = read_source(source.path)
            item.digest = file_digest(data)
            if self._claim(source.kind, item.digest, known_hashes):
                decode(item, data)
        except UnreadableFile as error:
            item.error, item.lasting = str(error), isinstance(error, EmptyFile)
        except Exception as error:  # no single file may stop a build
            item.error = unexpected(error)
        return item

    def _claim(self, kind: str, digest: str, known_hashes: set[str]) -> bool:
        """True for the first file of this run with content no indexed file has."""
        with self.claim_lock:
            if digest in known_hashes or (kind, digest) in self.claimed:
                return False
            self.claimed.add((kind, digest))
            return True

    def _decode_image(self, encoder: ClipEncoder | OnnxImageEncoder, item: _Prepared, data: bytes) -> None:
        try:
            item.pixels, item.facts = preprocess_and_measure(
                data, encoder.preprocess, encoder.input_side, self.options.max_megapixels)
        except ImageDecodeError as error:
            item.error, item.lasting = str(error), True

    def _measure_unmeasured_images(self) -> None:
        """Measure the images indexed before their facts (size, perceptual hashes) were
        recorded, or before `imagehash` was installed: decoded again, never encoded again."""
        missing = self.store.images_without_facts(want_hashes=hashing_available())
        if not missing:
            return

        def measure(entry: tuple[str, str]) -> tuple[str, ImageFacts | None]:
            digest, path = entry
            try:
                data = read_source(path_from_display(path))  # stored text names the file
                if file_digest(data) != digest:  # changed since: its next build measures it
                    return digest, None
                return digest, measure_bytes(data, self.options.max_megapixels)
            except (UnreadableFile, ImageDecodeError):
                return digest, ImageFacts(0, 0)  # unreadable now: not tried again
            except Exception as error:  # no single file may stop a build
                self.report.skipped.append(Skipped(path, unexpected(error)))
                return digest, None

        measured = prefetch_map(measure, missing, self.options.workers, ahead=4 * self.options.workers)
        for start in range(0, len(missing), 256):  # committed in batches: a kill loses little
            with self.store.conn:
                for _ in range(min(256, len(missing) - start)):
                    digest, facts = next(measured)
                    if facts is not None:
                        self.store.record_image_facts(digest, facts)
                        self.report.images_measured += 1

    def _settled_without_encoding(self, item: _Prepared) -> bool:
        """Handle a file whose content is indexed already: touched, moved or copied. False
        when that content is not indexed yet (another file of this run is being encoded)."""
        source, row = item.source, item.row
        if row is not None and row.sha256 == item.digest and row.kind == source.kind:
            with self._guard(source), self.store.conn:
                self.store.touch_file(row.id, source.size, source.mtime_ns)
                self.report.unchanged += 1
            return True
        if row is None and self._move_from_gone(source, item.digest):
            return True
        stored = self.store.items_of_file_with_hash(item.digest, source.kind)  # a copy: reuse
        if not stored:
            return False
        if source.kind == "image":
            self._write_images([item], [stored[0][1]])
        else:
            self._write_timed(item, [(m["start"], m["end"]) for m, _ in stored],
                              [vector for _, vector in stored])
        self.report.vectors_reused += len(stored)
        return True

    def _settle_copies(self) -> None:
        """Write the copies of files encoded in this run, with those files' vectors; a copy of
        a file that was skipped is skipped for the same reason."""
        copies, self.copies = self.copies, []
        for item in copies:
            if not self._settled_without_encoding(item):
                reason, lasting = self.failed.get((item.source.kind, item.digest),
                                                  ("its content could not be indexed", False))
                self._skip(item.source, reason, lasting)

    def _move_from_gone(self, source: SourceFile, digest: str) -> bool:
        origin = self.gone_by_content.pop((source.kind, digest), None)
        if origin is None:
            return False
        with self._guard(source) as outcome, self.store.conn:
            self.store.move_file(origin.id, origin.path, source.key, source.root, source.size,
                                 source.mtime_ns)
        if not outcome.failed:
            del self.gone[origin.path]
            self.report.moved += 1
        return True

    def _encode_images(self, batch: list[_Prepared]) -> None:
        vectors = self.encoders.images.encode_preprocessed([i.pixels for i in batch])
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
                with self._guard(source, item.digest), self.store.savepoint():
                    file_id = self.store.upsert_file(source.key, source.root, source.kind,
                                                     source.size, source.mtime_ns, item.digest)
                    existing = self.store.items_of_file(file_id) if item.row else {}
                    if source.key in existing:
                        item_id = existing[source.key][0]
                        self.store.replace_vector(item_id, vector, item.digest)
                        self.report.changed += 1
                    else:
                        new = NewItem(source.key, "image", vector, item.digest)
                        item_id = self.store.insert_items(file_id, [new])[0]
                        self.report.new += 1
                    if item.facts is not None:
                        self.store.record_image_facts(item.digest, item.facts)
                    changes[item_id] = vector
            self.store.bump_generation("image")

    # -- audio ------------------------------------------------------------------------------

    def _index_audio(self, pending: list[tuple[SourceFile, FileRow | None]]) -> None:
        """Like images, but a file holds one item per window, all replaced when it changes."""
        if not pending:
            return
        encoder = self.encoders.audio_or_none()
        if encoder is None:
            reason = (f"{NO_AUDIO_ENCODER}: train one with `retrieve train-audio PAIRS --index "
                      f"{self.context.folder}`, or build with `audio_model` clap:NAME")
            for source, _ in pending:
                self._skip(source, reason)
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
        self._settle_copies()

    def _decode_audio(self, item: _Prepared, data: bytes) -> None:
        encoder = self.encoders.audio
        try:
            wave = load_audio(io.BytesIO(data), encoder.sample_rate, self.options.max_audio_seconds)
            item.windows = split_windows(wave, encoder.sample_rate)
        except AudioDecodeError as error:
            item.error, item.lasting = str(error), True

    def _encode_audio(self, batch: list[_Prepared]) -> None:
        waves = [window.samples for item in batch for window in item.windows]
        vectors = iter(self.encoders.audio.encode_audio(waves))
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
            with self._guard(item.source, item.digest) as outcome:
                vectors = self.encoders.encode_segments(item.segments)
            if not outcome.failed:
                self._write_timed(item, [(s.start, s.end) for s in item.segments], list(vectors))
                self.report.video_encoded += len(item.segments)
        self._settle_copies()

    def _decode_video(self, item: _Prepared, data: bytes) -> None:
        try:
            item.segments = self.encoders.decode_video(io.BytesIO(data), self.options.max_video_seconds)
        except VideoDecodeError as error:
            item.error, item.lasting = str(error), True

    def _write_timed(self, item: _Prepared, spans: list[tuple[float, float]],
                     vectors: list[np.ndarray]) -> None:
        """A sound's windows or a video's segments: all of a file's items replaced at once."""
        source, changes = item.source, self.changes[item.source.kind]
        with self._guard(source, item.digest), self.store.conn:
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
        """Text files' items, written a batch of texts per transaction, across files: a file
        of 5,000 captions is committed in steps, and a killed build re-encodes one batch."""
        size = self.encoders.batch_size
        batch: list[tuple[_TextFile, ItemSpec]] = []
        for source, row in pending:
            parsed = self._read_text_file(source, row)
            if parsed is None:
                continue
            fresh = self._begin_text_file(*parsed)
            batch += [(parsed[0], spec) for spec in fresh]
            while len(batch) >= size:
                self._write_text_batch(batch[:size])
                batch = batch[size:]
        if batch:
            self._write_text_batch(batch)
        if self.text_bar is not None:
            self.text_bar.close()

    def _read_text_file(self, source: SourceFile, row: FileRow | None
                        ) -> tuple[_TextFile, list[ItemSpec]] | None:
        """The file and its items, or None when it is unchanged, moved or unusable."""
        try:
            with open(source.path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            self._skip(source, f"cannot read ({error.strerror})")
            return None
        digest = file_digest(data)
        if row is not None and row.sha256 == digest and row.kind == source.kind:
            with self._guard(source), self.store.conn:
                self.store.touch_file(row.id, source.size, source.mtime_ns)
                self.report.unchanged += 1
            return None
        if row is None and self._move_from_gone(source, digest):
            return None
        try:
            return _TextFile(source, row, digest), read_items(source, data)
        except (CaptionFormatError, ValueError) as error:
            kind = "captions file" if source.kind == "captions" else "text file"
            self._skip(source, f"bad {kind}: {error}", lasting=True)
        except Exception as error:  # no single file may stop a build
            self._skip(source, unexpected(error))
        return None

    def _begin_text_file(self, file: _TextFile, specs: list[ItemSpec]) -> list[ItemSpec]:
        """Drop the file's items that are no longer in it and return the specs still to be
        written. A new file's row is written without its hash until its last item is in."""
        source = file.source
        with self._guard(source) as outcome, self.store.conn:
            if file.row is None:
                file.file_id = self.store.upsert_file(source.key, source.root, source.kind,
                                                      -1, -1, "")
            else:
                file.file_id = file.row.id
            existing = self.store.items_of_file(file.file_id)
            fresh, stale = [], []
            for spec in specs:
                current = existing.pop(spec.uri, None)
                if current is not None and current[1:] == (text_digest(spec.text), spec.parent_ref):
                    continue
                if current is not None:
                    stale.append(current[0])
                fresh.append(spec)
            stale += [item_id for item_id, *_ in existing.values()]
            self.store.delete_items(stale)
            if stale:
                self.store.bump_generation("text")
            file.waiting = len(fresh)
            if not fresh:
                self._finish_text_file(file)
            self.changes["text"].update(dict.fromkeys(stale))  # last: once nothing can fail
        return [] if outcome.failed else fresh

    def _write_text_batch(self, batch: list[tuple[_TextFile, ItemSpec]]) -> None:
        """Encode (or reuse) a batch of texts and write their items in one transaction; each
        file whose last item this is gets its hash, size and mtime."""
        vectors = self._text_vectors([spec.text for _, spec in batch])
        by_file: dict[int, tuple[_TextFile, list[ItemSpec]]] = {}
        for file, spec in batch:
            by_file.setdefault(id(file), (file, []))[1].append(spec)
        changes = self.changes["text"]
        with self.store.conn:
            for file, specs in by_file.values():
                if file.failed:
                    continue
                with self._guard(file.source) as outcome, self.store.savepoint():
                    fresh = [NewItem(spec.uri, spec.modality, vectors[text_digest(spec.text)],
                                     text_digest(spec.text), spec.text, spec.parent_ref, spec.meta)
                             for spec in specs]
                    new_ids = self.store.insert_items(file.file_id, fresh)
                    file.waiting -= len(specs)
                    if not file.waiting:
                        self._finish_text_file(file)
                    changes.update({item_id: item.vector for item_id, item in zip(new_ids, fresh)})
                if outcome.failed:
                    file.failed = True
                    if file.is_new:  # what earlier batches wrote of it goes too
                        for modality, ids in self.store.delete_files([file.file_id]).items():
                            self.changes[modality].update(dict.fromkeys(ids))
            self.store.bump_generation("text")
        batch_committed("text")

    def _finish_text_file(self, file: _TextFile) -> None:
        source = file.source
        self.store.upsert_file(source.key, source.root, source.kind, source.size, source.mtime_ns,
                               file.digest)
        if file.is_new:
            self.report.new += 1
        else:
            self.report.changed += 1

    def _text_vectors(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Vectors by text hash: stored ones reused, shards' taken, the rest encoded."""
        digests = {text_digest(text): text for text in texts}
        vectors = self.store.vectors_for_hashes("text", digests)
        made = {} if self.shards is None else {  # encoded by a distributed job
            d: self.shards.texts[d] for d in digests if d not in vectors and d in self.shards.texts}
        vectors.update(made)
        missing = [(d, t) for d, t in digests.items() if d not in vectors]
        self.report.vectors_reused += len(texts) - len(missing) - len(made)
        if missing:
            encoded = self.encoders.text.encode_texts([text for _, text in missing])
            vectors.update({digest: vector for (digest, _), vector in zip(missing, encoded)})
            if self.text_bar is None:  # shown once there is something to encode
                self.text_bar = tqdm(unit="text", desc="texts", disable=not self.options.progress)
            self.text_bar.update(len(missing))
        self.report.texts_encoded += len(missing) + len(made)
        return vectors

    # -- removal and FAISS ------------------------------------------------------------------

    def _remove(self, rows: list[FileRow]) -> None:
        if not rows:
            return
        with self.store.conn:
            removed = self.store.delete_files([row.id for row in rows])
            self.store.forget_unused_facts()
            for modality, ids in removed.items():
                self.changes[modality].update(dict.fromkeys(ids))
                self.store.bump_generation(modality)
        self.report.removed += len(rows)

    def _finish_vectors(self) -> None:
        """Apply this build's changes to each FAISS index and save it, or rebuild a stale one."""
        self.context.vectors.apply(self.changes, self.base, self._shard_runner())

    def _shard_runner(self) -> ShardRunner | None:
        """Ray tasks fill an on-disk index's shards in a Ray build; local processes otherwise."""
        if self.options.engine != "ray":
            return None
        from .ray import ray_runner

        return ray_runner(self.options.address)
