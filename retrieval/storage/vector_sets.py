"""The FAISS index of each modality, kept in step with SQLite: the one place that loads, rebuilds,
changes and saves them, and writes the manifest that says which SQLite generation each reflects.

Every committed change to a modality's vectors bumps its generation in SQLite. A FAISS index is
used only while it reflects the current generation; otherwise it is reloaded from its file, or
rebuilt from the vectors SQLite keeps. So a long-lived reader sees a build that ran beside it,
and a build killed half-way costs a rebuild, never a vector.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..core.concurrency import default_workers
from ..core.types import DISK_INDEX_TYPES, MODALITIES
from .manifest import FORMAT_VERSION, Manifest, VectorFileState
from .ondisk import OnDiskIndex, ShardRunner, build_on_disk
from .settings import Settings
from .store import Store, StoredVectors
from .vectors import VectorIndex, choose_index_type

# A modality's changes: item id -> its new vector, or None for an item removed.
Changes = Mapping[int, "np.ndarray | None"]


class VectorSets:
    """The index folder's FAISS indexes, one per modality, cached by the generation they reflect."""

    def __init__(self, folder: Path, store: Store, settings: Settings, readonly: bool) -> None:
        self.folder = folder
        self.store = store
        self.settings = settings
        self.readonly = readonly
        self.cached: dict[str, tuple[VectorIndex, int]] = {}  # modality -> (index, generation)

    def get(self, modality: str) -> VectorIndex:
        """The FAISS index of a modality, in step with SQLite: reloaded or rebuilt when stale.

        Checking the generation on every call is what lets a long-lived reader see a build
        that ran beside it.
        """
        return self.fresh(modality) or self.rebuild(modality)

    def fresh(self, modality: str) -> VectorIndex | None:
        """The cached or saved FAISS index if it reflects SQLite's current generation."""
        generation = self.store.generation(modality)
        cached = self.cached.get(modality)
        if cached is not None and cached[1] == generation:
            return cached[0]
        manifest = Manifest.read(self.folder)
        state = manifest.vectors.get(modality) if manifest else None
        if state is None or state.generation != generation:
            return None
        try:
            if state.index_type in DISK_INDEX_TYPES:
                vectors = OnDiskIndex.load(self.folder / state.file)
            else:
                vectors = VectorIndex.load(self.folder / state.file, mmap=self.readonly)
        except (RuntimeError, OSError):  # FAISS reports unreadable files this way
            return None
        if len(vectors) != state.count or len(vectors) != self.store.count(modality):
            return None
        self.cached[modality] = (vectors, generation)
        return vectors

    def count(self, modality: str) -> int:
        """How many vectors a modality holds: the cached index's size while it is current, else
        SQLite's count (which scans the modality's rows: milliseconds a search at 1M items)."""
        cached = self.cached.get(modality)
        if cached is not None and cached[1] == self.store.generation(modality):
            return len(cached[0])
        return self.store.count(modality)

    def index_type_for(self, count: int, modality: str = "image") -> str:
        """The FAISS index type a modality with `count` vectors should have now."""
        return choose_index_type(self.settings.index_type, count, self.settings.dim_of(modality),
                                 self.settings.memory_budget)

    def rebuild(self, modality: str, runner: ShardRunner | None = None) -> VectorIndex:
        """Rebuild from the vectors SQLite keeps; writers also save the result. An on-disk
        index fills its shards with `runner` (default: local processes)."""
        # Generation first: a commit landing in between makes the label older than the data,
        # which only costs another rebuild later; the reverse would hide vectors.
        generation = self.store.generation(modality)
        index_type = self.index_type_for(self.store.count(modality), modality)
        dim = self.settings.dim_of(modality)
        if index_type in DISK_INDEX_TYPES and not self.readonly:
            vectors = build_on_disk(StoredVectors(self.store.path, modality, dim),
                                    self.folder / f"{modality}-{generation}.ondisk", index_type,
                                    default_workers(), runner)
        else:  # a reader cannot write an on-disk index: it makes the in-memory one of its type
            ids, stored = self.store.all_vectors(modality)
            vectors = VectorIndex.build(DISK_INDEX_TYPES.get(index_type, index_type), dim or 1, ids, stored)
        self._keep(modality, vectors, generation)
        return vectors

    def rebuild_all(self) -> None:
        """Every modality rebuilt (as a new index type asks), and the manifest rewritten."""
        for modality in MODALITIES:
            self.rebuild(modality)
        self.write_manifest()

    def apply(self, changes: Mapping[str, Changes], base: Mapping[str, VectorIndex | None],
              runner: ShardRunner | None = None) -> None:
        """Bring each modality's FAISS index up to date with a writer's `changes`, made since
        `base` (the indexes fresh when it began; None where there was none): changed in place
        and saved, or rebuilt where that cannot be done; then the manifest."""
        for modality in MODALITIES:
            modality_changes, vectors = changes.get(modality, {}), base.get(modality)
            if self._needs_rebuild(vectors, modality_changes, modality):
                self.rebuild(modality, runner)
            elif modality_changes:
                if vectors.can_remove:
                    vectors.remove(np.fromiter(modality_changes, dtype=np.int64,
                                               count=len(modality_changes)))
                added = [(i, v) for i, v in modality_changes.items() if v is not None]
                if added:
                    vectors.add(np.array([i for i, _ in added], dtype=np.int64),
                                np.stack([v for _, v in added]))
                self._keep(modality, vectors, self.store.generation(modality))
        self.write_manifest()

    def _needs_rebuild(self, vectors: VectorIndex | None, changes: Changes, modality: str) -> bool:
        """Stale, of another size or type than the index should now have, or unable to remove."""
        if vectors is None or vectors.dim != self.settings.dim_of(modality):
            return True
        if vectors.index_type != self.index_type_for(self.store.count(modality), modality):
            return True
        if not changes:
            return False
        if not vectors.can_add:  # an on-disk index is rebuilt in shards, as it was built
            return True
        if vectors.can_remove:
            return False
        held = set(vectors.ids().tolist())  # a graph can take new ids, not drop or replace one
        return any(v is None or i in held for i, v in changes.items())

    def repair(self) -> None:
        """Record a vector size left out, rebuild FAISS files that disagree with SQLite, and
        rewrite a missing or damaged manifest."""
        if self.settings.dim_unrecorded:
            with self.store.conn:
                self.store.set_info("dim", str(self.settings.dim))
        for modality in MODALITIES:
            if self.settings.dim_of(modality):
                self.get(modality)
        self.write_manifest()

    def _keep(self, modality: str, vectors: VectorIndex, generation: int) -> None:
        """Cache a FAISS index as reflecting `generation`, and save it when writing."""
        self.cached[modality] = (vectors, generation)
        if not self.readonly and self.settings.dim_of(modality):
            self._save(modality, vectors, generation)

    def _save(self, modality: str, vectors: VectorIndex, generation: int) -> None:
        """Save (an on-disk index is already in place), point the manifest at it, then delete
        the modality's other files: older on-disk folders, or the in-memory type's file after a
        conversion to disk. Readers that map them keep them until they close."""
        name = vectors.folder.name if isinstance(vectors, OnDiskIndex) else f"{modality}.faiss"
        vectors.save(self.folder / name)
        manifest = self.manifest()
        manifest.vectors[modality] = VectorFileState(name, len(vectors), generation, vectors.index_type)
        manifest.write(self.folder)
        for old in [*self.folder.glob(f"{modality}-*.ondisk*"), self.folder / f"{modality}.faiss"]:
            if old.name != name:
                if old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)

    def manifest(self) -> Manifest:
        """The manifest as it should read now: what SQLite says, and the vector files as saved."""
        manifest = Manifest.read(self.folder) or Manifest(FORMAT_VERSION, {}, self.settings.dim)
        name, pretrained = self.settings.model or ("", None)
        manifest.model = {"name": name, "pretrained": pretrained}
        manifest.dim = self.settings.dim
        manifest.counts = {m: self.store.count(m) for m in MODALITIES}
        manifest.index_type = self.settings.index_type
        return manifest

    def write_manifest(self) -> None:
        self.manifest().write(self.folder)
