"""manifest.json: what an index directory holds, readable without opening SQLite or FAISS.

SQLite stays the source of truth for the model and the counts; the manifest mirrors them and
adds, per modality, which SQLite generation its FAISS file reflects. A FAISS file whose
generation or size disagrees with SQLite is stale and is rebuilt from the stored vectors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import IndexFormatError
from ..core.files import replacing

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class VectorFileState:
    """One modality's FAISS file, as saved: its name, size, the generation it reflects, its type."""

    file: str
    count: int
    generation: int
    index_type: str = "flat"  # "kind" in manifest.json

    @classmethod
    def from_json(cls, data: dict) -> VectorFileState:
        data = dict(data)
        index_type = data.pop("kind", "flat")
        return cls(**data, index_type=index_type)

    def to_json(self) -> dict:
        return {"file": self.file, "count": self.count, "generation": self.generation,
                "kind": self.index_type}


@dataclass
class Manifest:
    format_version: int
    model: dict
    dim: int
    index_type: str = "auto"
    counts: dict[str, int] = field(default_factory=dict)
    vectors: dict[str, VectorFileState] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The manifest, or None when it is missing or unreadable (it can be rewritten)."""
        try:
            data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
            vectors = {m: VectorFileState.from_json(state) for m, state in data.pop("vectors", {}).items()}
            manifest = cls(**data, vectors=vectors)
        except (OSError, ValueError, TypeError):
            return None
        if manifest.format_version > FORMAT_VERSION:
            raise IndexFormatError(
                f"index {folder} has format version {manifest.format_version}, newer than this "
                f"version of retrieval understands ({FORMAT_VERSION}); upgrade retrieval")
        return manifest

    def write(self, folder: Path) -> None:
        """Atomically replace manifest.json."""
        with replacing(folder / MANIFEST_NAME) as temporary:
            data = {**asdict(self), "vectors": {m: s.to_json() for m, s in self.vectors.items()}}
            temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
