"""Check freshly exported ONNX towers and their 8-bit twins against open_clip's own vectors (making
the text tower's twin where torch exported it), and put the towers in place: the half of an
export that needs no torch.

`onnx_export` writes the graphs into a staging folder with open_clip's vectors for the probes
(REFERENCES) and a draft of the manifest (DRAFT); `finish_export` checks each tower there with
ONNX Runtime, leaves out one that differs (with its reason in the manifest), and renames the
folder into place. A model's first build runs the two halves in two processes (see
`onnx_towers.export_in_child`), so the one that holds torch and the model never also holds the
towers' ONNX Runtime sessions: ViT-B-32's export peaked at 2.6 GB when one process did both;
now its torch half peaks at 0.86 GB (its graphs written by `onnx_graphs`), this half at 0.44 GB.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from .onnx_towers import (
    INT8_IMAGE_FILE,
    INT8_TEXT_FILE,
    MANIFEST,
    OnnxImageEncoder,
    OnnxTextEncoder,
    Preprocess,
    open_session,
    read_manifest,
    swap_in,
)

TOLERANCE = 1e-4  # the largest difference from open_clip's normalised vectors a tower may show
INT8_AGREEMENT = 0.99  # the least cosine to open_clip's vectors an 8-bit twin may show
PROBE_TEXTS = ["a dog in the park", "x", "", "two cats asleep on a red sofa by the window",
               "ünïcödé 猫 &amp; emoji 😀", "word " * 100]
REFERENCES = "references.npz"  # open_clip's vectors for the probes, in a staging folder
DRAFT = "draft.json"  # the manifest before the checks, in a staging folder


class NotExported(Exception):
    """Why a tower was left out; the message is the reason shown to the user."""


def probe_images(size: tuple[int, int]) -> list[Image.Image]:
    """Images around the tower's input size: larger and smaller, landscape, portrait and
    square, odd sides (rounding), so that every branch of the preprocessing runs."""
    height, width = size
    shapes = [(height, width), (2 * height + 1, int(1.5 * width) + 3), (height // 2 + 3, width + 5),
              (int(1.3 * height) + 1, width // 3 + 2), (height // 3 + 1, width // 2 + 1)]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)) for h, w in shapes]


def write_draft(staging: Path, manifest: dict, references: dict[str, np.ndarray]) -> None:
    """What the torch half leaves for `finish_export`: the manifest so far, with a tower entry
    for each graph written, and open_clip's vectors for the probes, by tower."""
    np.savez(staging / REFERENCES, **references)
    (staging / DRAFT).write_text(json.dumps(manifest))


def leave_out(manifest: dict, staging: Path, tower: str, reason: NotExported) -> None:
    """Drop `tower` from the `manifest` being made in `staging`, naming why, and its files."""
    manifest[tower] = None
    manifest["skipped"][tower] = str(reason)
    for path in staging.glob(f"{tower}.*onnx*"):  # its graph, its twin, their weights
        path.unlink()


def finish_export(staging: Path, target: Path) -> None:
    """Check the towers drafted in `staging` (see `write_draft`) and their 8-bit twins, write
    the manifest, and rename the folder to `target`. A tower that fails its check
    is removed and named, with the reason, under the manifest's "skipped"."""
    try:
        manifest = json.loads((staging / DRAFT).read_text())
        with np.load(staging / REFERENCES) as stored:
            references = {name: stored[name] for name in stored.files}
        for tower, check in (("image", _check_image), ("text", _check_text)):
            if manifest[tower] is None:
                continue
            try:
                check(staging, manifest[tower], references[tower])
            except NotExported as reason:
                leave_out(manifest, staging, tower, reason)
        (staging / DRAFT).unlink()
        (staging / REFERENCES).unlink()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        for path in staging.iterdir():
            os.chmod(path, 0o644)  # as readable as the index it serves
        existing = read_manifest(target)
        if existing is not None and existing.get("key") == manifest["key"]:
            # another process exported the same meanwhile: keep its files, which an index
            # may be linking right now
            shutil.rmtree(staging)
        else:
            swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_image(staging: Path, entry: dict, expected: np.ndarray) -> None:
    preprocess = Preprocess.from_config(entry["preprocess"])
    probes = probe_images(preprocess.size)
    tower = OnnxImageEncoder(_session_or_fail(staging / entry["file"]), preprocess, entry["dim"])
    with _running_export():
        _check((expected, tower.encode_images(probes)), (expected[:1], tower.encode_images(probes[:1])))
    del tower
    entry["int8_file"] = _kept_twin(
        staging / INT8_IMAGE_FILE, expected,
        lambda session: OnnxImageEncoder(session, preprocess, entry["dim"]).encode_images(probes))


def _check_text(staging: Path, entry: dict, expected: np.ndarray) -> None:
    tower = OnnxTextEncoder(_session_or_fail(staging / entry["file"]), entry["context_length"],
                            entry["trim"], entry["dim"])
    with _running_export():
        batched = tower.encode_texts(PROBE_TEXTS)
        one_by_one = np.concatenate([tower.encode_texts([text]) for text in PROBE_TEXTS])
    _check((expected, batched), (expected, one_by_one))
    del tower
    twin = staging / INT8_TEXT_FILE
    if not twin.exists():  # a tower torch exported: ONNX Runtime's quantiser makes its twin
        _quantised(staging / entry["file"], twin)
    entry["int8_file"] = _kept_twin(
        twin, expected, lambda session: OnnxTextEncoder(
            session, entry["context_length"], entry["trim"], entry["dim"]).encode_texts(PROBE_TEXTS))


def _kept_twin(path: Path, expected: np.ndarray, encode: Callable[[object], np.ndarray]) -> str | None:
    """The name of the 8-bit twin at `path` (INT8_TEXT_FILE, INT8_IMAGE_FILE), kept when the
    vectors `encode` makes of the probes with a session of it agree with open_clip's `expected`
    ones; else None (no twin, or its files removed), and `int8` encoding uses the fp32 tower."""
    if not path.exists():
        return None
    session = open_session(path)  # pre-packed, as queries and builds open it (see load_text_tower)
    try:
        got = None if session is None else encode(session)
    except Exception:  # ONNX Runtime raises its own kinds for a graph it cannot run
        got = None
    if got is None or not (got * expected).sum(axis=1).min() >= INT8_AGREEMENT:  # also catches NaN
        for leftover in path.parent.glob(f"{path.name}*"):
            leftover.unlink()
        return None
    return path.name


def _quantised(source: Path, path: Path) -> bool:
    """Whether ONNX Runtime's dynamic quantiser wrote the 8-bit twin of graph `source` to `path`."""
    try:
        with _root_logger_kept():
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(source), str(path), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul", "Gemm", "Gather"], use_external_data_format=True)
    except ImportError:
        return False
    except OSError:
        raise
    except Exception:  # the quantiser raises many kinds for graphs it does not handle
        return False
    return True


@contextmanager
def _root_logger_kept() -> Iterator[None]:
    """ONNX Runtime's quantisers log advice for their developers to the root logger, and one of
    them configures it when imported (`basicConfig` at INFO): meanwhile the root logger passes
    errors only, and it is left as it was."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    root.addHandler(logging.NullHandler())  # so that basicConfig finds it configured
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _session_or_fail(path: Path):
    # A quick session: a pre-packed copy of the weights beside the model's own would add
    # hundreds of MB to the export's peak (the tests check both kinds).
    session = open_session(path, quick=True)
    if session is None:
        raise NotExported("ONNX Runtime cannot load the export (is onnxruntime installed?)")
    return session


@contextmanager
def _running_export() -> Iterator[None]:
    """An export that ONNX Runtime fails to run on the probes is as wrong as one that differs."""
    try:
        yield
    except (OSError, NotExported):
        raise
    except Exception as error:
        raise NotExported(f"ONNX Runtime cannot run the export: {first_line(error)}") from None


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line, for a one-line reason."""
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def _check(*pairs: tuple[np.ndarray, np.ndarray]) -> None:
    """The tower's vectors against open_clip's, as (expected, got) pairs."""
    difference = max(float(np.abs(got - expected).max()) for expected, got in pairs)
    if not difference <= TOLERANCE:  # also catches NaN
        raise NotExported(f"its ONNX vectors differ from open_clip's by {difference:.1e}")


if __name__ == "__main__":  # export_in_child's second process: python -m ... STAGING TARGET
    finish_export(Path(sys.argv[1]), Path(sys.argv[2]))
