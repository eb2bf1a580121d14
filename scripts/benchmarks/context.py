"""What every section is handed: the options, a scratch folder, and the model, encoder and
photo corpus that the run prepared once for all sections needing them."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .data import Corpus
from .engine import ClipEncoder, Index, ModelSpec
from .measure import REPO
from .weights import write_random_model


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    spec: ModelSpec | None = None
    encoder: ClipEncoder | None = None
    corpus: Corpus | None = None

    def open_index(self, folder: Path) -> Index:
        """A new index at `folder` with the run's model and encoding options."""
        return Index.open(folder, model=self.spec.name, pretrained=self.spec.pretrained, create=True,
                          device=self.args.device, batch_size=self.args.batch_size, int8=self.args.int8)

    def open_loaded_index(self, name: str) -> Index:
        """A new index `name` in the scratch folder, its model already loaded, so that the
        section's timings leave the load out."""
        index = self.open_index(self.workdir / name)
        try:
            index.encoder  # noqa: B018 - loads the model
        except BaseException:
            index.close()
            raise
        return index


def model_args(spec: ModelSpec) -> list[str]:
    """The CLI options naming `spec`."""
    return ["--model", spec.name] + (["--pretrained", spec.pretrained] if spec.pretrained else [])


def prepare_model(args: argparse.Namespace, workdir: Path) -> tuple[ModelSpec, str]:
    """The model to benchmark and a description of it."""
    if args.model:
        return ModelSpec.parse(args.model, args.pretrained), args.model
    if args.tiny:
        return tiny_model(workdir / "tiny-model", args.seed), \
            f"tiny open_clip test model, random weights (seed {args.seed})"
    spec = write_random_model("ViT-B-32", workdir / "vit-b-32", args.seed)
    return ModelSpec.parse(spec), f"ViT-B-32, random weights (seed {args.seed})"


def tiny_model(folder: Path, seed: int) -> ModelSpec:
    """The test suite's tiny open_clip model, written to `folder` with seeded random weights."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.tiny_model import write_local_dir_model

    return ModelSpec.parse(write_local_dir_model(folder, seed=seed))
