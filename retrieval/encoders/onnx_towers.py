"""Torch-free queries: a model's image and text towers in ONNX, run by ONNX Runtime.

Importing torch and open_clip and loading a model costs seconds and a gigabyte or two before
a single query is encoded. A build exports the towers of the index's model (`onnx_export`)
into `INDEX/onnx/`: `image.onnx`, `text.onnx`, their weights in `*.onnx.data`, and
`towers.json` naming the model and how to feed each tower. A query process then needs only
ONNX Runtime, numpy and PIL: images are preprocessed as open_clip preprocesses them for the
model (resize, centre crop or pad, normalise), texts tokenised by `ClipTokenizer`.
Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .tokenizer import ClipTokenizer

FORMAT = 2  # what an export writes. 2: plain ViT image towers have an 8-bit twin too
# Formats a reader uses: an index whose towers are of format 1 answers queries as before (no
# image twin); its next build exports the towers of this format (`cached_key`).
READABLE_FORMATS = (1, 2)
TOWERS_DIR = "onnx"  # inside an index folder, and inside the export cache
MANIFEST = "towers.json"
SOURCES_DIR = "sources"  # in the cache: weights fingerprint -> cache key, for torch-free lookups
IMAGE_FILE = "image.onnx"
TEXT_FILE = "text.onnx"
# The text tower with 8-bit weights (dynamic quantisation of every product by a weight matrix,
# per output channel: written with the graph by `onnx_graphs`, else by ONNX Runtime's
# quantiser, which also takes the token embedding): a warm query reads 4x fewer weight bytes.
# Measured for ViT-B-32 (random weights, one thread, CPU time, busy 2-core machine): 7.1 ms
# a query against 15.0 ms; its vectors against the fp32 tower's on the 5,000 Flickr8k test
# captions: cosine 0.9988 at worst; text-to-image top-10 overlap on the 1,000 photos 0.94.
# Under the 0.95 asked for a default, so it is an option (`int8`), never the default. Weight-
# only quantisation in blocks of 32 (MatMulNBits) agreed better (0.973) but ran slower: a warm
# encode of one caption took 9.2 ms against 6.2 ms for this twin and 12.4 ms for fp32 (thread
# per core, interleaved; 11.9 / 7.5 / 20.1 ms on one thread).
INT8_TEXT_FILE = "text.int8.onnx"
# The image tower's twin, made the same way where `onnx_graphs` writes the tower (open_clip's
# plain ViT; ONNX Runtime's quantiser is not run on image towers, which it would hold several
# times over): an `int8` build encodes with it. ViT-B-32, batch 32, random weights, 2 cores:
# 57-60 images/s against 19.5-20.5 for the fp32 tower; least cosine to its vectors 0.99985.
INT8_IMAGE_FILE = "image.int8.onnx"
# A staging folder (`staging_folder`: ".<cache key or TOWERS_DIR>.<random>", and swap_in's
# ".<name>.old.<random>") in which nothing changed for this long was left by a killed process:
# an export writes its files within minutes.
STALE_AFTER = 3600  # seconds
_CACHE_KEY = "[0-9a-f]{32}"  # a folder of the cache (onnx_export.cache_key)
_STAGING_NAME = re.compile(rf"^\.({_CACHE_KEY}|{TOWERS_DIR})\.")
BATCH = 32  # texts or images per ONNX Runtime call
# Threads for a one-shot process's text tower (a `quick` session: `retrieve "..."`). Its one
# query's few tokens are little work: measured for ViT-B-32 on a shared 2-core machine, one
# thread took 15 ms a query against 42 ms for two when the machine was busy. Long-lived
# processes (a build's batches of captions, `Index.search` in a program, the server) run the
# text tower on one thread per core, threads that do not spin between operators waiting for
# more work (ONNX Runtime's default is to spin): on a quiet 2-core machine a warm query took
# 11.4 ms against 18.5 ms on one thread; spinning threads took twice the CPU of the others on
# a busy one (74 ms against 50 ms a query), and in a build they take the decode threads'
# time. The image tower, 4 GFLOPs a picture, runs on ONNX Runtime's own count.
TEXT_THREADS = 1

log = logging.getLogger(__name__)


# -- preprocessing ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Preprocess:
    """open_clip's inference preprocessing of one model, with PIL and numpy.

    The same PIL resize open_clip's transforms call, the same centre crop (or pad, for
    `longest`), then scaling to [0, 1] and normalising in float32, as torchvision does.
    """

    size: tuple[int, int]  # (height, width) the tower takes in
    resize_mode: str  # "shortest", "longest" or "squash"
    interpolation: str  # "bicubic" or "bilinear"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fill: int = 0  # padding value for `longest`

    @classmethod
    def from_config(cls, config: dict) -> Preprocess:
        """From a model's `visual.preprocess_cfg`; ValueError for settings not reproduced here."""
        size = config.get("size", 224)
        size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        resize_mode = config.get("resize_mode") or "shortest"
        interpolation = config.get("interpolation") or "bicubic"
        if resize_mode not in ("shortest", "longest", "squash") or len(size) != 2:
            raise ValueError(f"resize mode {resize_mode!r}, size {size}")
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation {interpolation!r}")
        mean, std = config.get("mean"), config.get("std")
        if mean is None or std is None:
            raise ValueError("no mean or std")
        mean = tuple(float(m) for m in mean) if isinstance(mean, (list, tuple)) else (float(mean),) * 3
        std = tuple(float(s) for s in std) if isinstance(std, (list, tuple)) else (float(std),) * 3
        return cls(size, resize_mode, interpolation, mean, std, int(config.get("fill_color") or 0))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """One image as the tower's input, (3, height, width) float32."""
        height, width = self.size
        resized = self._resize(image)
        if self.resize_mode != "squash":  # squash resizes to the exact size
            fill = self.fill if self.resize_mode == "longest" else 0
            pixels = _centre_crop_or_pad(np.asarray(resized.convert("RGB")), height, width, fill)
        else:
            pixels = np.asarray(resized.convert("RGB"))
        scaled = pixels.astype(np.float32) / np.float32(255)
        normalised = (scaled - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return np.ascontiguousarray(normalised.transpose(2, 0, 1))

    def _resize(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        target_height, target_width = self.size
        if self.resize_mode == "squash":
            new_height, new_width = target_height, target_width
        elif self.resize_mode == "shortest" and target_height == target_width:
            # torchvision's Resize(int): the short side to the size, the long one truncated
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = target_height, int(target_height * long / short)
            new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        else:  # open_clip's ResizeKeepRatio: by the shorter ratio, or the longer for `longest`
            longest = 1.0 if self.resize_mode == "longest" else 0.0
            ratio_h, ratio_w = height / target_height, width / target_width
            ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
            new_height, new_width = round(height * 1.0 / ratio), round(width * 1.0 / ratio)
        if (new_height, new_width) == (height, width):
            return image
        method = Image.Resampling.BICUBIC if self.interpolation == "bicubic" else Image.Resampling.BILINEAR
        return image.resize((new_width, new_height), method)


def _centre_crop_or_pad(pixels: np.ndarray, height: int, width: int, fill: int) -> np.ndarray:
    """torchvision's center_crop: pad (left/top getting the smaller half) where the image is
    smaller than the crop, then cut the centre, offsets rounded half to even."""
    image_height, image_width = pixels.shape[:2]
    if height > image_height or width > image_width:
        pad_h, pad_w = max(height - image_height, 0), max(width - image_width, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)),
                        constant_values=fill)
        image_height, image_width = pixels.shape[:2]
    top = int(round((image_height - height) / 2.0))
    left = int(round((image_width - width) / 2.0))
    return pixels[top:top + height, left:left + width]


# -- query encoders ---------------------------------------------------------------------------

class OnnxImageEncoder:
    """The image half of a ClipEncoder (`encode_images`, `dim`), run by ONNX Runtime.

    Its session may still be opening on another thread (`open_in_background`): `preprocess`,
    `input_side` and `dim` serve at once, the first encode waits for it."""

    def __init__(self, session, preprocess: Preprocess, dim: int) -> None:
        self._session = session  # an InferenceSession, or a Future of one (None: failed)
        self.preprocess = preprocess
        self.dim = dim

    @property
    def session(self):
        """The ONNX Runtime session, waited for if it is still opening."""
        if isinstance(self._session, Future):
            self._session = self._session.result()
        return self._session

    def ready(self) -> bool:
        """Whether its session opened (waiting for it if need be); False: the file is damaged."""
        return self.session is not None

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised float32 vectors, one per RGB image."""
        chunks = [self.encode_pixels(np.stack([self.preprocess(i) for i in images[start:start + BATCH]]))
                  for start in range(0, len(images), BATCH)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    @property
    def input_side(self) -> int:
        """The shorter side, in pixels, of what the tower takes in."""
        return min(self.preprocess.size)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embed a batch of preprocessed images (N, 3, H, W)."""
        return normalised(self.session.run(None, {"pixels": pixels})[0])

    def encode_preprocessed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Embed images each made by `preprocess`, as one batch."""
        return self.encode_pixels(np.stack(images))


class OnnxTextEncoder:
    """The text half of a ClipEncoder (`encode_texts`, `dim`), run by ONNX Runtime."""

    def __init__(self, session, context_length: int, trim: bool, dim: int) -> None:
        self.session = session
        self.tokenizer = ClipTokenizer(context_length=context_length)
        self.trim = trim  # the tower takes any length: padding after the longest text is cut
        self.dim = dim

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one per text."""
        chunks = [self.encode_tokens(self.tokenizer(list(texts[start:start + BATCH])))
                  for start in range(0, len(texts), BATCH)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Embed token ids (N, context length), trimmed first where the tower allows."""
        if self.trim:
            tokens = tokens[:, :int(np.flatnonzero(tokens.any(axis=0)).max()) + 1]
        return normalised(self.session.run(None, {"tokens": tokens})[0])


def normalised(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, float32, as torch's `normalize` does."""
    features = features.astype(np.float32, copy=False)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def load_image_tower(folder: Path, model_identity: str, quick: bool = False,
                     for_build: bool = False, int8: bool = False) -> OnnxImageEncoder | None:
    """The exported image tower of this model in index folder `folder`, or None; `quick`
    as `open_session` says; a build's threads do not spin (see TEXT_THREADS). With `int8`,
    its 8-bit twin (INT8_IMAGE_FILE) where the export made one, else the fp32 tower.

    A build's session opens on a thread of its own (a second of pre-packing for ViT-B-32,
    which ONNX Runtime does without holding the GIL) while the build hashes and decodes the
    first batches; the tower's `ready` says whether it opened."""
    entry = _tower_entry(folder, model_identity, "image")
    if entry is None or (for_build and not _runtime_available()):
        return None
    twin = int8 and entry.get("int8_file")
    path = folder / TOWERS_DIR / (twin or entry["file"])
    if for_build:
        session = open_in_background(path, spinning=False)
    else:  # a twin always pre-packed, as in load_text_tower
        session = open_session(path, 0, quick and not twin)
        if session is None:
            return None
    return OnnxImageEncoder(session, Preprocess(**_tuples(entry["preprocess"])), entry["dim"])


def open_in_background(path: Path, threads: int = 0, spinning: bool = True) -> Future:
    """`open_session` on a daemon thread of its own: the Future of its session (or None)."""
    future: Future = Future()

    def opening() -> None:
        try:
            future.set_result(open_session(path, threads, spinning=spinning))
        except BaseException as error:  # open_session catches the runtime's own; this is a bug
            future.set_exception(error)

    threading.Thread(target=opening, name="onnx-session", daemon=True).start()
    return future


def _runtime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None


def load_text_tower(folder: Path, model_identity: str, quick: bool = False,
                    for_build: bool = False, int8: bool = False) -> OnnxTextEncoder | None:
    """The exported text tower of this model in index folder `folder`, or None; `quick` as
    `open_session` says; with `int8`, its 8-bit twin (INT8_TEXT_FILE) where the export made
    one, else the fp32 tower. A `quick` session (one query, then exit) runs on TEXT_THREADS,
    any other (a build's, a long-lived process's) on one non-spinning thread per core (see
    TEXT_THREADS)."""
    entry = _tower_entry(folder, model_identity, "text")
    threads = TEXT_THREADS if quick and not for_build else 0
    twin = int8 and entry and entry.get("int8_file")
    file = entry and (twin or entry["file"])
    # The twin's integer kernels want their weights pre-packed: a `quick` session of it opened
    # no faster and ran a query in 12.7 ms against 5.9 ms (ViT-B-32, one thread).
    session = entry and open_session(folder / TOWERS_DIR / file, threads, quick and not twin, spinning=False)
    if session is None:
        return None
    return OnnxTextEncoder(session, entry["context_length"], entry["trim"], entry["dim"])


def _tower_entry(folder: Path, model_identity: str, tower: str) -> dict | None:
    manifest = read_manifest(folder / TOWERS_DIR)
    if manifest is None or manifest.get("model") != model_identity:
        return None
    return manifest.get(tower)


def read_manifest(towers: Path) -> dict | None:
    """`towers.json` of a towers folder, or None when missing, damaged or of another format."""
    try:
        manifest = json.loads((towers / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") in READABLE_FORMATS else None


def open_session(path: Path, threads: int = 0, quick: bool = False, spinning: bool = True):
    """An ONNX Runtime session for the tower in `path` on `threads` threads (0: one per core),
    or None (ONNX Runtime missing, file damaged).

    A `quick` session does not pre-pack its weights: it maps them and is ready at once, but
    runs slower. Measured for ViT-B-32 (CPU time, one thread, busy machine): making the text
    session 0.04 s against 0.24 s, the image session 0.08 s against 0.5 s; a warm text query
    36 ms against 16 ms. A process that answers one query and exits wants it, a server not.
    The two kinds' vectors differ in the 7th decimal, so one process keeps to one kind.
    """
    try:
        import onnxruntime
    except ImportError:
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: its warnings are not the user's business
    if quick:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception:  # onnxruntime raises its own kinds for a damaged or foreign file
        return None


def torch_may_use_an_accelerator(device: str) -> bool:
    """Whether torch, on `device`, might run on something faster than the CPU; answered
    without importing torch (half a second): for `auto`, a torch built with CUDA on a machine
    with an NVIDIA driver, or a Mac."""
    if device != "auto":
        return device != "cpu"
    if sys.platform == "darwin":
        return True  # MPS
    found = importlib.util.find_spec("torch")
    folders = found.submodule_search_locations if found is not None else None
    if not folders or not Path("/dev/nvidiactl").exists():
        return False
    return any(any(Path(folder, "lib").glob("libtorch_cuda*")) for folder in folders)


def _tuples(config: dict) -> dict:
    """JSON's lists back into the tuples `Preprocess` holds."""
    return {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()}


# -- the export cache -------------------------------------------------------------------------

def cache_root() -> Path:
    """Where each model's exported towers are kept, one folder per `cache_key`."""
    root = os.environ.get("RETRIEVAL_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieval"
    return Path(root) / TOWERS_DIR


def cached_key(fingerprint: str | None) -> str | None:
    """The cache key of towers exported from the weights `weights_fingerprint` describes, when
    the cache holds them in the current FORMAT: found without loading the model (or importing
    torch)."""
    key = _remembered_key(fingerprint)
    manifest = key and read_manifest(cache_root() / key)
    return key if manifest and manifest["format"] == FORMAT else None


def _remembered_key(fingerprint: str | None) -> str | None:
    if fingerprint is None:
        return None
    try:
        return (cache_root() / SOURCES_DIR / _hashed(fingerprint)).read_text().strip()
    except OSError:
        return None


def remember_source(fingerprint: str | None, key: str) -> None:
    """Note that the weights `fingerprint` describes export to the towers cached under `key`.
    Towers cached for them before (an older FORMAT: its key differs) are removed: indexes hold
    links or copies of their own, and 0.7 GB (ViT-B-32) would otherwise stay for good."""
    if fingerprint is None:
        return
    folder = cache_root() / SOURCES_DIR
    superseded = _remembered_key(fingerprint)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{_hashed(fingerprint)}.{os.getpid()}"
        staging.write_text(key)
        os.replace(staging, folder / _hashed(fingerprint))
    except OSError:  # no cache to write: the next build loads the model to find its towers
        return
    if superseded and superseded != key and re.fullmatch(_CACHE_KEY, superseded):
        shutil.rmtree(cache_root() / superseded, ignore_errors=True)


def install_cached(key: str, folder: Path) -> bool:
    """Give index folder `folder` the cached towers `key`, unless it has them; False when the
    disk would not take them."""
    present = read_manifest(folder / TOWERS_DIR)
    if present is not None and present.get("key") == key and present["format"] == FORMAT:
        return True
    try:
        install(cache_root() / key, folder / TOWERS_DIR)
    except OSError:
        return False
    warn_skipped(folder / TOWERS_DIR)
    return True


def export_in_child(name: str, pretrained: str | None, fingerprint: str | None) -> None:
    """Export a model's towers into the cache, found again by the weights' `fingerprint`, in two
    processes of their own: one with torch and the model writes the graphs (`onnx_export`), one
    without checks them and makes the 8-bit twin (`onnx_checks`). So this process never holds
    torch, and neither child holds the model beside the towers' sessions (ViT-B-32's export
    peaked at 2.6 GB in one process; 0.86 GB now). Whatever goes wrong
    there, the caller finds no towers and loads the model itself, which reports any real cause."""
    written = _run_child("onnx_export", name, pretrained or "")
    try:
        outcome = json.loads(written.stdout.strip().splitlines()[-1])
        key, staging = outcome["key"], outcome["staging"]
    except (ValueError, IndexError, KeyError, TypeError):
        return
    if staging is not None:
        _run_child("onnx_checks", staging, str(cache_root() / key))
    if read_manifest(cache_root() / key) is not None:
        remember_source(fingerprint, key)


def _run_child(module: str, *arguments: str) -> subprocess.CompletedProcess:
    """`python -m` this package's `module`, its output (stdout) captured, its complaints dropped."""
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this code
    path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", f"{__package__}.{module}", *arguments], check=False,
                          env={**os.environ, "PYTHONPATH": path}, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def warn_skipped(towers: Path) -> None:
    """One line for each tower that the folder `towers` lacks because it did not export."""
    manifest = read_manifest(towers) or {}
    for tower, reason in manifest.get("skipped", {}).items():
        log.warning(f"{tower} queries of {manifest.get('model')} will load the model: its "
                    f"{tower} tower was not exported to ONNX ({reason})")


def _hashed(fingerprint: str) -> str:
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:32]


def install(source: Path, target: Path) -> None:
    """Replace folder `target` with hard links to (or copies of) the files of `source`."""
    staging = staging_folder(target)
    try:
        for path in source.iterdir():
            try:
                os.link(path, staging / path.name)
            except OSError:  # another file system, or no links allowed there
                shutil.copy2(path, staging / path.name)
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def staging_folder(target: Path) -> Path:
    """An empty folder beside `target`, as readable as the index it will serve. Such folders
    left beside it by a process killed meanwhile (ViT-B-32's export: 0.6 GB) are removed once
    nothing in them has changed for STALE_AFTER seconds."""
    _remove_stale_staging(target.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o755)
    return staging


def _remove_stale_staging(parent: Path) -> None:
    cutoff = time.time() - STALE_AFTER
    try:
        leftovers = [path for path in parent.iterdir() if _STAGING_NAME.match(path.name) and path.is_dir()]
        for path in leftovers:
            if max(entry.stat().st_mtime for entry in (path, *path.iterdir())) < cutoff:
                shutil.rmtree(path, ignore_errors=True)
    except OSError:  # gone meanwhile (another process swept it), or unreadable: left as it is
        pass


def swap_in(staging: Path, target: Path) -> None:
    """Rename a finished folder into place: a reader sees the old towers or the new ones."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
