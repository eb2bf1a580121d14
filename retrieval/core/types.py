"""The engine's shared vocabulary: what a search returns (`Hit`), and every closed list of names
a caller chooses from. Each list is defined here once: the library checks its arguments against
it and the CLI offers it as choices, so the two cannot drift apart. Only the standard library is
imported, so the CLI can read these before it loads numpy, FAISS or torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# -- limits a build judges files by (the CLI shows them as defaults) -----------------------------

DEFAULT_MAX_MEGAPIXELS = 100.0
DEFAULT_MAX_AUDIO_SECONDS = 3600.0  # longer files are skipped as "huge": the whole file is decoded in memory
DEFAULT_MAX_VIDEO_SECONDS = 3 * 3600.0
# A server's query uploads, in MB: held in memory whole; below 10 KB hardly a query image fits.
MAX_UPLOAD_MB_RANGE = (0.01, 1024.0)

# -- modalities and what a search returns ------------------------------------------------------

MODALITIES = ("image", "text", "audio", "video")
TARGETS = ("auto", *MODALITIES)
# What `target="auto"` returns for each kind of query: the first of these the index holds.
AUTO_TARGETS = {"text": ("image", "video", "audio", "text"), "image": ("text", "image", "video", "audio"),
                "audio": ("audio", "video", "image", "text"), "video": ("video", "image", "text", "audio")}
TIMED = ("audio", "video")  # modalities whose files hold several items, found per file
CLIP_MODALITIES = ("image", "text", "video")  # always in the CLIP model's space (audio may not be)

# -- FAISS index types (`auto` picks one of the others per modality, by size) --------------------

MEMORY_INDEX_TYPES = ("flat", "hnsw", "ivf-sq", "ivf-pq")
# An on-disk type, and the in-memory type whose codes it keeps on disk.
DISK_INDEX_TYPES = {"ivf-sq-disk": "ivf-sq", "ivf-pq-disk": "ivf-pq"}
BUILT_INDEX_TYPES = (*MEMORY_INDEX_TYPES, *DISK_INDEX_TYPES)
INDEX_TYPES = ("auto", *BUILT_INDEX_TYPES)

# -- entries and fusion ------------------------------------------------------------------------

GROUPINGS = ("stem", "folder")  # or a manifest file naming each file's entry
EARLY_FUSIONS = ("mean", "weighted", "concat")
LATE_FUSIONS = ("sum", "max", "rrf")
FUSIONS = (*LATE_FUSIONS, *EARLY_FUSIONS, "attention")

# -- video -------------------------------------------------------------------------------------

FRAME_POOLINGS = ("mean", "max")  # how a segment's frames become one vector, blind to their order
TEMPORAL_ARCHITECTURES = ("bilstm", "transformer")  # learnt encoders that read frame order

# -- duplicates -------------------------------------------------------------------------------

# What makes two images near-duplicates: their vectors' cosine, their perceptual hashes'
# Hamming distance, or either of the two (see `retrieval.query.duplicates`).
DUPLICATE_SIGNALS = ("vector", "phash", "both")

# -- building and training ---------------------------------------------------------------------

ENGINES = ("local", "ray")
TRAIN_MODES = ("all", "projections", "adapters")
TOWERS = ("image", "text")
CAPTION_METHODS = ("beam", "top-p")  # how a CoCa model writes captions


@dataclass
class Hit:
    """One search result. `text` is a text item's text, or an image's first caption (a human
    one where it has one). `generated` says that text was written by a caption model
    (`metadata["caption_model"]` names it) rather than by a person.

    An audio hit is a file, represented by its best window: `uri` ends in `#t=START,END`
    and `metadata` holds `start` and `end` in seconds. A search with `dedup` lists the
    near-duplicates each hit stands for in `duplicates`.
    """

    id: int
    modality: str
    uri: str
    score: float
    path: str | None
    text: str | None = None
    metadata: dict = field(default_factory=dict)
    generated: bool = False
    # With `dedup`: the near-duplicates this hit stands for (id, uri, path, score each).
    duplicates: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, score: float | None = None) -> Hit:
        """A hit as `to_dict` wrote it (a server's JSON, say); `score` for data without one."""
        known = {name: value for name, value in data.items() if name in cls.__dataclass_fields__}
        return cls(**known) if score is None else cls(**{**known, "score": score})
