"""Index: one directory tying the SQLite store, a FAISS index per modality and the encoder."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .core.concurrency import default_workers
from .core.errors import (
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    IndexWriteError,
    ModelLoadError,
    ModelMismatchError,
    RetrievalError,
    UsageError,
)
from .encoders.spec import CLAP_PREFIX, ModelSpec, check_weights_available
from .encoders.text_tower import NumpyTextEncoder, export_text_tower, load_text_tower
from .media.corpus import absolute_path, display_path
from .query.parse import QueryTerm
from .storage.manifest import FORMAT_VERSION, Manifest, VectorFileState
from .storage.ondisk import DISK_KINDS, OnDiskIndex, ShardRunner, build_on_disk
from .storage.store import MODALITIES, Store, StoredVectors
from .storage.vectors import DEFAULT_MEMORY_BUDGET, KINDS, SearchKnobs, VectorIndex, choose_kind

if TYPE_CHECKING:
    from .build.builder import BuildReport
    from .encoders.clip import ClipEncoder
    from .media.audio import AudioEncoder
    from .query.encode import AudioQuery, ImageQuery
    from .train.audio import AudioTrainingOptions, AudioTrainingReport

DB_NAME = "meta.sqlite"
WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}
LOCK_NAME = "write.lock"
TARGETS = ("auto", *MODALITIES)
INDEX_TYPES = ("auto", *KINDS)
# What `target="auto"` returns for each kind of query: the first of these the index holds.
AUTO_TARGETS = {"text": ("image", "video", "audio", "text"), "image": ("text", "image", "video", "audio"),
                "audio": ("audio", "video", "image", "text"), "video": ("video", "image", "text", "audio")}
TIMED = ("audio", "video")  # modalities whose files hold several items, found per file
CLIP_MODALITIES = ("image", "text", "video")  # always in the CLIP model's space (audio may not be)


@dataclass
class Hit:
    """One search result. `text` is a text item's text, or an image's first caption.

    An audio hit is a file, represented by its best window: `uri` ends in `#t=START,END`
    and `metadata` holds `start` and `end` in seconds.
    """

    id: int
    modality: str
    uri: str
    score: float
    path: str | None
    text: str | None = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Index:
    """A retrieval index directory. Open it with `Index.open`; close it, or use `with`."""

    def __init__(self, path: Path, store: Store, spec: ModelSpec, device: str, batch_size: int,
                 readonly: bool, int8: bool = False, wait: bool = False) -> None:
        self.path = path
        self.wait = wait
        self.store = store
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.readonly = readonly
        # A build that stored vectors without recording their size (a Ray build of texts alone
        # once did) is read by the size of the vectors; `_repair` records it.
        self.dim = int(store.get_info("dim", "0")) or next(
            (dim for m in CLIP_MODALITIES if (dim := store.stored_dim(m))), 0)
        self.int8 = int8
        self._encoder: ClipEncoder | None = None
        self._audio_encoder: AudioEncoder | None = None
        self._text_tower: NumpyTextEncoder | None = None
        self._vectors: dict[str, tuple[VectorIndex, int]] = {}  # modality -> (index, generation)
        self._made: MadeFolder | None = None  # set by `open` when it made the index here

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, model: str | None = None, pretrained: str | None = None,
             create: bool = False, rebuild: bool = False, index_type: str | None = None,
             device: str = "auto", batch_size: int = 32, int8: bool = False,
             readonly: bool = False, audio_model: str | None = None, wait: bool = False) -> Index:
        """Open the index at `path`, or make it when `create` is set.

        `model`/`pretrained` name the model (see `ModelSpec`). An existing index refuses another
        model unless `rebuild` is set, which drops its vectors to re-encode them all.
        `index_type` (one of INDEX_TYPES; `-disk` kinds live on disk) is recorded for a new index; an
        existing one keeps its type until `convert`. `int8` encodes with 8-bit weights (CPU).
        `audio_model` (`clap:NAME` or `clap:/folder`) embeds audio with a CLAP model instead of
        the audio tower `train_audio` makes; changing it on an index with audio needs `rebuild`.
        One process writes at a time: a write while another process writes raises
        IndexLockedError at once, naming that process, unless `wait` is set: then it waits.
        """
        if index_type is not None and index_type not in INDEX_TYPES:
            raise UsageError(f"index type must be one of {', '.join(INDEX_TYPES)}, "
                             f"not {index_type!r}")
        try:
            folder = absolute_path(path)
            exists = (folder / DB_NAME).is_file()
        except (OSError, ValueError) as error:
            raise UsageError(f"index path {str(path)!r}: {error}") from None
        if not exists and not create:
            raise IndexNotFoundError(
                f"no index at {folder}; build one with: retrieve index SOURCE... --index {path}")
        made = None if exists else MadeFolder.make(folder)
        readonly = readonly and exists
        try:
            store = _open_store(folder, readonly)
        except BaseException:
            if made is not None:
                made.remove()
            raise
        index = None
        try:
            requested = ModelSpec.parse(model, pretrained) if model or pretrained else None
            # A rebuild re-encodes everything (the way out of any inconsistent state), except
            # one asked for with an audio model, which re-encodes the sounds only.
            start_over = rebuild and audio_model is None
            if rebuild and not readonly:  # a rebuild may clear the store: not under another writer
                with writer_lock(folder, wait):
                    spec = _model_of(store, folder, requested, rebuild, start_over=start_over)
            else:
                spec = _model_of(store, folder, requested, rebuild, start_over=start_over)
            if index_type and not readonly and store.get_info("index_type") is None:
                with store.conn:
                    store.set_info("index_type", index_type)
            index = cls(folder, store, spec, device, batch_size, readonly, int8, wait)
            index._made = made
            if audio_model is not None:
                index._choose_audio_model(audio_model, rebuild)
            if not readonly:
                # A writer at work keeps the FAISS files in step itself; repairing beside it would race.
                with writer_lock(folder, skip_if_busy=True) as held, storage_errors(folder):
                    if held:
                        index._repair()
        except BaseException:
            if index is None:
                store.close()
                if made is not None:
                    made.remove()
            else:
                index._close_after_failure()
            raise
        return index

    def _repair(self) -> None:
        """Record a vector size left out, rewrite a missing or damaged manifest, and rebuild
        FAISS files that disagree with SQLite."""
        if self.dim and self.store.get_info("dim", "0") == "0":
            with self.store.conn:
                self.store.set_info("dim", str(self.dim))
        for modality in MODALITIES:
            if self.dim_of(modality):
                self.vectors(modality)
        self._write_manifest()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_after_failure()

    def _close_after_failure(self) -> None:
        """Close; and when `open` made this index and nothing has been indexed into it, remove
        what it made, so that a first command that fails leaves no stub behind."""
        stub = False
        if self._made is not None:
            try:
                with self._write_lock():  # held by another writer: it is theirs now
                    stub = self.store.is_empty()
            except RetrievalError:
                pass
        self.close()
        if stub:
            self._made.remove()

    @property
    def encoder(self) -> ClipEncoder:
        """The index's model, loaded on first use."""
        if self._encoder is None:
            check_weights_available(self.spec)  # before torch is imported: refused in a blink
            from .encoders.clip import load_encoder

            self._encoder = load_encoder(self.spec, self.device, self.batch_size, self.int8)
            self._record_dim(self._encoder.dim)
            if not self.readonly and load_text_tower(self.path, self.spec.identity) is None:
                export_text_tower(self._encoder, self.path)
        return self._encoder

    @property
    def audio_model(self) -> str | None:
        """What embeds this index's audio: `tower:HASH` (ours, trained), `clap:NAME`, or None."""
        return self.store.get_info("audio_encoder") or None

    @property
    def audio_is_clap(self) -> bool:
        return (self.audio_model or "").startswith(CLAP_PREFIX)

    @property
    def audio_encoder(self) -> AudioEncoder:
        """The index's audio encoder, loaded on first use."""
        encoder = self.audio_encoder_or_none()
        if encoder is None:
            raise ModelLoadError(
                f"index {self.path} has no audio encoder yet; train one with: retrieve "
                f"train-audio PAIRS --index {self.path} (or build with --audio-model clap:NAME)")
        return encoder

    def audio_encoder_or_none(self) -> AudioEncoder | None:
        identity = self.audio_model
        if self._audio_encoder is not None and self._audio_encoder.identity != identity:
            self._audio_encoder = None  # retrained or replaced by a writer since it was loaded
        if self._audio_encoder is None and identity:
            if identity.startswith(CLAP_PREFIX):
                from .encoders.clap import load_clap

                self._audio_encoder = load_clap(identity, self.device)
                if not self.readonly and self.store.get_info("audio_dim") is None:
                    with self.store.conn:
                        self.store.set_info("audio_dim", str(self._audio_encoder.dim))
            else:
                from .encoders.audio_tower import load_tower
                from .encoders.clip import resolve_device

                self._audio_encoder = load_tower(self.path, identity, resolve_device(self.device),
                                                 self.batch_size)
        return self._audio_encoder

    def _choose_audio_model(self, audio_model: str, rebuild: bool) -> None:
        """Record a CLAP model for the audio; another one's vectors are dropped only on rebuild."""
        if not audio_model.startswith(CLAP_PREFIX):
            raise UsageError(f"--audio-model {audio_model!r}: name a CLAP model as clap:NAME or "
                             "clap:/folder; our own tower is made with retrieve train-audio")
        from .encoders.clap import clap_identity

        identity = clap_identity(audio_model)
        if identity == self.audio_model:
            return
        if self.readonly:
            raise ModelMismatchError(f"index {self.path} embeds audio with {self.audio_model}, "
                                     f"not {identity}; search without --audio-model")
        if self.count("audio") and not rebuild:
            raise ModelMismatchError(
                f"index {self.path} embeds audio with {self.audio_model}, not {identity}; keep "
                "it, or re-encode the audio with --rebuild")
        with self._write_lock():
            self._forget("audio", audio_encoder=identity, audio_dim=None)

    def _forget(self, kind: str, **settings: str | int | None) -> None:
        """Drop every file and vector of a kind made with an encoder about to change, and record
        the new `settings` (None removes one), in one transaction."""
        with self.store.conn:
            self.store.delete_files(self.store.file_ids_of_kind(kind))
            self.store.bump_generation(kind)
            for key, value in settings.items():
                if value is None:
                    self.store.delete_info(key)
                else:
                    self.store.set_info(key, str(value))
        self._rebuild_vectors(kind)
        self._write_manifest()

    def configure(self, *, fusion: str | None = None, frame_rate: float | None = None,
                  scene_threshold: float | None = None, temporal: str | None = None) -> None:
        """Record index-wide choices: the default entry fusion, and how videos are sampled and
        pooled. Video choices cannot change while the index holds videos made with others."""
        from .query.entries import FUSIONS

        if fusion is not None and fusion not in FUSIONS:
            raise UsageError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
        if temporal is not None and temporal not in ("mean", "max"):
            raise UsageError(f"temporal pooling must be mean or max, not {temporal!r}")
        video = {"frame_rate": frame_rate, "scene_threshold": scene_threshold, "temporal": temporal}
        changed = {k: v for k, v in video.items() if v is not None and str(v) != self.video_setting(k)}
        if changed and self.count("video"):
            raise UsageError(f"index {self.path} holds videos sampled with other settings "
                             f"({', '.join(changed)}); remove them first, or build a new index")
        with self._write_lock(), self.store.conn:
            for key, value in {"fusion": fusion, **changed}.items():
                if value is not None:
                    self.store.set_info(key, str(value))

    def train_temporal(self, pairs: str | Path, kind: str = "bilstm", options=None,
                       reindex: bool = True) -> dict:
        """Train a Bi-LSTM or small transformer over frame vectors on captioned videos, use it to
        pool every video segment's frames from now on, and re-encode the index's videos with it."""
        with self._write_lock():
            from .encoders.video import train_temporal_encoder  # torch: once this may write

            identity, report = train_temporal_encoder(self, pairs, kind, options)
            self._forget("video", temporal=identity)
        if reindex and self._known_roots():
            self.add()
        return {"identity": identity, **report}

    def video_setting(self, key: str) -> str:
        """A recorded video choice (frame_rate, scene_threshold, temporal), or its default."""
        from .encoders.video import VIDEO_SETTINGS

        return self.store.get_info(key) or VIDEO_SETTINGS[key]

    def dim_of(self, modality: str) -> int:
        """The vector size of a modality: the CLIP model's, or a CLAP model's for audio."""
        if modality == "audio":
            return int(self.store.get_info("audio_dim") or 0) or self.dim
        return self.dim

    @property
    def text_encoder(self) -> ClipEncoder | NumpyTextEncoder:
        """What encodes text queries: the numpy text tower a build exported (no torch import,
        so a query starts in well under a second), else the full model."""
        if self._encoder is None and self._text_tower is None:
            self._text_tower = load_text_tower(self.path, self.spec.identity)
        return self._text_tower or self.encoder

    def _record_dim(self, dim: int) -> None:
        if self.dim and self.dim != dim:
            raise IndexFormatError(
                f"index {self.path} holds {self.dim}-d vectors but model {self.spec} makes {dim}-d; "
                "rebuild the index with --rebuild")
        if not self.dim and not self.readonly:
            with self.store.conn:
                self.store.set_info("dim", str(dim))
            self.dim = dim

    def count(self, modality: str) -> int:
        return self.store.count(modality)

    def stats(self) -> dict:
        """Model, vector size, item counts and index type, as in the manifest."""
        return {
            "path": str(self.path),
            "format_version": FORMAT_VERSION,
            "model": {"name": self.spec.name, "pretrained": self.spec.pretrained},
            "dim": self.dim,
            "index_type": self.index_type,
            "counts": {m: self.count(m) for m in MODALITIES},
            "audio_model": self.audio_model,
        }

    @property
    def index_type(self) -> str:
        """The requested FAISS index type; `auto` picks one per modality by size."""
        return self.store.get_info("index_type") or "auto"

    def search_knobs(self) -> SearchKnobs:
        defaults = SearchKnobs()
        return SearchKnobs(
            ef_search=int(self.store.get_info("ef_search") or defaults.ef_search),
            nprobe=int(self.store.get_info("nprobe") or defaults.nprobe),
            rerank=int(self.store.get_info("rerank") or 0) or defaults.rerank)

    def kind_for(self, count: int, modality: str = "image") -> str:
        """The FAISS index kind a modality with `count` vectors should use now."""
        budget = int(self.store.get_info("memory_budget") or DEFAULT_MEMORY_BUDGET)
        return choose_kind(self.index_type, count, self.dim_of(modality), budget)

    def convert(self, index_type: str, **knobs: int) -> None:
        """Switch every modality to another index type, from the stored vectors (no encoding).

        `knobs` (ef_search, nprobe, rerank, memory_budget) are recorded for later searches.
        """
        if index_type not in INDEX_TYPES:
            raise UsageError(f"index type must be one of {', '.join(INDEX_TYPES)}, "
                             f"not {index_type!r}")
        with self._write_lock():
            with self.store.conn:
                self.store.set_info("index_type", index_type)
                for name, value in knobs.items():
                    if value is not None:
                        self.store.set_info(name, str(int(value)))
            for modality in MODALITIES:
                self._rebuild_vectors(modality)
            self._write_manifest()

    # -- writing ----------------------------------------------------------------------------

    def add(self, *sources: str | Path, captions: Sequence[str | Path] = (),
            exclude: Sequence[str] | None = None, include_hidden: bool | None = None,
            max_megapixels: float | None = None, max_audio_seconds: float | None = None,
            max_video_seconds: float | None = None, progress: bool = False,
            engine: str = "local", address: str | None = None) -> BuildReport:
        """Index new and changed files under `sources`, forget files gone from them.

        Unchanged files (same size and mtime, or same content) cost nothing; moved files keep
        their vectors; files skipped before are not read again until they change. With no
        sources, every source and captions file indexed before is scanned again, each source
        walked with the `exclude` and `include_hidden` it was last given (unless given here).
        `engine="ray"` decodes and encodes images as a Ray Data job on the cluster at `address`
        (`auto`, `ray://host:port`; None starts Ray locally); see `retrieval.build.ray`.
        """
        if not sources:
            sources = tuple(self._known_roots())
            captions = [*captions, *self._known_captions()]
            if not sources and not captions:
                raise UsageError("nothing to index: name at least one source folder or file")
        else:  # named sources are walked as the call says
            exclude, include_hidden = exclude or (), bool(include_hidden)
        if engine not in ("local", "ray"):
            raise UsageError(f"engine must be local or ray, not {engine!r}")
        with self._write_lock():
            from .build.builder import Builder, BuildOptions

            options = BuildOptions(exclude=None if exclude is None else tuple(exclude),
                                   include_hidden=include_hidden,
                                   progress=progress, engine=engine, address=address)
            if max_megapixels is not None:
                options.max_megapixels = max_megapixels
            if max_audio_seconds is not None:
                options.max_audio_seconds = max_audio_seconds
            if max_video_seconds is not None:
                options.max_video_seconds = max_video_seconds
            return Builder(self, options).run(sources, captions)

    def remove(self, *sources: str | Path) -> int:
        """Forget every file at or under these paths; returns how many files were removed."""
        with self._write_lock():
            from .build.builder import Builder, BuildOptions

            return Builder(self, BuildOptions()).remove(sources)

    def train_audio(self, pairs: str | Path, options: AudioTrainingOptions | None = None,
                    reindex: bool = True, log=lambda line: None) -> AudioTrainingReport:
        """Train our audio tower into this index's CLIP space on audio paired with images or
        captions (a folder or a CSV/JSONL pairs file; see `audio_training`), and save it here.

        Audio indexed with an earlier encoder is dropped; with `reindex`, the folders indexed
        before are then scanned again, so their sounds are encoded with the new tower.
        `log` receives a line per epoch.
        """
        with self._write_lock():
            from .encoders.audio_tower import remove_other_towers, save_tower  # torch: once this may write
            from .train.audio import AudioTrainingOptions, read_audio_pairs, train_audio_tower

            tower, report = train_audio_tower(self.encoder, read_audio_pairs(pairs),
                                              options or AudioTrainingOptions(), log)
            report.identity = save_tower(tower, self.path)
            self._forget("audio", audio_encoder=report.identity, audio_dim=tower.config.embed_dim)
            remove_other_towers(self.path, keep=report.identity)
        if reindex and self._known_roots():
            self.add()
        return report

    def _known_roots(self) -> list[str]:
        return [source for source in self.store.sources() if os.path.exists(source)]

    def _known_captions(self) -> list[str]:
        return [path for path in self.store.captions_files() if os.path.isfile(path)]

    @contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Hold the one writer's lock (waiting for another writer only if the index was opened
        with `wait`), and report a disk that refuses writes in one line."""
        if self.readonly:
            raise UsageError(f"index {self.path} was opened read-only")
        with writer_lock(self.path, self.wait):
            yield

    # -- vectors ----------------------------------------------------------------------------

    def vectors(self, modality: str) -> VectorIndex:
        """The FAISS index of a modality, in step with SQLite: reloaded or rebuilt when stale.

        Checking the generation on every call is what lets a long-lived reader see a build
        that ran beside it.
        """
        return self._fresh_vectors(modality) or self._rebuild_vectors(modality)

    def _fresh_vectors(self, modality: str) -> VectorIndex | None:
        """The cached or saved FAISS index if it reflects SQLite's current generation."""
        generation = self.store.generation(modality)
        cached = self._vectors.get(modality)
        if cached is not None and cached[1] == generation:
            return cached[0]
        manifest = Manifest.read(self.path)
        state = manifest.vectors.get(modality) if manifest else None
        if state is None or state.generation != generation:
            return None
        try:
            if state.kind in DISK_KINDS:
                vectors = OnDiskIndex.load(self.path / state.file)
            else:
                vectors = VectorIndex.load(self.path / state.file, mmap=self.readonly)
        except (RuntimeError, OSError):  # FAISS reports unreadable files this way
            return None
        if len(vectors) != state.count or len(vectors) != self.count(modality):
            return None
        self._vectors[modality] = (vectors, generation)
        return vectors

    def _rebuild_vectors(self, modality: str, runner: ShardRunner | None = None) -> VectorIndex:
        """Rebuild from the vectors SQLite keeps; writers also save the result. An on-disk
        index fills its shards with `runner` (default: local processes)."""
        # Generation first: a commit landing in between makes the label older than the data,
        # which only costs another rebuild later; the reverse would hide vectors.
        generation = self.store.generation(modality)
        kind, dim = self.kind_for(self.count(modality), modality), self.dim_of(modality)
        if kind in DISK_KINDS and not self.readonly:
            vectors = build_on_disk(StoredVectors(self.store.path, modality, dim),
                                    self.path / f"{modality}-{generation}.ondisk", kind,
                                    default_workers(), runner)
        else:  # a reader cannot write an on-disk index: it makes the in-memory one of its kind
            ids, stored = self.store.all_vectors(modality)
            vectors = VectorIndex.build(DISK_KINDS.get(kind, kind), dim or 1, ids, stored)
        self._store_vectors(modality, vectors, generation)
        return vectors

    def _store_vectors(self, modality: str, vectors: VectorIndex, generation: int) -> None:
        """Cache a FAISS index as reflecting `generation`, and save it when writing."""
        self._vectors[modality] = (vectors, generation)
        if not self.readonly and self.dim_of(modality):
            self._save_vectors(modality, vectors, generation)

    def _save_vectors(self, modality: str, vectors: VectorIndex, generation: int) -> None:
        """Save (an on-disk index is already in place), point the manifest at it, then delete
        the modality's other files: older on-disk folders, or the in-memory kind's file after a
        conversion to disk. Readers that map them keep them until they close."""
        name = vectors.folder.name if isinstance(vectors, OnDiskIndex) else f"{modality}.faiss"
        vectors.save(self.path / name)
        manifest = self._manifest()
        manifest.vectors[modality] = VectorFileState(name, len(vectors), generation, vectors.kind)
        manifest.write(self.path)
        for old in [*self.path.glob(f"{modality}-*.ondisk*"), self.path / f"{modality}.faiss"]:
            if old.name != name:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)

    def _manifest(self) -> Manifest:
        manifest = Manifest.read(self.path) or Manifest(FORMAT_VERSION, {}, self.dim)
        stats = self.stats()
        manifest.model, manifest.dim, manifest.counts = stats["model"], self.dim, stats["counts"]
        manifest.index_type = self.index_type
        return manifest

    def _write_manifest(self) -> None:
        self._manifest().write(self.path)

    # -- searching --------------------------------------------------------------------------

    def search(self, query: str | None = None, *, text: str | None = None,
               image: ImageQuery = None, audio: AudioQuery = None, video: AudioQuery = None,
               like: int | None = None, vector: Sequence[float] | np.ndarray | None = None,
               vector_of: str = "image", k: int = 10,
               target: str = "auto", where: str | None = None, under: str | None = None,
               min_score: float | None = None) -> list[Hit]:
        """Nearest items to a query, best first.

        `query` is a combined query ("cat + 2:dog - grass", terms may be image or audio paths);
        `text` adds a plain text term, `image` one or more images (paths or PIL images) and
        `audio` one or more sounds and `video` one or more videos (paths or binary file
        objects), and `like` the id of an indexed item whose stored vector joins the query.
        `vector` is a query vector made elsewhere (another shard's item, say), as an item of
        modality `vector_of` would have it.
        `target` picks the modality returned: `auto` gives images for text queries, texts
        (captions) for image queries, sounds for sound queries and videos for video queries, or
        the next modality the index holds. Audio and video hits are files, each at its best
        window or segment (`metadata` start and end, `uri` ending in `#t=START,END`).
        `where` is SQL over item_view's columns, `under` a path prefix, `min_score` a cosine floor.
        """
        from .query.encode import query_modality, query_terms, query_vector

        if k < 1:
            raise UsageError(f"k must be at least 1, not {k}")
        if target not in TARGETS:
            raise UsageError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
        items = [] if like is None else [self._item_term(like)]
        items += [] if vector is None else [_vector_term(vector, vector_of, self.dim_of(vector_of))]
        terms = query_terms(query, text, image, audio, items, video)
        target = self._resolve_target(target, query_modality(terms))
        size = self.count(target)
        if not size:  # nothing of that kind was ever encoded: no model needed to find nothing
            return []
        vector = query_vector(self, terms, target)
        _check_text("where", where)
        allowed = self.store.item_ids(target, where, _absolute(under)) if where or under else None
        if target in TIMED:
            hits = self._best_window_per_file(target, vector, k, size, allowed)
        else:
            hits = self._hydrate(*self._nearest(target, vector, min(k, size), allowed))
        return [hit for hit in hits if min_score is None or hit.score >= min_score]

    def search_entries(self, query: str | None = None, **options) -> list:
        """Entries (files sharing a stem, or a folder) that best match a query, each modality
        searched on its own and the evidence fused; see `retrieval.query.entries.search_entries`."""
        from .query.entries import search_entries

        return search_entries(self, query, **options)

    def _item_term(self, item_id: int) -> QueryTerm:
        row = self.store.items([item_id]).get(item_id)
        if row is None:
            raise UsageError(f"no item with id {item_id} in index {self.path}")
        return QueryTerm(1.0, item=(row.modality, self.store.vectors_for_ids(np.array([item_id]))[0]))

    def item(self, item_id: int) -> Hit | None:
        """An indexed item, as a hit with score 1 (its metadata, captions or image), or None."""
        hits = self._hydrate(np.array([item_id]), np.array([1.0]))
        return hits[0] if hits else None

    def item_vector(self, item_id: int) -> tuple[str, np.ndarray]:
        """An item's modality and stored vector: what `search(vector=, vector_of=)` takes."""
        return self._item_term(item_id).item

    def _nearest(self, modality: str, vector: np.ndarray, k: int, allowed: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.vectors(modality).search(vector, k, allowed, self.search_knobs(),
                                                    self.store.vectors_for_ids)
        return ids, scores

    def _best_window_per_file(self, modality: str, vector: np.ndarray, k: int, size: int,
                              allowed: np.ndarray | None) -> list[Hit]:
        """The k best sound or video files, each represented by its best window or segment.

        Windows are fetched four per wanted file, and more while too few files come back.
        """
        wanted = min(size, 4 * k)
        while True:
            files: dict[str, Hit] = {}
            for hit in self._hydrate(*self._nearest(modality, vector, wanted, allowed)):
                files.setdefault(hit.path or hit.uri, hit)  # best first, so the first is best
            if len(files) >= k or wanted >= size:
                return list(files.values())[:k]
            wanted = min(size, 4 * wanted)

    def _resolve_target(self, target: str, query_modality: str) -> str:
        if target != "auto":
            return target
        return next((m for m in AUTO_TARGETS[query_modality] if self.count(m)), query_modality)

    def _hydrate(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        rows = self.store.items([int(i) for i in ids])
        captions = self.store.captions_of([i for i, row in rows.items() if row.modality == "image"])
        parents = self.store.items([row.parent_id for row in rows.values() if row.parent_id])
        hits = []
        for item_id, score in zip(ids, scores):
            row = rows.get(int(item_id))
            if row is None:  # removed by a writer since this reader's FAISS snapshot
                continue
            metadata = dict(row.meta)
            text = row.text
            if row.modality == "image":
                metadata["captions"] = captions.get(row.id, [])
                text = metadata["captions"][0] if metadata["captions"] else None
            elif row.parent_id in parents:
                metadata["image"] = parents[row.parent_id].uri
            hits.append(Hit(row.id, row.modality, row.uri, float(score), row.path, text, metadata))
        return hits


def _vector_term(vector: Sequence[float] | np.ndarray, modality: str, dim: int) -> QueryTerm:
    if modality not in MODALITIES:
        raise UsageError(f"vector_of must be one of {', '.join(MODALITIES)}, not {modality!r}")
    values = np.asarray(vector, dtype=np.float32).ravel()
    if dim and len(values) != dim:
        raise UsageError(f"the query vector has {len(values)} numbers; this index's {modality} "
                         f"vectors have {dim}")
    return QueryTerm(1.0, item=(modality, values))


@dataclass(frozen=True)
class MadeFolder:
    """What opening a new index made: its folder and any parents, or, in a folder that was
    there before, the entries it added; `remove` takes away exactly that."""

    top: Path  # the outermost folder made, or the index folder if it was there before
    before: frozenset[str] | None  # what a folder that was there before held

    @classmethod
    def make(cls, folder: Path) -> MadeFolder:
        top = folder
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        try:
            before = frozenset(os.listdir(folder)) if folder.is_dir() else None
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise IndexFormatError(f"cannot create index folder {folder}: {error.strerror}") from None
        return cls(top if before is None else folder, before)

    def remove(self) -> None:
        if self.before is None:
            shutil.rmtree(self.top, ignore_errors=True)
            return
        for entry in self.top.iterdir():
            if entry.name not in self.before:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


@contextmanager
def writer_lock(folder: Path, wait: bool = False, skip_if_busy: bool = False) -> Iterator[bool]:
    """Hold an index folder's one writer lock, with who holds it written in the lock file.

    Another writer is refused at once (IndexLockedError, naming it), waited for with `wait`, or
    with `skip_if_busy` not waited for: then this yields False and holds nothing.
    """
    with storage_errors(folder), open(folder / LOCK_NAME, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if skip_if_busy:
                yield False
                return
            if not wait:
                raise IndexLockedError(folder, lock_holder(folder)) from None
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.truncate(0)
            handle.write(json.dumps({"pid": os.getpid(), "command": _command_line(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            handle.flush()
            yield True
        finally:
            handle.truncate(0)  # a holder is named only while it holds the lock
            fcntl.flock(handle, fcntl.LOCK_UN)


def index_writer(path: str | Path) -> str | None:
    """Who is writing the index at `path` now (see `lock_holder`), or None: a quick look
    before slow work, which the lock itself still guards."""
    try:
        folder = absolute_path(path)
        if not (folder / LOCK_NAME).is_file():
            return None
        with writer_lock(folder, skip_if_busy=True) as free:
            return None if free else lock_holder(folder)
    except (OSError, ValueError, IndexWriteError):  # the write itself will say what is wrong
        return None


def lock_holder(folder: Path) -> str:
    """Who holds an index's writer lock, as its lock file says: `pid 12 (retrieve index ~/P)
    since 2025-05-01 10:02:03`; `another process` where the file does not say."""
    try:
        holder = json.loads((folder / LOCK_NAME).read_text(encoding="utf-8"))
        return f"pid {holder['pid']} ({holder['command']}) since {holder['since']}"
    except (OSError, ValueError, TypeError, KeyError):  # not written yet, or by an older version
        return "another process"


def _command_line() -> str:
    """This process's command, short: `retrieve index photos`, `python -m retrieval ...`."""
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":  # python -m retrieval, python -m retrieval.cli
        program = "retrieve"
    command = shlex.join([program, *sys.argv[1:]])
    return command if len(command) <= 200 else command[:199] + "…"


@contextmanager
def storage_errors(folder: Path) -> Iterator[None]:
    """A full disk or a read-only folder becomes one line; SQLite has rolled back by then."""
    try:
        yield
    except sqlite3.OperationalError as error:
        raise IndexWriteError(_cannot_write(folder, str(error))) from None
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise IndexWriteError(_cannot_write(folder, error.strerror or str(error))) from None


def _cannot_write(folder: Path, reason: str) -> str:
    if folder.exists() and not os.access(folder, os.W_OK):
        reason = "the folder is read-only"  # SQLite only says it cannot open the database
    return (f"cannot write to index {folder} ({reason}); free disk space or make the folder "
            "writable, then run again: what was committed before is kept")


def _open_store(folder: Path, readonly: bool) -> Store:
    try:
        with storage_errors(folder):
            store = Store(folder / DB_NAME, readonly=readonly)
        version = int(store.get_info("format_version", str(FORMAT_VERSION)))
    except sqlite3.DatabaseError as error:
        raise IndexFormatError(
            f"index {folder}: {DB_NAME} cannot be read ({error}); restore it from a backup or "
            "build a new index") from None
    if version != FORMAT_VERSION:
        store.close()
        if version > FORMAT_VERSION:
            raise IndexFormatError(
                f"index {folder} has format version {version}, newer than this version of "
                f"retrieval understands ({FORMAT_VERSION}); upgrade retrieval")
        # No format before version 1 was ever released, so there is nothing to migrate from.
        raise IndexFormatError(
            f"index {folder} has format version {version}, which this version of retrieval "
            f"cannot read; build it again in a new folder")
    return store


def _model_of(store: Store, folder: Path, requested: ModelSpec | None, rebuild: bool,
              start_over: bool = False) -> ModelSpec:
    """The index's model; a new index records the requested (or default) one. Another model
    needs `rebuild`, and starts the index over; so does `start_over` with the same one."""
    name = store.get_info("model_name")
    if name is None:  # a new index (or one killed before its first commit)
        spec = requested or ModelSpec.parse()
        if not store.readonly:
            with store.conn:
                _record_model(store, spec)
        return spec
    recorded = ModelSpec(name, store.get_info("model_pretrained") or None)
    if requested is None or requested.identity == recorded.identity:
        if start_over and not store.readonly:
            _start_over(store, folder, recorded)
        return recorded
    if not rebuild and not store.is_empty():
        raise ModelMismatchError(
            f"index {folder} was built with model {recorded}, not {requested}; query without "
            "--model, or re-encode everything with --rebuild")
    _start_over(store, folder, requested)
    return requested


def _start_over(store: Store, folder: Path, spec: ModelSpec) -> None:
    """Forget every file and vector, to encode them all again with `spec`, and the embedding
    shards of an unfinished Ray build; but not for a model whose weights cannot be had."""
    from .build.ray import SHARDS_FOLDER

    check_weights_available(spec)
    with store.conn:
        store.clear()
        _record_model(store, spec)
    shutil.rmtree(folder / SHARDS_FOLDER, ignore_errors=True)


def _record_model(store: Store, spec: ModelSpec) -> None:
    store.set_info("format_version", str(FORMAT_VERSION))
    store.set_info("model_name", spec.name)
    store.set_info("model_pretrained", spec.pretrained or "")


def _absolute(path: str | None) -> str | None:
    """A folder prefix as stored: absolute, in display form (odd bytes as \\xNN)."""
    if not path:
        return None
    try:
        return display_path(str(absolute_path(path)))
    except FileNotFoundError as error:
        raise UsageError(f"--under: {error}") from None


def _check_text(option: str, value: str | None) -> None:
    try:
        if value is not None:
            value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"--{option} {value!r} holds characters that are not text") from None
