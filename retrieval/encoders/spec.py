"""Model identity: which open_clip model an index uses, and whether its weights can be had,
without importing torch."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..core.errors import ModelLoadError, UsageError
from ..core.imports import without_module

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
CLAP_PREFIX = "clap:"  # an audio model from LAION-CLAP, as `clap:NAME` or `clap:/folder`
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass(frozen=True)
class Preset:
    """A model name users can remember, standing for one open_clip model and pretrained tag."""

    model: str
    pretrained: str
    why: str


# Chosen from `scripts/benchmark.py --models` (README: Choosing a model): images/s on a CPU
# against published retrieval R@1. An index records the model and tag, never the preset, so a
# preset pointing elsewhere later leaves existing indexes as they are.
MODEL_PRESETS: dict[str, Preset] = {
    "fast": Preset("ViT-B-32", "laion2b_s34b_b79k", "the fastest on a CPU; the default"),
    "balanced": Preset("MobileCLIP2-S0", "dfndr2b",
                       "higher retrieval quality than ViT-B-32 at 1.3-1.8 times its CPU time per image"),
    "best": Preset("MobileCLIP2-S4", "dfndr2b",
                   "the highest published retrieval quality of the candidates; slow on a CPU, for a GPU"),
}
DEFAULT_MODEL = MODEL_PRESETS["fast"].model
DEFAULT_PRETRAINED = MODEL_PRESETS["fast"].pretrained
HF_WEIGHTS_NAME = "open_clip_pytorch_model.bin"  # what open_clip asks a hub repo for ...
HF_SAFE_WEIGHTS_NAME = "open_clip_model.safetensors"  # ... after this twin


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load: an open_clip name (or `local-dir:`/`hf-hub:` reference, or a preset
    of MODEL_PRESETS) and weights.

    `pretrained` is a tag such as `laion2b_s34b_b79k` or a checkpoint file; `local-dir:` and
    `hf-hub:` models carry their own weights and take none.
    """

    name: str = DEFAULT_MODEL
    pretrained: str | None = DEFAULT_PRETRAINED

    @classmethod
    def parse(cls, name: str | None = None, pretrained: str | None = None,
              parameter_prefix: str = "") -> ModelSpec:
        """Normalise user input: local paths become absolute so the identity survives a `cd`.
        A `local-dir:` or `hf-hub:` model given weights too is refused (UsageError), not
        loaded without them; `parameter_prefix` names the parameters in that message
        ("caption_": `caption_model`, `caption_pretrained`)."""
        name = name or DEFAULT_MODEL
        if name in MODEL_PRESETS:  # `--pretrained` still picks other weights for its architecture
            preset = MODEL_PRESETS[name]
            name, pretrained = preset.model, pretrained or preset.pretrained
        if pretrained and name.startswith((LOCAL_DIR, HF_HUB)):
            kind = LOCAL_DIR if name.startswith(LOCAL_DIR) else HF_HUB
            raise UsageError(
                f"`{parameter_prefix}pretrained` cannot be combined with a {kind} model "
                f"(`{parameter_prefix}model` {name}), which carries its own weights: drop "
                f"`{parameter_prefix}pretrained`, or pass an open_clip model name with it")
        if name.startswith(LOCAL_DIR):
            path = Path(name[len(LOCAL_DIR):]).expanduser().resolve()
            return cls(f"{LOCAL_DIR}{path}", None)
        if name.startswith(HF_HUB):
            return cls(name, None)
        if pretrained is None and name == DEFAULT_MODEL:
            pretrained = DEFAULT_PRETRAINED
        if pretrained and looks_like_path(pretrained):
            pretrained = str(Path(pretrained).expanduser().resolve())
        return cls(name, pretrained or None)

    @property
    def identity(self) -> str:
        """A stable string an index records to refuse vectors from any other model."""
        return f"{self.name}@{self.pretrained}" if self.pretrained else self.name

    def __str__(self) -> str:
        return self.identity


# Device kinds this engine runs on, as torch spells them (`kind` or `kind:N`), and `auto`.
DEVICE_KINDS = ("cpu", "cuda", "mps", "xpu")
_DEVICE = re.compile(rf"({'|'.join(DEVICE_KINDS)})(:\d+)?")


def check_device(device: str) -> str:
    """`device` as given if it names a device (`auto`, `cpu`, `cuda`, `cuda:N`, `mps`, `xpu`
    ...), without importing torch: a query on the ONNX towers never loads torch to find a
    typo. Whether torch can use it here is `clip.resolve_device`'s to say."""
    if device != "auto" and not _DEVICE.fullmatch(device):
        raise UsageError(f"`device` {device!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return device


def looks_like_path(value: str) -> bool:
    """A `pretrained` value that names a checkpoint file rather than a tag."""
    return os.sep in value or value.endswith(WEIGHT_SUFFIXES) or Path(value).expanduser().exists()


# -- can the weights be had? -------------------------------------------------------------------
# Answered without importing torch (seconds, most of a GB), so that a model that cannot be
# loaded is refused at once, and without letting huggingface_hub retry a network that is not
# there (it retries each file for about 30 s).

HUB_PROBE_SECONDS = 1.5  # a connection to the hub that takes longer counts as none
OPEN_CLIP_CACHE = Path("~/.cache/clip")  # where open_clip keeps weights it downloads by URL
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}  # as huggingface_hub reads its variables


def check_weights_available(spec: ModelSpec, parameter_prefix: str = "") -> bool:
    """Raise a one-line ModelLoadError when the weights `spec` needs, or its Hugging Face
    tokenizer (SigLIP 2 models have one), can be had neither from disk nor from the Hugging Face
    Hub; catch what open_clip would only warn about (a local folder without weights gives a
    random model).

    Returns True when everything the model needs from the hub is in its cache: the load then
    need not, and should not, ask the hub anything. `parameter_prefix` names the options that
    supply this model in the errors: "caption_" makes them name `caption_model`.
    """
    weights_cached = _check_weights(spec, parameter_prefix)
    return _check_tokenizer(spec, parameter_prefix) and weights_cached


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # what transformers reads first


def _check_tokenizer(spec: ModelSpec, parameter_prefix: str = "") -> bool:
    """For a model whose texts are tokenised by a Hugging Face tokenizer: raise a one-line
    ModelLoadError when it is neither at hand nor to be downloaded. True when none is needed or
    it is in the cache."""
    if spec.name.startswith(HF_HUB):
        return True  # a hub repo carries its tokenizer beside its weights
    if spec.name.startswith(LOCAL_DIR):
        folder = Path(spec.name[len(LOCAL_DIR):])
        if _hf_tokenizer_name(json.loads((folder / "open_clip_config.json").read_text())) \
                and not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise ModelLoadError(
                f"model {spec.name} needs its Hugging Face tokenizer, and {folder} holds none "
                f"({' or '.join(TOKENIZER_FILES)}); copy the tokenizer's files into that folder")
        return True
    repo = _hf_tokenizer_name({"model_cfg": _open_clip_config(spec.name)})
    if not repo:
        return True
    return from_hub_cache(repo, [TOKENIZER_FILES], lambda cause: (
        f"model {spec.identity} needs the Hugging Face tokenizer {repo} ({cause}). Without internet, "
        f"supply it yourself: on a connected machine run `hf download {repo}` and copy "
        f"~/.cache/huggingface over, or pass `{parameter_prefix}model` local-dir:/folder holding "
        "open_clip_config.json, the weights and the tokenizer's files"))


def _hf_tokenizer_name(config: dict) -> str | None:
    return config.get("model_cfg", {}).get("text_cfg", {}).get("hf_tokenizer_name") or None


def _open_clip_config(name: str) -> dict:
    """An open_clip architecture's config, without importing open_clip when it is not yet."""
    if "open_clip" not in sys.modules:
        try:
            folder, _ = open_clip_pretrained_alone()
            return json.loads((folder / "model_configs" / f"{name}.json").read_text())
        except Exception:  # another open_clip layout: pay for the import instead
            pass
    import open_clip

    return open_clip.get_model_config(name) or {}


def _check_weights(spec: ModelSpec, parameter_prefix: str) -> bool:
    """The weights' part of `check_weights_available`."""
    def explain(cause: str) -> str:
        return cannot_load_message(spec, cause, parameter_prefix)

    if spec.name.startswith(LOCAL_DIR):
        _check_local_dir(spec)
        return False
    if spec.name.startswith(HF_HUB):
        return from_hub_cache(spec.name[len(HF_HUB):],
                              [("open_clip_config.json",), _weight_file_names(HF_WEIGHTS_NAME)],
                              explain)
    models, pretrained = _open_clip_tables()
    if spec.name.replace("/", "-") not in models:
        raise ModelLoadError(
            f"unknown {parameter_prefix.replace('_', ' ')}model {spec.name!r}; use an open_clip name "
            "(see open_clip.list_models()), local-dir:/path or hf-hub:org/repo")
    if not spec.pretrained:
        return False  # open_clip makes a model with random weights, as asked
    if looks_like_path(spec.pretrained):
        if not Path(spec.pretrained).is_file():
            raise ModelLoadError(
                f"model {spec.identity}: checkpoint file {spec.pretrained} not found; "
                f"pass `{parameter_prefix}pretrained` an existing checkpoint file or a known tag")
        return False
    tags = pretrained.list_pretrained_tags_by_model(spec.name)
    if spec.pretrained not in tags:
        raise ModelLoadError(
            f"model {spec.name}: unknown pretrained tag {spec.pretrained!r} (known tags: "
            f"{', '.join(tags) or 'none'}); or pass a checkpoint file as `{parameter_prefix}pretrained`")
    return _tag_available(spec, pretrained.get_pretrained_cfg(spec.name, spec.pretrained), explain)


def weights_fingerprint(spec: ModelSpec) -> str | None:
    """Where `spec`'s weights are, and each file's size and modification time, found without
    importing torch; None for random weights or weights not on disk yet.

    Equal fingerprints mean the same weights (a file changed in place changes its stat), so
    what was derived from them once (exported ONNX towers) can be reused without loading them.
    """
    if spec.name.startswith(LOCAL_DIR):
        folder = Path(spec.name[len(LOCAL_DIR):])
        files = sorted(p for p in folder.glob("*")
                       if p.suffix in WEIGHT_SUFFIXES or p.name == "open_clip_config.json")
    elif spec.name.startswith(HF_HUB):
        files = _hub_files(spec.name[len(HF_HUB):], ["open_clip_config.json",
                                                     *_weight_file_names(HF_WEIGHTS_NAME)])
    elif not spec.pretrained:
        return None
    elif looks_like_path(spec.pretrained):
        files = [Path(spec.pretrained)]
    else:
        try:
            config = _open_clip_tables()[1].get_pretrained_cfg(spec.name, spec.pretrained)
        except Exception:  # an unknown tag: the load reports it
            return None
        if config.get("file"):
            files = [Path(config["file"])]
        elif config.get("hf_hub"):
            repo, filename = os.path.split(config["hf_hub"])
            files = _hub_files(repo, list(_weight_file_names(filename or HF_WEIGHTS_NAME)))
        else:
            files = [OPEN_CLIP_CACHE.expanduser() / os.path.basename(config.get("url", ""))]
    stats = []
    for path in files:
        try:
            stat = path.resolve().stat()
        except OSError:
            continue
        stats.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    if not any(Path(entry.rsplit(":", 2)[0]).suffix in WEIGHT_SUFFIXES for entry in stats):
        return None
    return "\n".join([spec.identity, *stats])


def _hub_files(repo: str, names: list[str]) -> list[Path]:
    """The files of `repo` among `names` that the Hugging Face cache holds."""
    from huggingface_hub import try_to_load_from_cache

    found = []
    for name in names:
        try:
            path = try_to_load_from_cache(repo, name)
        except ValueError:  # not a valid repo id
            return []
        if isinstance(path, str):
            found.append(Path(path))
    return found


def _check_local_dir(spec: ModelSpec) -> None:
    folder = Path(spec.name[len(LOCAL_DIR):])
    if not (folder / "open_clip_config.json").is_file():
        raise ModelLoadError(
            f"model {spec.name}: no open_clip_config.json in {folder}; point local-dir: at a "
            "folder holding open_clip_config.json and its weights (e.g. a downloaded hf-hub repo)")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
        raise ModelLoadError(
            f"model {spec.name}: no weights file (*.safetensors, *.bin, *.pth) in {folder}; "
            "copy the model's weights into that folder")


def _tag_available(spec: ModelSpec, config: dict, explain: Callable[[str], str]) -> bool:
    """Where open_clip looks for a tag's weights: a file, a hub repo, or a URL (in that order
    of preference, the hub before the URL, as its `download_pretrained` does)."""
    if config.get("file"):
        return Path(config["file"]).is_file()
    if config.get("hf_hub"):
        repo, filename = os.path.split(config["hf_hub"])  # `org/name/`: the default file
        return from_hub_cache(repo, [_weight_file_names(filename or HF_WEIGHTS_NAME)], explain)
    url = config.get("url", "")
    if (OPEN_CLIP_CACHE.expanduser() / os.path.basename(url)).is_file():
        return True
    host = urllib.parse.urlsplit(url).hostname or url
    unreachable = _unreachable(host, 443)
    if unreachable:
        raise ModelLoadError(explain(f"not in {OPEN_CLIP_CACHE}, and {unreachable}"))
    return False


def _weight_file_names(filename: str) -> tuple[str, ...]:
    """The weight files open_clip asks a hub repo for: a safetensors twin first, as it does."""
    if filename == HF_WEIGHTS_NAME:
        return HF_SAFE_WEIGHTS_NAME, filename
    if filename.endswith((".bin", ".pth")):
        return filename[:-4] + ".safetensors", filename
    return (filename,)


def cannot_load_message(spec: ModelSpec, cause: str, parameter_prefix: str = "") -> str:
    """Why `spec`'s weights could not be loaded, and how to supply them, in one line; the
    parameters named are those `parameter_prefix` picks (`pretrained`, `caption_pretrained` ...)."""
    return (f"could not load weights for {parameter_prefix.replace('_', ' ')}model {spec.identity} "
            f"({cause}). Without internet, supply weights yourself: download them on a connected "
            "machine into the Hugging Face cache (~/.cache/huggingface), or pass "
            f"`{parameter_prefix}pretrained` /path/to/checkpoint, or "
            f"`{parameter_prefix}model` local-dir:/folder with open_clip_config.json and weights")


def one_line(error: BaseException) -> str:
    """An error's whole message on one line (libraries wrap causes over several)."""
    return " ".join(str(error).split()) or type(error).__name__


def from_hub_cache(repo: str, needed: Sequence[tuple[str, ...]],
                   explain: Callable[[str], str]) -> bool:
    """True when the Hugging Face cache holds a file of each group of alternatives in `needed`
    from `repo`; False when some must be downloaded and the hub can be reached. Otherwise a
    ModelLoadError, worded by `explain` from the cause."""
    from huggingface_hub import constants, try_to_load_from_cache

    def cached(name: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo, name), str)
        except ValueError:  # not a valid repo id: the load says so
            return False

    missing = [names[0] for names in needed if not any(cached(name) for name in names)]
    if not missing:
        return True
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelLoadError(explain(
            f"{repo}/{missing[0]} is not in the Hugging Face cache {constants.HF_HUB_CACHE}, "
            f"and {unreachable}"))
    return False


def hub_offline_requested() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was
    imported: it reads the variable once, at import."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(
        os.environ.get(name, "").upper() in _TRUE_VALUES
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached now (offline mode is set, or no connection
    to it, or to the proxy on the way, within HUB_PROBE_SECONDS), or None."""
    from huggingface_hub import constants

    if hub_offline_requested():
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return _unreachable(endpoint.hostname or constants.ENDPOINT, port)


def _unreachable(host: str, port: int) -> str | None:
    """Why a TCP connection to host:port (or to the proxy for it) fails, or None.

    Name resolution has no timeout of its own, so the attempt runs on a thread given
    HUB_PROBE_SECONDS; one that is still resolving then is left to finish in the background.
    """
    import urllib.request  # here: it imports http.client and email, 0.05 s of every cold query

    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port, what = parts.hostname or proxy, parts.port or 80, f"the proxy {proxy}"
    else:
        what = host
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_SECONDS).close()
            outcome.append(None)
        except OSError as error:
            outcome.append(error.strerror or str(error) or type(error).__name__)

    attempt = threading.Thread(target=connect, daemon=True)
    attempt.start()
    attempt.join(HUB_PROBE_SECONDS)
    if outcome and outcome[0] is None:
        return None
    return f"{what} cannot be reached ({outcome[0] if outcome else f'no answer in {HUB_PROBE_SECONDS:g} s'})"


@contextmanager
def hub_cache_only(enabled: bool = True) -> Iterator[None]:
    """Within the block, huggingface_hub serves files from its cache and asks the network
    nothing (it reads HF_HUB_OFFLINE once, at import; this sets what it read)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _open_clip_tables() -> tuple[set[str], ModuleType]:
    """open_clip's architecture names, and its module of pretrained tags and their sources.

    When open_clip is imported already, its own (with configs added at run time); otherwise
    read without importing it, since its package imports torch.
    """
    if "open_clip" not in sys.modules:
        try:
            folder, pretrained = open_clip_pretrained_alone()
            return {path.stem for path in (folder / "model_configs").glob("*.json")}, pretrained
        except Exception:  # another open_clip layout: pay for the import instead
            pass
    import open_clip

    return set(open_clip.list_models()), open_clip.pretrained


@functools.cache
def open_clip_pretrained_alone() -> tuple[Path, ModuleType]:
    """open_clip's folder, and its pretrained.py loaded by itself under another package name.

    pretrained.py needs only open_clip's constants and version; it imports safetensors.torch
    optionally, which is held back here (it would import torch), so the loaded copy believes
    safetensors missing: it serves to read tables, never to load weights.
    """
    found = importlib.util.find_spec("open_clip")
    if found is None or found.origin is None:
        raise ModuleNotFoundError("open_clip")
    folder = Path(found.origin).parent
    alias = "_retrieval_open_clip_tables"
    package = ModuleType(alias)
    package.__path__ = [str(folder)]
    sys.modules[alias] = package
    try:
        with without_module("safetensors.torch"):
            return folder, importlib.import_module(f"{alias}.pretrained")
    finally:
        for name in [n for n in sys.modules if n == alias or n.startswith(f"{alias}.")]:
            del sys.modules[name]
