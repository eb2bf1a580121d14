"""LAION-CLAP audio encoders through Hugging Face transformers' ClapModel and ClapProcessor.

transformers is an optional extra (`pip install 'retrieval[clap]'`), imported only when a CLAP
model is loaded, as torch is: a model that cannot be had is refused before either is imported.
CLAP embeds audio and text into its own shared space, not CLIP's. As in clip.py, every
vector leaving this module is float32 and L2-normalised.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import ModelLoadError, UsageError
from .spec import CLAP_PREFIX, from_hub_cache, hub_cache_only, one_line

if TYPE_CHECKING:
    import torch

DEFAULT_CLAP = "laion/clap-htsat-unfused"  # the name error messages offer as an example
# What the `laion_clap` package saves; transformers cannot read it without conversion.
_ORIGINAL_CHECKPOINT_SUFFIXES = (".pt", ".ckpt")
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# A Hugging Face repo id: `name` or `org/name`, neither part starting with '.' or '-'.
_HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")
# What a hub model must have in the cache to load without the network (its processor files
# come with them from the same download).
_HUB_FILES = (("config.json",), ("model.safetensors", "pytorch_model.bin"))


class ClapEncoder:
    """A CLAP model: audio and text embedded into CLAP's own shared space (not CLIP's)."""

    def __init__(self, identity: str, model: torch.nn.Module, processor, device: str,
                 batch_size: int = 16) -> None:
        self.identity = identity
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self.batch_size = batch_size
        extractor = processor.feature_extractor
        self.sample_rate = int(extractor.sampling_rate)
        self.dim = int(model.config.projection_dim)
        self.max_samples = int(extractor.nb_max_samples)
        # RoBERTa numbers positions from the padding index + 1, so that many fewer tokens fit.
        text_config = model.config.text_config
        self.max_tokens = text_config.max_position_embeddings - text_config.pad_token_id - 1

    def encode_audio(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Embed mono float waves sampled at `sample_rate`, batch by batch.

        A wave longer than the model's window (10 s for LAION checkpoints) is cut to the window's
        length: the extractor would crop it at random, so the same audio would embed differently
        on each call, and callers split long files into windows anyway.
        """
        return self._in_batches(waves, self._encode_audio_batch)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts, batch by batch; each is truncated to what the text tower's positions hold."""
        return self._in_batches(texts, self._encode_text_batch)

    def _encode_audio_batch(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        clips = [_mono(wave)[: self.max_samples] for wave in waves]
        inputs = self.processor(audio=clips, sampling_rate=self.sample_rate, return_tensors="pt")
        # When no clip is longer than the window, the extractor flags a random one as longer (a
        # training trick); fused models would then embed it differently depending on its batch.
        inputs["is_longer"] = torch.zeros_like(inputs["is_longer"])
        with torch.inference_mode():
            return _normalised(self.model.get_audio_features(**inputs.to(self.device), return_dict=True))

    def _encode_text_batch(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        inputs = self.processor(text=list(texts), padding=True, truncation=True,
                                max_length=self.max_tokens, return_tensors="pt")
        with torch.inference_mode():
            return _normalised(self.model.get_text_features(**inputs.to(self.device), return_dict=True))

    def _in_batches(self, items: Sequence, encode: Callable[[Sequence], np.ndarray]) -> np.ndarray:
        chunks = [encode(items[start:start + self.batch_size])
                  for start in range(0, len(items), self.batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)


def _mono(wave: np.ndarray) -> np.ndarray:
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1 or wave.size == 0:
        raise UsageError(f"CLAP encodes non-empty mono waves (1-D arrays), not shape {wave.shape}")
    return wave


def _normalised(output) -> np.ndarray:
    """Unit float32 vectors from get_*_features: a tensor before transformers 5, an output after."""
    import torch

    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


def load_clap(ref: str, device: str = "auto", batch_size: int = 16) -> ClapEncoder:
    """Load a CLAP model; any failure to get its weights becomes a one-line ModelLoadError.

    `ref` is a hub name ('laion/clap-htsat-unfused') or a local folder written by ClapModel's
    and ClapProcessor's save_pretrained, optionally prefixed with 'clap:'.
    """
    identity = clap_identity(ref)
    source = identity[len(CLAP_PREFIX):]
    local = Path(source).is_absolute()
    if local:
        _check_local(Path(source), identity)
    # Cached (or local): loaded without asking the hub anything, so no update check retries
    # a network that is not there. Neither cached nor reachable: refused before any import.
    cache_only = local or from_hub_cache(
        source, _HUB_FILES, lambda cause: _explain_load_failure(identity, source, False, cause))
    try:
        import torch
        from transformers import ClapModel, ClapProcessor
    except ImportError as error:
        raise ModelLoadError(
            f"CLAP model {identity} needs Hugging Face transformers; pip install 'retrieval[clap]'"
        ) from error
    from .clip import resolve_device

    device = resolve_device(device)
    try:
        with hub_cache_only(cache_only), _no_loading_bars():
            model = ClapModel.from_pretrained(source, dtype=torch.float32, local_files_only=cache_only)
            processor = ClapProcessor.from_pretrained(source, local_files_only=cache_only)
    except Exception as error:  # transformers and huggingface_hub raise many kinds for one cause
        raise ModelLoadError(_explain_load_failure(identity, source, local, one_line(error))) from error
    return ClapEncoder(identity, model.to(device), processor, device, batch_size)


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers draws a bar for loading the weights ("Loading weights: 100%"), on stderr,
    quiet or not; the build's own progress is what a person follows."""
    from transformers.utils import logging

    shown = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            logging.enable_progress_bar()


def clap_identity(ref: str) -> str:
    """`clap:` and the hub name, or the absolute path, that `ref` names (prefixed or not)."""
    name = ref[len(CLAP_PREFIX):] if ref.startswith(CLAP_PREFIX) else ref
    path = Path(name).expanduser()
    if path.exists() or path.suffix in _ORIGINAL_CHECKPOINT_SUFFIXES or not _HUB_ID.fullmatch(name):
        return CLAP_PREFIX + str(path.resolve())
    return CLAP_PREFIX + name


def _check_local(path: Path, identity: str) -> None:
    """Say what is wrong with a local model before transformers says it at length."""
    if not path.exists():
        raise ModelLoadError(
            f"CLAP model {identity}: {path} does not exist; pass clap:/path/to/folder written by "
            f"save_pretrained, or a hub name such as {DEFAULT_CLAP}")
    if path.is_file() and path.suffix in _ORIGINAL_CHECKPOINT_SUFFIXES:
        raise ModelLoadError(
            f"CLAP model {identity} is an original LAION-CLAP checkpoint, which transformers cannot "
            "read; convert it to the Hugging Face format first with transformers' "
            "convert_clap_original_pytorch_to_hf.py script, then pass clap:/path/to/converted/folder")
    if path.is_file():
        raise ModelLoadError(
            f"CLAP model {identity} is a file; pass clap:/path/to/folder holding config.json, the "
            "weights and the processor files, as save_pretrained writes them")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"CLAP model {identity}: no config.json in {path}; pass a folder written by "
            "ClapModel.save_pretrained and ClapProcessor.save_pretrained")
    if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
        raise ModelLoadError(
            f"CLAP model {identity}: no weights (*.safetensors, *.bin) in {path}; copy the model's "
            "weights into that folder, or save the model there with save_pretrained")


def _explain_load_failure(identity: str, source: str, local: bool, cause: str) -> str:
    if local:
        return (
            f"could not load CLAP model {identity} ({cause}); the folder needs what "
            "ClapModel.save_pretrained and ClapProcessor.save_pretrained write: config.json, "
            "weights, processor and tokenizer files")
    return (
        f"could not load CLAP model {identity} ({cause}). Without internet, supply it "
        f"yourself: download it on a connected machine with `hf download {source}` (older "
        f"huggingface_hub: `huggingface-cli download {source}`) into the Hugging Face cache "
        "(~/.cache/huggingface), or save it with save_pretrained and pass clap:/path/to/folder")
