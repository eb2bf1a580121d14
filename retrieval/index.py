"""Index: what the Python API, the CLI and the service open. A thin facade: it opens an index
folder, assembles the handles the layers below work with (an `IndexContext`), and hands each
call to the layer that does the work: builds to `build`, searches to `query`, training to `train`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .context import IndexContext, resolve_model
from .core.errors import (
    IndexNotFoundError,
    ModelMismatchError,
    RetrievalError,
    UsageError,
)
from .core.paths import absolute_path
from .core.types import ENGINES, FRAME_POOLINGS, FUSIONS, INDEX_TYPES, MODALITIES, Hit
from .encoders.audio import is_clap
from .encoders.spec import ModelSpec
from .storage.folder import MadeFolder, holds_index, open_store, storage_errors, writer_lock
from .storage.manifest import FORMAT_VERSION
from .storage.settings import KNOBS
from .storage.store import WHERE_TIMEOUT_S

if TYPE_CHECKING:
    from .build.report import BuildReport
    from .encoders.audio import AudioEncoder
    from .encoders.clip import ClipEncoder
    from .encoders.onnx_towers import OnnxImageEncoder, OnnxTextEncoder
    from .query.duplicates import Duplicates
    from .query.encode import AudioQuery, ImageQuery
    from .query.entries import EntryHit
    from .query.search import EncodedQuery, Searcher
    from .storage.store import Store
    from .storage.vectors import SearchKnobs, VectorIndex
    from .train.audio import AudioTrainingOptions, AudioTrainingReport
    from .train.evaluation import DirectionScores
    from .train.fusion import FusionTrainingOptions


class Index:
    """A retrieval index directory. Open it with `Index.open`; close it, or use `with`."""

    def __init__(self, context: IndexContext, made: MadeFolder | None = None) -> None:
        self.context = context
        self._made = made  # what `open` made, removed again when the first command fails
        self._searcher: Searcher | None = None

    # -- opening ----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, model: str | None = None, pretrained: str | None = None,
             create: bool = False, rebuild: bool = False, index_type: str | None = None,
             device: str = "auto", batch_size: int = 32, int8: bool = False,
             readonly: bool = False, audio_model: str | None = None, wait: bool = False,
             one_shot: bool = False) -> Index:
        """Open the index at `path`, or make it when `create` is set.

        `model`/`pretrained` name the model (see `ModelSpec`). An existing index refuses another
        model unless `rebuild` is set, which drops its vectors to re-encode them all.
        `index_type` (one of INDEX_TYPES; `-disk` types live on disk) is recorded for a new index;
        an existing one keeps its type until `convert`. `int8` encodes with 8-bit weights (CPU):
        images and texts (a build's, and a reader's queries) with the ONNX towers' 8-bit twins
        where the export made them (an image tower about 3x, a text query about 2x as fast),
        vectors at cosine 0.99 or better; else with the fp32 towers, or torch's int8 model where
        there are no towers.
        `audio_model` (`clap:NAME` or `clap:/folder`) embeds audio with a CLAP model instead of
        the audio tower `train_audio` makes; changing it on an index with audio needs `rebuild`.
        One process writes at a time: a write while another process writes raises
        IndexLockedError at once, naming that process, unless `wait` is set: then it waits.
        `one_shot` is for a process that makes one search and exits: the ONNX query towers then
        start in a fraction of the time but run slower.
        """
        if index_type is not None and index_type not in INDEX_TYPES:
            raise UsageError(f"index type must be one of {', '.join(INDEX_TYPES)}, "
                             f"not {index_type!r}")
        try:
            folder = absolute_path(path)
            exists = holds_index(folder)
        except (OSError, ValueError) as error:
            raise UsageError(f"index path {str(path)!r}: {error}") from None
        if not exists and not create:
            raise IndexNotFoundError(
                f"no index at {folder}; build one with: retrieve index SOURCE... --index {path}")
        made = None if exists else MadeFolder.make(folder)
        readonly = readonly and exists
        try:
            store = open_store(folder, readonly)
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
                    spec = resolve_model(store, folder, requested, rebuild, start_over=start_over)
            else:
                spec = resolve_model(store, folder, requested, rebuild, start_over=start_over)
            if index_type and not readonly and store.get_info("index_type") is None:
                with store.conn:
                    store.set_info("index_type", index_type)
            index = cls(IndexContext.assemble(folder, store, spec, device, batch_size, int8, readonly,
                                              wait, one_shot), made)
            if audio_model is not None:
                index._choose_audio_model(audio_model, rebuild)
            if not readonly:
                # A writer at work keeps the FAISS files in step itself; repairing beside it would race.
                with writer_lock(folder, skip_if_busy=True) as held, storage_errors(folder):
                    if held:
                        index.context.vectors.repair()
        except BaseException:
            if index is None:
                store.close()
                if made is not None:
                    made.remove()
            else:
                index._close_after_failure()
            raise
        return index

    def _choose_audio_model(self, audio_model: str, rebuild: bool) -> None:
        """Record a CLAP model for the audio; another one's vectors are dropped only on rebuild."""
        if not is_clap(audio_model):
            raise UsageError(f"`audio_model` {audio_model!r}: name a CLAP model as clap:NAME or "
                             "clap:/folder; our own tower is made with retrieve train-audio")
        from .encoders.clap import clap_identity

        identity = clap_identity(audio_model)
        if identity == self.audio_model:
            return
        if self.readonly:
            raise ModelMismatchError(f"index {self.path} embeds audio with {self.audio_model}, "
                                     f"not {identity}; search without `audio_model`")
        if self.count("audio") and not rebuild:
            raise ModelMismatchError(
                f"index {self.path} embeds audio with {self.audio_model}, not {identity}; keep "
                "it, or re-encode the audio (`rebuild`)")
        with self.context.write_lock():
            self.context.forget("audio", audio_model=identity, audio_dim=None)

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
                with self.context.write_lock():  # held by another writer: it is theirs now
                    stub = self.store.is_empty()
            except RetrievalError:
                pass
        self.close()
        if stub:
            self._made.remove()

    # -- what it is -------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.context.folder

    @property
    def store(self) -> Store:
        return self.context.store

    @property
    def spec(self) -> ModelSpec:
        return self.context.encoders.spec

    @property
    def readonly(self) -> bool:
        return self.context.readonly

    @property
    def dim(self) -> int:
        """The size of the index's CLIP vectors; 0 before any model has made one."""
        return self.context.settings.dim

    def dim_of(self, modality: str) -> int:
        """The vector size of a modality: the CLIP model's, or a CLAP model's for audio."""
        return self.context.settings.dim_of(modality)

    def count(self, modality: str) -> int:
        return self.store.count(modality)

    @property
    def index_type(self) -> str:
        """The requested FAISS index type; `auto` picks one per modality by size."""
        return self.context.settings.index_type

    def search_knobs(self) -> SearchKnobs:
        return self.context.settings.search_knobs()

    def kind_for(self, count: int, modality: str = "image") -> str:
        """The FAISS index type a modality with `count` vectors should have now."""
        return self.context.vectors.index_type_for(count, modality)

    def video_setting(self, key: str) -> str:
        """A recorded video choice (frame_rate, scene_threshold, temporal), or its default."""
        return self.context.settings.video_setting(key)

    @property
    def audio_model(self) -> str | None:
        """What embeds this index's audio: `tower:HASH` (ours, trained), `clap:NAME`, or None."""
        return self.context.settings.audio_model

    @property
    def audio_is_clap(self) -> bool:
        return self.context.encoders.audio_is_clap

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
            "generated_captions": self.store.generated_caption_count(),
            "captioning": self.context.settings.captioning,
        }

    # -- encoders ---------------------------------------------------------------------------

    @property
    def encoder(self) -> ClipEncoder:
        """The index's model, loaded on first use."""
        return self.context.encoders.clip

    @property
    def text_encoder(self) -> ClipEncoder | OnnxTextEncoder:
        """What encodes text queries: the ONNX text tower a build exported, else the model."""
        return self.context.encoders.text

    @property
    def image_encoder(self) -> ClipEncoder | OnnxImageEncoder:
        """What encodes image queries: the ONNX image tower a build exported, else the model."""
        return self.context.encoders.images

    @property
    def audio_encoder(self) -> AudioEncoder:
        """The index's audio encoder, loaded on first use."""
        return self.context.encoders.audio

    def audio_encoder_or_none(self) -> AudioEncoder | None:
        return self.context.encoders.audio_or_none()

    # -- settings ---------------------------------------------------------------------------

    def configure(self, *, fusion: str | None = None, frame_rate: float | None = None,
                  scene_threshold: float | None = None, temporal: str | None = None) -> None:
        """Record index-wide choices: the default entry fusion, and how videos are sampled and
        pooled. Video choices cannot change while the index holds videos made with others."""
        if fusion is not None and fusion not in FUSIONS:
            raise UsageError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
        if temporal is not None and temporal not in FRAME_POOLINGS:
            raise UsageError(f"temporal pooling must be mean or max, not {temporal!r}")
        video = {"frame_rate": frame_rate, "scene_threshold": scene_threshold, "temporal": temporal}
        changed = {k: v for k, v in video.items() if v is not None and str(v) != self.video_setting(k)}
        if changed and self.count("video"):
            raise UsageError(f"index {self.path} holds videos sampled with other settings "
                             f"({', '.join(changed)}); remove them first, or build a new index")
        with self.context.write_lock(), self.store.conn:
            self.context.settings.update(**({"fusion": fusion} if fusion is not None else {}), **changed)

    def convert(self, index_type: str, **knobs: int) -> None:
        """Switch every modality to another index type, from the stored vectors (no encoding).

        `knobs` (ef_search, nprobe, rerank, memory_budget) are recorded for later searches.
        """
        if index_type not in INDEX_TYPES:
            raise UsageError(f"index type must be one of {', '.join(INDEX_TYPES)}, "
                             f"not {index_type!r}")
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise UsageError(f"unknown search knob {min(unknown)!r}: choose from {', '.join(KNOBS)}")
        with self.context.write_lock():
            with self.store.conn:
                self.context.settings.update(index_type=index_type, **{
                    name: int(value) for name, value in knobs.items() if value is not None})
            self.context.vectors.rebuild_all()

    # -- writing ----------------------------------------------------------------------------

    def add(self, *sources: str | Path, captions: Sequence[str | Path] = (),
            exclude: Sequence[str] | None = None, include_hidden: bool | None = None,
            follow_external_links: bool | None = None, max_megapixels: float | None = None,
            max_audio_seconds: float | None = None,
            max_video_seconds: float | None = None, progress: bool = False,
            engine: str = "local", address: str | None = None, caption: bool | None = None,
            caption_every_image: bool | None = None, caption_model: str | None = None,
            caption_pretrained: str | None = None, caption_method: str | None = None,
            caption_max_length: int | None = None, caption_beam_width: int | None = None,
            caption_top_p: float | None = None, recaption: bool = False) -> BuildReport:
        """Index new and changed files under `sources`, forget files gone from them.

        Unchanged files (same size and mtime, or same content) cost nothing; moved files keep
        their vectors; files skipped before are not read again until they change. With no
        sources, every source and captions file indexed before is scanned again, each source
        walked with the `exclude` and `include_hidden` it was last given (unless given here).
        Symlinks leading outside the sources are skipped unless `follow_external_links`
        (recorded per source, like `exclude`).
        `engine="ray"` decodes and encodes images as a Ray Data job on the cluster at `address`
        (`auto`, `ray://host:port`; None starts Ray locally); see `retrieval.build.ray`.

        `caption=True` has a CoCa model write a caption for every image without a human one
        (`caption_every_image`: for every image), searchable as a text marked generated; the
        index records the request, so later builds caption new and changed images alike
        (`caption=False` stops that). `caption_model` (an open_clip name with
        `caption_pretrained`, `local-dir:` or `hf-hub:`) defaults to the index's own model when
        it is a CoCa, else coca_ViT-B-32; `caption_method` is beam or top-p. Captions of
        another model or way are replaced only with `recaption`. See `retrieval.build.captions`.
        """
        if not sources:
            sources = tuple(self._known_roots())
            captions = [*captions, *self._known_captions()]
            if not sources and not captions:
                raise UsageError("nothing to index: name at least one source folder or file")
        else:  # named sources are walked as the call says
            exclude, include_hidden = exclude or (), bool(include_hidden)
            follow_external_links = bool(follow_external_links)
        if engine not in ENGINES:
            raise UsageError(f"engine must be local or ray, not {engine!r}")
        with self.context.write_lock():
            from .build.builder import Builder, BuildOptions
            from .build.captions import check_request, resolve_request

            request = resolve_request(
                self.context.settings.captioning, self.spec, caption=caption,
                every_image=caption_every_image, model=caption_model, pretrained=caption_pretrained,
                method=caption_method, max_length=caption_max_length, beam_width=caption_beam_width,
                top_p=caption_top_p)
            if request is not None and request.to_dict() != self.context.settings.captioning:
                check_request(request)  # asked now: refused at once, not after the images
            with self.store.conn:
                self.context.settings.record_captioning(None if request is None else request.to_dict())
            options = BuildOptions(exclude=None if exclude is None else tuple(exclude),
                                   include_hidden=include_hidden,
                                   follow_external_links=follow_external_links,
                                   progress=progress, engine=engine, address=address,
                                   captions=request, recaption=recaption)
            if max_megapixels is not None:
                options.max_megapixels = max_megapixels
            if max_audio_seconds is not None:
                options.max_audio_seconds = max_audio_seconds
            if max_video_seconds is not None:
                options.max_video_seconds = max_video_seconds
            return Builder(self.context, options).run(sources, captions)

    def remove(self, *sources: str | Path) -> int:
        """Forget every file at or under these paths; returns how many files were removed."""
        with self.context.write_lock():
            from .build.builder import Builder, BuildOptions

            return Builder(self.context, BuildOptions()).remove(sources)

    def _known_roots(self) -> list[str]:
        return [source for source in self.store.sources() if os.path.exists(source)]

    def _known_captions(self) -> list[str]:
        return [path for path in self.store.captions_files() if os.path.isfile(path)]

    # -- training ---------------------------------------------------------------------------

    def train_audio(self, pairs: str | Path, options: AudioTrainingOptions | None = None,
                    reindex: bool = True, log: Callable[[str], None] = lambda line: None
                    ) -> AudioTrainingReport:
        """Train our audio tower into this index's CLIP space on audio paired with images or
        captions (a folder or a CSV/JSONL pairs file; see `retrieval.train.audio`), and save it
        here.

        Audio indexed with an earlier encoder is dropped; with `reindex`, the folders indexed
        before are then scanned again, so their sounds are encoded with the new tower.
        `log` receives a line per epoch.
        """
        with self.context.write_lock():
            from .encoders.audio_tower import remove_other_towers, save_tower  # torch: once this may write
            from .train.audio import AudioTrainingOptions, read_audio_pairs, train_audio_tower

            tower, report = train_audio_tower(self.encoder, read_audio_pairs(pairs),
                                              options or AudioTrainingOptions(), log)
            report.identity = save_tower(tower, self.path)
            self.context.forget("audio", audio_model=report.identity, audio_dim=tower.config.embed_dim)
            remove_other_towers(self.path, keep=report.identity)
        if reindex and self._known_roots():
            self.add()
        return report

    def train_temporal(self, pairs: str | Path, kind: str = "bilstm",
                       options: FusionTrainingOptions | None = None, reindex: bool = True) -> dict:
        """Train a Bi-LSTM or small transformer over frame vectors on captioned videos, use it to
        pool every video segment's frames from now on, and re-encode the index's videos with it.
        `kind` is the encoder's architecture (TEMPORAL_ARCHITECTURES; the name the CLI's
        `--kind` shares), passed on as `architecture`."""
        with self.context.write_lock():
            from .train.temporal import train_temporal_encoder  # torch: once this may write

            identity, report = train_temporal_encoder(self.context, pairs, kind, options)
            self.context.forget("video", temporal=identity)
        if reindex and self._known_roots():
            self.add()
        return {"identity": identity, **report}

    def train_fusion(self, queries: str | Path, grouping: str = "stem",
                     options: FusionTrainingOptions | None = None) -> dict:
        """Train the attention gate of entry search (`fusion="attention"`) on queries and the
        entries that answer them (see `retrieval.query.entries.read_entry_queries`)."""
        from .train.fusion import train_fusion_gate

        with self.context.write_lock():
            return train_fusion_gate(self.context, queries, grouping, options)

    # -- vectors and searching --------------------------------------------------------------

    def vectors(self, modality: str) -> VectorIndex:
        """The FAISS index of a modality, in step with SQLite: reloaded or rebuilt when stale."""
        return self.context.vectors.get(modality)

    @property
    def searcher(self) -> Searcher:
        if self._searcher is None:
            from .query.search import Searcher

            self._searcher = Searcher(self.context)
        return self._searcher

    def search(self, query: str | None = None, *, text: str | None = None,
               image: ImageQuery = None, audio: AudioQuery = None, video: AudioQuery = None,
               like: int | None = None, vector: Sequence[float] | np.ndarray | None = None,
               vector_of: str = "image", k: int = 10,
               target: str = "auto", where: str | None = None, under: str | None = None,
               min_score: float | None = None, dedup: bool = False, filter: str | None = None,
               where_timeout: float = WHERE_TIMEOUT_S, max_megapixels: float | None = None,
               max_audio_seconds: float | None = None, max_video_seconds: float | None = None
               ) -> list[Hit]:
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
        `filter` is the filter language (`modality:image under:2020 size>1MB text:dog
        meta.camera=Canon`; see `retrieval.query.filters`); a bad one raises FilterError.
        `where` is raw SQL over item_view's columns, run read-only on item_view alone and
        stopped after `where_timeout` seconds; `under` a path prefix, `min_score` a cosine floor.
        `dedup` folds near-duplicates (cosine >= the duplicates' default threshold, chained as
        `duplicates` chains them) into the best of them: one hit per group, its `duplicates`
        listing the others found among the top candidates. `max_megapixels`,
        `max_audio_seconds` and `max_video_seconds` cap the query's images, sounds and videos
        (QueryTooLargeError beyond; defaults as for indexing).
        """
        return self.searcher.search(query, text=text, image=image, audio=audio, video=video,
                                    like=like, vector=vector, vector_of=vector_of, k=k, target=target,
                                    where=where, under=under, min_score=min_score, dedup=dedup,
                                    filter=filter, where_timeout=where_timeout,
                                    max_megapixels=max_megapixels, max_audio_seconds=max_audio_seconds,
                                    max_video_seconds=max_video_seconds)

    def encode_query(self, query: str | None = None, **options) -> EncodedQuery:
        """A query (the terms and caps `search` takes) made one vector, which any index of this
        model searches with `search(vector=q.vector, vector_of=q.vector_of, target=q.target)`:
        shards are sent the vector instead of each encoding the query again."""
        return self.searcher.encode_query(query, **options)

    def duplicates(self, *, threshold: float | None = None, by: str = "vector",
                   under: str | Path | None = None, min_size: int = 2,
                   max_distance: int | None = None, filter: str | None = None,
                   progress: bool = False) -> Duplicates:
        """Groups of duplicate images, largest first: exact copies (one content hash) and
        near-duplicates, by vector cosine >= `threshold`, by perceptual-hash distance <=
        `max_distance` bits, or `both` (either signal); see `retrieval.query.duplicates`.
        `under` keeps the images at or below a path, `filter` those a filter keeps (the language
        of `search`); groups smaller than `min_size` are left out.
        Each group's first file is the one to keep (largest resolution, then oldest). Nothing
        is moved or deleted. `progress` shows a bar on stderr while many vectors are compared."""
        from .query.duplicates import find_duplicates
        from .query.search import stored_under

        return find_duplicates(self.store, threshold=threshold, by=by, under=stored_under(under),
                               min_size=min_size, max_distance=max_distance, filter=filter,
                               progress=progress)

    def search_entries(self, query: str | None = None, **options) -> list[EntryHit]:
        """Entries (files sharing a stem, or a folder) that best match a query, each modality
        searched on its own and the evidence fused; see `retrieval.query.entries.search_entries`."""
        from .query.entries import search_entries

        return search_entries(self.searcher, query, **options)

    def evaluate_entries(self, queries: str | Path | list[tuple[str, set[str]]], grouping: str = "stem",
                         depth: int = 50) -> dict[str, DirectionScores]:
        """R@1/5/10 and median rank of entry search, for each single modality and each fusion
        (see `retrieval.train.evaluation.evaluate_fusion`)."""
        from .train.evaluation import evaluate_fusion

        return evaluate_fusion(self.searcher, queries, grouping, depth)

    def item(self, item_id: int) -> Hit | None:
        """An indexed item, as a hit with score 1 (its metadata, captions or image), or None."""
        return self.searcher.item(item_id)

    def item_vector(self, item_id: int) -> tuple[str, np.ndarray]:
        """An item's modality and stored vector: what `search(vector=, vector_of=)` takes."""
        return self.searcher.item_term(item_id).item
