"""open_clip encoders: load any model the way open_clip names it, and embed images and texts.

Every vector leaving this module is float32 and L2-normalised, so inner product is cosine
similarity and the FAISS indexes can be inner-product indexes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import open_clip
import torch
from open_clip.transformer import text_global_pool
from PIL import Image

from ..core.errors import ModelLoadError, UsageError
from .spec import (
    ModelSpec,
    cannot_load_message,
    check_device,
    check_weights_available,
    hub_cache_only,
    one_line,
)
from .weights import create_model_and_transforms


def resolve_device(device: str = "auto") -> str:
    """`auto` picks cuda, then mps, then cpu; anything else must name a device torch can use
    here, or the error says so (rather than failing later as a model that would not load)."""
    if check_device(device) != "auto":
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):  # a kind this torch build does not know
            raise UsageError(f"`device` {device!r} is not a device this torch knows; use auto or cpu"
                             ) from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"`device` {device!r}: this torch sees no CUDA GPU; use cpu or auto")
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


class ClipEncoder:
    """An open_clip model with its image preprocessing and tokenizer, batched and normalised."""

    def __init__(self, spec: ModelSpec, model: torch.nn.Module, preprocess, tokenizer,
                 device: str, batch_size: int = 32) -> None:
        self.spec = spec
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = batch_size
        self.dim = _embedding_dim(model)

    @property
    def input_side(self) -> int:
        """The shorter side, in pixels, of what the vision tower takes in."""
        size = getattr(self.model.visual, "image_size", 224)
        return min(size) if isinstance(size, (tuple, list)) else int(size)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """Resize, crop and normalise one RGB image into the model's input tensor."""
        return self.preprocess(image)

    @torch.inference_mode()
    def encode_image_tensors(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed a batch of preprocessed images (N, 3, H, W)."""
        features = self.model.encode_image(pixels.to(self.device))
        return _normalised(features)

    def encode_preprocessed(self, images: Sequence[torch.Tensor | np.ndarray]) -> np.ndarray:
        """Embed images each made by `preprocess_image` (or the ONNX tower's equal `preprocess`,
        whose arrays a build made before its tower failed to open), as one batch."""
        return self.encode_image_tensors(torch.stack([torch.as_tensor(i) for i in images]))

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images, batch by batch."""
        return self._in_batches(
            images, lambda chunk: self.encode_image_tensors(
                torch.stack([self.preprocess_image(image) for image in chunk])))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts, batch by batch; open_clip truncates each to the model's context length."""
        def encode(chunk: Sequence[str]) -> np.ndarray:
            return _normalised(text_features(self.model, self.tokenizer(list(chunk)).to(self.device)))

        return self._in_batches(texts, encode)

    def _in_batches(self, items: Sequence, encode) -> np.ndarray:
        chunks = [encode(items[start:start + self.batch_size])
                  for start in range(0, len(items), self.batch_size)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)


def text_features(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)`, with the padding trimmed where that changes nothing: the
    features the engine and its fine-tuning compute (not normalised)."""
    if not can_trim_padding(model):
        return model.encode_text(tokens)
    length = int(tokens.ne(0).any(dim=0).nonzero().max()) + 1
    return encode_trimmed_tokens(model, tokens[:, :length])


def can_trim_padding(model: torch.nn.Module) -> bool:
    """True for open_clip's own text tower: causal attention, pooled at or before the end token.

    Then padding after the longest sequence's end token cannot change any output, and
    encoding without it gives the same vectors several times faster (captions are ~15 of 77
    tokens). Other towers (Hugging Face text models, mean or last-token pooling) run as is.
    """
    return (isinstance(model, open_clip.CLIP) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in ("argmax", "eos", "first"))


def encode_trimmed_tokens(model: open_clip.CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text` for a tower that `can_trim_padding`, on tokens already cut after
    the batch's last non-padding position (any length up to the context length)."""
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type,
                         eos_token_id=getattr(model, "text_eos_id", None))
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x if model.text_projection is None else x @ model.text_projection


def _normalised(features: torch.Tensor) -> np.ndarray:
    features = torch.nn.functional.normalize(features.float(), dim=-1)
    return features.cpu().numpy().astype(np.float32, copy=False)


def _embedding_dim(model: torch.nn.Module) -> int:
    # CLIP holds the text projection itself; CustomTextCLIP (MobileCLIP, SigLIP) in its `text`.
    for owner in (model, getattr(model, "text", None)):
        projection = getattr(owner, "text_projection", None)
        if isinstance(projection, torch.Tensor):
            return int(projection.shape[-1])
        if isinstance(projection, torch.nn.Linear):
            return int(projection.out_features)
    return int(model.visual.output_dim)


def load_encoder(spec: ModelSpec, device: str = "auto", batch_size: int = 32,
                 int8: bool = False, *, parameter_prefix: str = "", trainable: bool = False
                 ) -> ClipEncoder:
    """Build the model named by `spec`; any failure to get its weights becomes a ModelLoadError.

    `parameter_prefix` names the parameters that supply this model in those errors: "caption_"
    makes them name `caption_model` and `caption_pretrained`.
    `int8` quantises the image tower's linear layers to 8 bits (CPU only): faster image
    encoding, vectors within ~1e-3 cosine of fp32. Text stays in fp32: it is cheap, and the
    query side (the ONNX text tower) computes it in fp32 too.
    `trainable` keeps the model as trained (see `reparameterized`), for fine-tuning it.
    """
    cached = check_weights_available(spec, parameter_prefix)
    if int8 and device not in ("auto", "cpu"):  # said before any doubt about the device itself
        raise UsageError(f"int8 encoding runs on the CPU only, not on {device}; drop `int8`")
    device = resolve_device(device)
    if int8 and device != "cpu":
        raise UsageError(f"int8 encoding runs on the CPU only, not on {device}; drop `int8`")
    try:
        with hub_cache_only(cached):  # no update checks, which retry for long without a network
            model, preprocess = create_model_and_transforms(spec.name, spec.pretrained, device)
            tokenizer = open_clip.get_tokenizer(spec.name)
    except Exception as error:  # open_clip and huggingface_hub raise many kinds for one cause
        raise ModelLoadError(cannot_load_message(spec, one_line(error), parameter_prefix)) from error
    if not trainable:
        model = reparameterized(model)
    if int8:
        model.visual = _quantized(model.visual)
    return ClipEncoder(spec, model, preprocess, tokenizer, device, batch_size)


def reparameterized(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its re-parameterisable blocks folded, in place, for inference.

    MobileCLIP's towers (MobileOne / FastViT blocks) train with parallel branches that add up
    to one convolution; folding them gives the same outputs at about 1.6x the CPU speed. A model
    without such blocks is returned as it is. Fine-tuning keeps the branches (`trainable`), and
    what it saves is folded again when loaded to encode.
    """
    if not any(hasattr(module, "reparameterize") for module in model.modules()):
        return model
    from timm.utils.model import reparameterize_model

    return reparameterize_model(model.eval(), inplace=True)


def _quantized(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's move to torchao is announced, not done
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
