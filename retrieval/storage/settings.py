"""What an index records about itself in its info table, as typed values: the model, the vector
sizes, the FAISS index type and its knobs, the audio model, how videos are sampled, the default
fusion. The one place that knows the table's keys and parses their strings."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.errors import IndexFormatError
from ..core.types import CLIP_MODALITIES
from .manifest import FORMAT_VERSION
from .store import Store
from .vectors import DEFAULT_MEMORY_BUDGET, SearchKnobs

# How an index samples and pools videos unless it records otherwise (`Index.configure`).
VIDEO_DEFAULTS = {"frame_rate": "1.0", "scene_threshold": "", "temporal": "mean"}
KNOBS = ("ef_search", "nprobe", "rerank", "memory_budget")  # integers recorded by `convert`
# Settings with names of their own in the info table.
_KEYS = {"audio_model": "audio_encoder"}


class Settings:
    """A typed view of one index's info table.

    Reads are live, so a long-lived reader sees what a writer records beside it; only the
    vector size is read once and then kept as this process records it. Writes go into the
    store's current transaction; the caller commits them.
    """

    def __init__(self, folder: Path, store: Store) -> None:
        self.folder = folder
        self.store = store
        # A build that stored vectors without recording their size (a Ray build of texts alone
        # once did) is read by the size of the vectors; `dim_unrecorded` tells it is to be written.
        self.dim = int(store.get_info("dim", "0")) or next(
            (dim for m in CLIP_MODALITIES if (dim := store.stored_dim(m))), 0)

    def _get(self, name: str) -> str | None:
        return self.store.get_info(_KEYS.get(name, name))

    def update(self, **values: str | float | int | None) -> None:
        """Record settings by name (None removes one), in the current transaction."""
        for name, value in values.items():
            if value is None:
                self.store.delete_info(_KEYS.get(name, name))
            else:
                self.store.set_info(_KEYS.get(name, name), str(value))

    # -- the model and its vectors -----------------------------------------------------------

    @property
    def model(self) -> tuple[str, str | None] | None:
        """The recorded model's name and pretrained weights (None for none); None when no model
        is recorded yet (a new index, or one killed before its first commit)."""
        name = self.store.get_info("model_name")
        return None if name is None else (name, self.store.get_info("model_pretrained") or None)

    def record_model(self, name: str, pretrained: str | None) -> None:
        self.update(format_version=FORMAT_VERSION, model_name=name, model_pretrained=pretrained or "")

    @property
    def dim_unrecorded(self) -> bool:
        """The vectors' size is known (from the vectors) but not recorded."""
        return bool(self.dim) and self.store.get_info("dim", "0") == "0"

    def record_dim(self, dim: int, made_by: object) -> None:
        """Record the size of the vectors `made_by` (a model) makes, committed; refuse a model
        whose vectors have another size than the index's."""
        if self.dim and self.dim != dim:
            raise IndexFormatError(
                f"index {self.folder} holds {self.dim}-d vectors but model {made_by} makes {dim}-d; "
                "rebuild the index (`rebuild`)")
        if not self.dim and not self.store.readonly:
            with self.store.conn:
                self.store.set_info("dim", str(dim))
            self.dim = dim

    def dim_of(self, modality: str) -> int:
        """The vector size of a modality: the CLIP model's, or a CLAP model's for audio."""
        if modality == "audio":
            return self.audio_dim or self.dim
        return self.dim

    # -- captions ----------------------------------------------------------------------------

    @property
    def captioning(self) -> dict | None:
        """What builds write captions with (`build.captions.CaptionRequest` as a dict); None
        where builds write none."""
        recorded = self._get("captioning")
        return json.loads(recorded) if recorded else None

    def record_captioning(self, request: dict | None) -> None:
        self.update(captioning=None if request is None else json.dumps(request, sort_keys=True))

    # -- audio -------------------------------------------------------------------------------

    @property
    def audio_model(self) -> str | None:
        """What embeds the index's audio: `tower:HASH` (ours, trained), `clap:NAME`, or None."""
        return self._get("audio_model") or None

    @property
    def audio_dim(self) -> int:
        """The size of a CLAP model's vectors; 0 where audio shares the CLIP model's size."""
        return int(self._get("audio_dim") or 0)

    # -- FAISS ------------------------------------------------------------------------------

    @property
    def index_type(self) -> str:
        """The requested FAISS index type; `auto` picks one per modality by size."""
        return self._get("index_type") or "auto"

    def search_knobs(self) -> SearchKnobs:
        defaults = SearchKnobs()
        return SearchKnobs(ef_search=int(self._get("ef_search") or defaults.ef_search),
                           nprobe=int(self._get("nprobe") or defaults.nprobe),
                           rerank=int(self._get("rerank") or 0) or defaults.rerank)

    @property
    def memory_budget(self) -> int:
        """Bytes the vectors may take in RAM before `auto` chooses a compressed index type."""
        return int(self._get("memory_budget") or DEFAULT_MEMORY_BUDGET)

    # -- entries and video -------------------------------------------------------------------

    @property
    def fusion(self) -> str | None:
        """The entry fusion searches use when they name none."""
        return self._get("fusion") or None

    def video_setting(self, name: str) -> str:
        """A recorded video choice (frame_rate, scene_threshold, temporal), or its default."""
        return self._get(name) or VIDEO_DEFAULTS[name]

    @property
    def frame_rate(self) -> float:
        return float(self.video_setting("frame_rate"))

    @property
    def scene_threshold(self) -> float | None:
        threshold = self.video_setting("scene_threshold")
        return float(threshold) if threshold else None

    @property
    def frame_pooling(self) -> str:
        """`mean`, `max`, or the identity (`bilstm:HASH`) of a trained temporal encoder."""
        return self.video_setting("temporal")
