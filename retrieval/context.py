"""What the layers below the facade receive instead of `Index`: an index's folder, its store,
settings and vector sets, and its encoders, each loaded on first use (`IndexContext`).

The builder, the searcher and the trainers take a context (or less); only `index.Index`
assembles one, in `IndexContext.open`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from .core.errors import ModelMismatchError, NoAudioEncoderError, UsageError
from .encoders.audio import AudioEncoder, is_clap, load_audio_encoder
from .encoders.onnx_towers import (
    OnnxImageEncoder,
    OnnxTextEncoder,
    cached_key,
    export_in_child,
    install_cached,
    load_image_tower,
    load_text_tower,
    torch_may_use_an_accelerator,
)
from .encoders.spec import ModelSpec, check_device, check_weights_available, weights_fingerprint
from .storage.folder import SHARDS_FOLDER, writer_lock
from .storage.settings import Settings
from .storage.store import Store
from .storage.vector_sets import VectorSets

if TYPE_CHECKING:
    from .encoders.caption_spec import CaptionOptions
    from .encoders.captioner import Captioner
    from .encoders.clip import ClipEncoder
    from .encoders.video import VideoSampling
    from .media.video import VideoSegment


class Encoders:
    """An index's encoders, each loaded on first use: the CLIP model, the ONNX towers a build
    exported (`encoders.onnx_towers`), the audio encoder the index records, and video
    segments made of both.

    Images and texts go through the ONNX towers wherever they serve (no torch import: a
    query starts in a fraction of a second, a build holds half the memory); the model is
    loaded only for what they cannot do: models that do not export, a GPU, training and
    video. `one_shot` is for a process that answers one query and exits: its towers start at
    once but run slower (see `open_session`)."""

    def __init__(self, folder: Path, spec: ModelSpec, settings: Settings, device: str = "auto",
                 batch_size: int = 32, int8: bool = False, readonly: bool = False,
                 one_shot: bool = False) -> None:
        self.folder = folder
        self.spec = spec
        self.settings = settings
        self.device = check_device(device)  # here: towers alone never reach resolve_device
        self.batch_size = batch_size
        self.int8 = int8
        self.readonly = readonly
        self.one_shot = one_shot
        self._clip: ClipEncoder | None = None
        self._towers: dict[str, OnnxImageEncoder | OnnxTextEncoder | None] = {}  # None: missing
        self._audio: AudioEncoder | None = None
        self._captioner: Captioner | None = None

    @property
    def loaded_clip(self) -> bool:
        return self._clip is not None

    @property
    def clip(self) -> ClipEncoder:
        """The index's CLIP model, loaded on first use; a writer exports its ONNX towers."""
        if self._clip is None:
            check_weights_available(self.spec)  # before torch is imported: refused in a blink
            fingerprint = weights_fingerprint(self.spec)  # of the files about to be loaded
            from .encoders.clip import load_encoder

            self._clip = load_encoder(self.spec, self.device, self.batch_size, self.int8)
            self.settings.record_dim(self._clip.dim, self.spec)
            if not self.readonly:
                from .encoders.onnx_export import export_towers

                export_towers(self._clip, self.folder, fingerprint)
                self._towers.clear()  # look again: the towers may be new
        return self._clip

    @property
    def text(self) -> ClipEncoder | OnnxTextEncoder:
        """What encodes texts: the ONNX text tower (its 8-bit twin for `int8`), else the model."""
        tower = None if self._wants_model() else self._tower("text")
        return tower or self.clip

    @property
    def images(self) -> ClipEncoder | OnnxImageEncoder:
        """What encodes images (`preprocess`, `input_side`, `encode_preprocessed`,
        `encode_images`): the ONNX image tower (its 8-bit twin for `int8`), else the model.
        Waits for a tower's session that is still opening."""
        tower = self.image_preprocessing
        if isinstance(tower, OnnxImageEncoder) and not tower.ready():  # a damaged file
            self._towers["image"] = None
            return self.clip
        return tower

    @property
    def image_preprocessing(self) -> ClipEncoder | OnnxImageEncoder:
        """What `images` will be, for its `preprocess` and `input_side`, without waiting for
        a build's tower session, which opens meanwhile (`load_image_tower`). Its pixels suit
        the model too, should the tower turn out not to open."""
        tower = None if self._wants_model() else self._tower("image")
        return tower or self.clip

    def release_image_tower(self) -> None:
        """Let go of the ONNX image tower, so that its session (weights, pre-packed copies and
        arena: some 400 MB for ViT-B-32) is not resident beside the text tower's while a build
        encodes captions; opened again should anything need it later."""
        self._towers.pop("image", None)

    def _wants_model(self) -> bool:
        """A build that may run on a GPU keeps to torch, which uses it; queries (a few
        vectors each) are quicker on the towers anyway."""
        return not self.readonly and torch_may_use_an_accelerator(self.device)

    def _tower(self, kind: str) -> OnnxImageEncoder | OnnxTextEncoder | None:
        if kind not in self._towers:
            if not self.readonly and self._clip is None:
                self._bring_towers_up_to_date()
            if kind == "image":
                tower = load_image_tower(self.folder, self.spec.identity, self.one_shot,
                                         for_build=not self.readonly, int8=self.int8)
            else:
                tower = load_text_tower(self.folder, self.spec.identity, self.one_shot,
                                        for_build=not self.readonly, int8=self.int8)
            if tower is not None and not self.readonly:
                self.settings.record_dim(tower.dim, self.spec)
            self._towers[kind] = tower
        return self._towers[kind]

    def _bring_towers_up_to_date(self) -> None:
        """A writer's towers must come from the weights on disk now (a checkpoint may have been
        fine-tuned in place): those cached for them, found without torch, else exported in a
        child process (this one stays without torch), else exported from the model loaded
        here (random weights, which no file describes; or the child failed)."""
        fingerprint = weights_fingerprint(self.spec)
        key = cached_key(fingerprint)
        if key is None and fingerprint is not None:
            export_in_child(self.spec.name, self.spec.pretrained, fingerprint)
            key = cached_key(fingerprint)
        if key is None or not install_cached(key, self.folder):
            self.clip  # noqa: B018  loads the model, which exports its towers

    # -- captions ----------------------------------------------------------------------------

    def captioner(self, model: ModelSpec, options: CaptionOptions) -> Captioner:
        """A CoCa model writing captions with `options`: the index's own model (loaded once for
        both) when `model` is it, else `model`, loaded on first use."""
        from .encoders.captioner import Captioner, load_captioner

        if model.identity == self.spec.identity:
            return Captioner(self.clip, options)
        if self._captioner is None or self._captioner.identity != model.identity:
            self._captioner = load_captioner(model, options, self.device, self.batch_size)
        elif self._captioner.options != options:
            self._captioner = Captioner(self._captioner.encoder, options)
        return self._captioner

    # -- audio -------------------------------------------------------------------------------

    @property
    def audio_is_clap(self) -> bool:
        """The index's audio is embedded by CLAP, in a space of its own (not CLIP's)."""
        return is_clap(self.settings.audio_model)

    def audio_or_none(self) -> AudioEncoder | None:
        """The audio encoder the index records, loaded on first use; None when it has none."""
        identity = self.settings.audio_model
        if self._audio is not None and self._audio.identity != identity:
            self._audio = None  # retrained or replaced by a writer since it was loaded
        if self._audio is None and identity:
            self._audio = load_audio_encoder(identity, self.folder, self.device, self.batch_size)
            if is_clap(identity) and not self.readonly and not self.settings.audio_dim:
                with self.settings.store.conn:
                    self.settings.update(audio_dim=self._audio.dim)
        return self._audio

    @property
    def audio(self) -> AudioEncoder:
        """The index's audio encoder; NoAudioEncoderError when it has none yet."""
        encoder = self.audio_or_none()
        if encoder is None:
            raise NoAudioEncoderError(
                f"index {self.folder} has no audio encoder yet; train one with: retrieve "
                f"train-audio PAIRS --index {self.folder} (or build with `audio_model` clap:NAME)")
        return encoder

    # -- video -------------------------------------------------------------------------------

    def video_sampling(self) -> VideoSampling:
        """How the index samples videos; soundtracks at the audio tower's rate (no other
        encoder hears them)."""
        from .encoders.video import ANY_SAMPLE_RATE, VideoSampling  # PyAV: only where videos are

        encoder = self.audio_or_none()
        rate = encoder.sample_rate if encoder is not None and not self.audio_is_clap else ANY_SAMPLE_RATE
        return VideoSampling(self.settings.frame_rate, self.settings.scene_threshold, rate)

    def decode_video(self, source: str | BinaryIO, max_seconds: float) -> list[VideoSegment]:
        """A video's segments, sampled as the index records (VideoDecodeError when unusable)."""
        from .encoders.video import decode_segments

        return decode_segments(source, self.video_sampling(), max_seconds)

    def encode_segments(self, segments: list[VideoSegment]) -> np.ndarray:
        """One unit vector per segment, in the CLIP space, made as the index makes them."""
        from .encoders.video import VideoEncoder, pool_frames

        pooling = self.settings.frame_pooling
        if ":" in pooling:  # a trained temporal encoder's identity
            from .encoders.temporal import load_temporal

            model = load_temporal(self.folder, pooling)

            def pool(sequences: list[np.ndarray]) -> list[np.ndarray]:
                return list(model.encode(sequences))
        else:
            def pool(sequences: list[np.ndarray]) -> list[np.ndarray]:
                return [pool_frames(sequence, pooling) for sequence in sequences]
        sound = None if self.audio_is_clap else self.audio_or_none()
        return VideoEncoder(self.clip, pool, sound).encode_segments(segments)


@dataclass
class IndexContext:
    """The few handles the layers below the facade need: an index's folder, its store, its
    settings, its FAISS vector sets and its encoders; and its one writer's lock."""

    folder: Path
    store: Store
    settings: Settings
    vectors: VectorSets
    encoders: Encoders
    readonly: bool = False
    wait: bool = False

    @classmethod
    def assemble(cls, folder: Path, store: Store, spec: ModelSpec, device: str = "auto",
                 batch_size: int = 32, int8: bool = False, readonly: bool = False,
                 wait: bool = False, one_shot: bool = False) -> IndexContext:
        settings = Settings(folder, store)
        encoders = Encoders(folder, spec, settings, device, batch_size, int8, readonly, one_shot)
        return cls(folder, store, settings, VectorSets(folder, store, settings, readonly),
                   encoders, readonly, wait)

    @contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the one writer's lock (waiting for another writer only if the index was opened
        with `wait`), and report a disk that refuses writes in one line."""
        if self.readonly:
            raise UsageError(f"index {self.folder} was opened read-only")
        with writer_lock(self.folder, self.wait):
            yield

    def count(self, modality: str) -> int:
        return self.vectors.count(modality)

    def forget(self, modality: str, **settings: str | int | None) -> None:
        """Drop every file of a modality (`audio`, `video`) and its vectors, made with an encoder
        about to change, and record the new `settings` (None removes one), in one transaction.
        Hold the write lock."""
        with self.store.conn:
            self.store.delete_files(self.store.file_ids_of_kind(modality))  # such files hold only it
            self.store.bump_generation(modality)
            self.settings.update(**settings)
        self.vectors.rebuild(modality)
        self.vectors.write_manifest()


# -- the model an index is opened with ------------------------------------------------------------

def resolve_model(store: Store, folder: Path, requested: ModelSpec | None, rebuild: bool,
                  start_over: bool = False) -> ModelSpec:
    """The index's model; a new index records the requested (or default) one. Another model
    needs `rebuild`, and starts the index over; so does `start_over` with the same one."""
    settings = Settings(folder, store)
    recorded = settings.model
    if recorded is None:  # a new index (or one killed before its first commit)
        spec = requested or ModelSpec.parse()
        if not store.readonly:
            with store.conn:
                settings.record_model(spec.name, spec.pretrained)
        return spec
    recorded_spec = ModelSpec(*recorded)
    if requested is None or requested.identity == recorded_spec.identity:
        if start_over and not store.readonly:
            _start_over(store, folder, recorded_spec)
        return recorded_spec
    if not rebuild and not store.is_empty():
        raise ModelMismatchError(
            f"index {folder} was built with model {recorded_spec}, not {requested}; query without "
            "`model`, or re-encode everything (`rebuild`)")
    _start_over(store, folder, requested)
    return requested


def _start_over(store: Store, folder: Path, spec: ModelSpec) -> None:
    """Forget every file and vector, to encode them all again with `spec`, and the embedding
    shards of an unfinished Ray build; but not for a model whose weights cannot be had."""
    check_weights_available(spec)
    with store.conn:
        store.clear()
        Settings(folder, store).record_model(spec.name, spec.pretrained)
    shutil.rmtree(folder / SHARDS_FOLDER, ignore_errors=True)
