"""Export a model's image and text towers to ONNX for the torch-free query path (`onnx_towers`).

open_clip's plain ViT towers are written operator by operator (`onnx_graphs`), each with its
8-bit twin; any other tower goes to torch's exporters. Every exported tower is checked
against the torch model it came from before it is kept: the preprocessed pixels and the token
ids must be equal (here), the vectors within `onnx_checks.TOLERANCE` (there, without torch). A
tower that cannot be exported or does not pass is left out with one logged line, and its
queries load the model as before.

Exporting takes seconds (a tiny model, ViT-B-32 written) to tens of seconds (torch's
exporters on ViT-B-32's size), so each model is
exported once into a cache (`RETRIEVAL_CACHE`, else `$XDG_CACHE_HOME/retrieval`, else
`~/.cache/retrieval`), keyed by the model's identity and a sample of its weights, and every
index of that model gets hard links to (or copies of) the cached files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from types import MethodType

import numpy as np
import torch
from open_clip.tokenizer import SimpleTokenizer

from .clip import ClipEncoder, can_trim_padding, encode_trimmed_tokens, load_encoder, text_features
from .onnx_checks import (
    PROBE_TEXTS,
    NotExported,
    finish_export,
    first_line,
    leave_out,
    probe_images,
    write_draft,
)
from .onnx_graphs import OPSET, Unsupported, give_back_pages, write_image_graph, write_text_graph
from .onnx_towers import (
    FORMAT,
    IMAGE_FILE,
    INT8_IMAGE_FILE,
    INT8_TEXT_FILE,
    TEXT_FILE,
    TOWERS_DIR,
    Preprocess,
    cache_root,
    install,
    read_manifest,
    remember_source,
    staging_folder,
    warn_skipped,
)
from .spec import ModelSpec, weights_fingerprint
from .tokenizer import ClipTokenizer

# Tracing holds about three passing copies of a tower's weights (the constants it folds, the
# graph it writes, that graph read back): ViT-B-32's image tower (351 MB) peaked 1.4 GB above
# the loaded model. Dynamo writes the weights straight to their file (0.1 GB above), but is
# ten times slower on tiny models and 2.5 times on ViT-B-32 (19 s against 7 s for both towers).
# So towers with more weights than this go to dynamo.
TRACE_AT_MOST = 64 * 2**20  # bytes
LEGACY_FILES = ("text_tower.safetensors",)  # the numpy text tower these towers replaced

log = logging.getLogger(__name__)


def export_towers(encoder: ClipEncoder, folder: Path, fingerprint: str | None = None) -> None:
    """Give index folder `folder` the ONNX towers of the encoder's model.

    Nothing happens when it has them already. A tower that cannot be exported is logged in
    one line; a disk that will not take the files costs the fast query path, never the build.
    `fingerprint` (`weights_fingerprint` of the weights loaded) lets later builds find the
    cached towers without loading the model.
    """
    key = cache_key(encoder)
    target = folder / TOWERS_DIR
    present = read_manifest(target)
    if present is not None and present.get("key") == key:
        return
    if present is not None and present.get("model") == encoder.spec.identity and _quantized(encoder):
        return  # int8 weights export no image tower: keep the towers exported from fp32 ones
    cached: Path | None = cache_root() / key
    try:
        if read_manifest(cached) is None:
            _export_into(encoder, key, cached)
        remember_source(fingerprint, key)
    except OSError:  # no cache to write: the index folder gets an export of its own
        cached = None
    try:
        if cached is None:
            _export_into(encoder, key, target)
        else:
            install(cached, target)
    except OSError as error:
        log.warning(f"could not write ONNX towers into {folder} ({error.strerror or error}); "
                    "queries will load the model")
        return
    for name in LEGACY_FILES:
        (folder / name).unlink(missing_ok=True)
    warn_skipped(target)


def export_to_cache(spec: ModelSpec) -> None:
    """Load `spec`'s model on the CPU and export its towers into the cache, found again by its
    weights' fingerprint: in this process (`export_in_child` parts it in two)."""
    fingerprint = weights_fingerprint(spec)
    key, staging = write_graphs_for_cache(spec)
    if staging is not None:
        finish_export(staging, cache_root() / key)
    remember_source(fingerprint, key)


def write_graphs_for_cache(spec: ModelSpec) -> tuple[str, Path | None]:
    """Load `spec`'s model on the CPU and write its towers' graphs for the cache: its cache key,
    and the staging folder to finish (`onnx_checks.finish_export`) into `cache_root() / key`,
    or None when the cache has them (what `export_in_child`'s first process runs)."""
    encoder = load_encoder(spec, "cpu")
    key = cache_key(encoder)
    target = cache_root() / key
    if read_manifest(target) is not None:
        return key, None
    return key, _graphs_staged(encoder, key, target)


def cache_key(encoder: ClipEncoder) -> str:
    """The model's identity and a sample of every weight: a checkpoint changed in place (a
    fine-tune saved over its folder, say) gets new towers, a reloaded one finds its old ones.
    Sixteen values per tensor are read, a few pages of the mapped checkpoint."""
    digest = hashlib.sha256(f"{FORMAT}\n{encoder.spec.identity}\n".encode())
    for name, value in encoder.model.state_dict().items():
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point:
            flat = value.detach().reshape(-1)
            sample = flat[::max(1, flat.numel() // 16)][:16].float().cpu().numpy()
            digest.update(f"{name}{tuple(value.shape)}{value.dtype}".encode() + sample.tobytes())
            # each value read maps the pages around it too: ViT-B-32's sample held 95 MB
            give_back_pages([value])
    return digest.hexdigest()[:32]


def _export_into(encoder: ClipEncoder, key: str, target: Path) -> None:
    """Export and check both towers in a fresh folder, then rename it to `target`."""
    finish_export(_graphs_staged(encoder, key, target), target)


def _graphs_staged(encoder: ClipEncoder, key: str, target: Path) -> Path:
    """A fresh folder beside `target` with both towers' graphs and the draft `finish_export`
    checks them by: a tower that cannot be exported is left out, its reason noted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(target)
    try:
        manifest: dict = {"format": FORMAT, "model": encoder.spec.identity, "key": key,
                          "image": None, "text": None, "skipped": {}}
        references = {}
        for tower, export in (("image", _export_image), ("text", _export_text)):
            try:
                manifest[tower], references[tower] = export(encoder, staging)
            except NotExported as reason:
                leave_out(manifest, staging, tower, reason)
        write_draft(staging, manifest, references)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


class ImageTower(torch.nn.Module):
    """What the image tower's ONNX graph computes: features of preprocessed pixels."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def weight_bytes(self) -> int:
        return _bytes_of(self.visual)


class TextTower(torch.nn.Module):
    """What the text tower's ONNX graph computes: features of token ids, which may stop after
    the batch's longest text when `trimmed` (any length then), else have the full context."""

    def __init__(self, model: torch.nn.Module, trimmed: bool) -> None:
        super().__init__()
        self.model = model
        self.trimmed = trimmed

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.trimmed:
            return encode_trimmed_tokens(self.model, tokens)
        return text_features(self.model, tokens)

    def weight_bytes(self) -> int:
        """The model's weights but the image tower's: what the text graph holds."""
        return _bytes_of(self.model) - _bytes_of(getattr(self.model, "visual", None))


def _bytes_of(module: torch.nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _export_image(encoder: ClipEncoder, folder: Path) -> tuple[dict, np.ndarray]:
    if _quantized(encoder):
        raise NotExported("its int8 weights are quantised for torch only")
    try:
        preprocess = Preprocess.from_config(getattr(encoder.model.visual, "preprocess_cfg", {}))
    except (ValueError, TypeError) as error:
        raise NotExported(f"its preprocessing is not reproduced without torch: {error}") from None
    probes = probe_images(preprocess.size)
    ours = np.stack([preprocess(image) for image in probes])
    theirs = torch.stack([encoder.preprocess(image) for image in probes])
    if ours.shape != tuple(theirs.shape) or np.abs(ours - theirs.numpy()).max() > 1e-5:
        raise NotExported("its preprocessing is not reproduced without torch")
    path = folder / IMAGE_FILE
    try:
        write_image_graph(encoder.model.visual, path, twin=folder / INT8_IMAGE_FILE)
    except Unsupported:
        _onnx_export(ImageTower(encoder.model), theirs[:2].to(encoder.device), "pixels", path, ["batch"])
    with _weights_given_back_after_use(encoder.model):
        expected = encoder.encode_images(probes)
    return {"file": IMAGE_FILE, "dim": int(expected.shape[1]), "preprocess": asdict(preprocess)}, expected


def _export_text(encoder: ClipEncoder, folder: Path) -> tuple[dict, np.ndarray]:
    tokenizer = encoder.tokenizer
    if not isinstance(tokenizer, SimpleTokenizer) or tokenizer.reduction_fn is not None \
            or len(tokenizer.all_special_ids) != 2:
        raise NotExported("its tokenizer is not open_clip's plain BPE tokenizer")
    ours = ClipTokenizer(context_length=tokenizer.context_length)
    tokens = ours(PROBE_TEXTS)
    if not np.array_equal(tokens, tokenizer(PROBE_TEXTS).numpy()):
        raise NotExported("its tokenizer is not reproduced without torch")
    trimmed = can_trim_padding(encoder.model)
    path = folder / TEXT_FILE
    try:  # a tower that reads its padding (not `trimmed`) is refused there too
        write_text_graph(encoder.model, path, twin=folder / INT8_TEXT_FILE)
    except Unsupported:
        _export_text_by_torch(encoder, tokens, trimmed, path)
    with _weights_given_back_after_use(encoder.model):
        expected = encoder.encode_texts(PROBE_TEXTS)
    return {"file": TEXT_FILE, "dim": int(expected.shape[1]), "context_length": ours.context_length,
            "trim": trimmed}, expected


def _export_text_by_torch(encoder: ClipEncoder, tokens: np.ndarray, trimmed: bool, path: Path) -> None:
    """The text tower's graph by torch's exporters, for inputs like the probes' `tokens`."""
    example = tokens[:2]  # the first two probes: one long, one short
    axes = ["batch"]
    if trimmed:
        example = example[:, :int(np.flatnonzero(example.any(axis=0)).max()) + 1]
        axes.append("length")
    with _symbolic_attention(encoder.model) if trimmed else nullcontext(True) as traceable:
        _onnx_export(TextTower(encoder.model, trimmed), torch.from_numpy(example).to(encoder.device),
                     "tokens", path, axes, max_length=encoder.tokenizer.context_length, traceable=traceable)


@contextmanager
def _weights_given_back_after_use(model: torch.nn.Module) -> Iterator[None]:
    """Meanwhile each part of `model` gives its weights' pages back once it has run (see
    `give_back_pages`): encoding the probes pages the weights in one block at a time, where
    it would hold the whole tower (ViT-B-32's image tower: 351 MB)."""
    def give_back(module: torch.nn.Module, inputs, output) -> None:
        give_back_pages([*module.parameters(), *module.buffers()])

    hooks = [module.register_forward_hook(give_back) for module in model.modules()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def _symbolic_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Meanwhile, the attention of the model's text blocks keeps the sequence length as the
    tracing exporter's symbol (True), where torch's own attention bakes in the length it was
    traced at; False where the blocks are not open_clip's, and only dynamo keeps it.

    With it a trimmed text tower is traced too, never handed to dynamo: ViT-B-32's export
    child took 22 s instead of 34 s (17 CPU-s instead of 30), the tiny model's 7 CPU-s instead
    of 14, and warm queries run as fast on either graph. The probes check the graph against
    open_clip's own forward as for any export.
    """
    blocks = list(getattr(getattr(model, "transformer", None), "resblocks", []))
    if not blocks or not all(_plain_self_attention(block) for block in blocks):
        yield False
        return
    for block in blocks:
        block.attention = MethodType(_traceable_attention, block)  # shadows the class's method
    try:
        yield True
    finally:
        for block in blocks:
            del block.attention


def _plain_self_attention(block: torch.nn.Module) -> bool:
    """An open_clip block whose attention `_traceable_attention` computes: torch's own, one
    projection for queries, keys and values, no extra key and value rows."""
    attention = getattr(block, "attn", None)
    return (isinstance(attention, torch.nn.MultiheadAttention) and callable(getattr(block, "attention", None))
            and attention.in_proj_weight is not None and attention.bias_k is None
            and not attention.add_zero_attn)


def _traceable_attention(block: torch.nn.Module, q_x: torch.Tensor, k_x: torch.Tensor | None = None,
                         v_x: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """open_clip's `ResidualAttentionBlock.attention` for self-attention, through reshapes
    whose only fixed sizes are the heads'."""
    if k_x is not None or v_x is not None:
        raise NotExported("its text blocks attend to other sequences")
    attention = block.attn
    x = q_x if attention.batch_first else q_x.transpose(0, 1)
    projected = torch.nn.functional.linear(x, attention.in_proj_weight, attention.in_proj_bias)
    # (batch, length, 3 * width) -> three (batch, heads, length, head width)
    query, key, value = projected.unflatten(-1, (3, attention.num_heads, -1)).permute(2, 0, 3, 1, 4)
    mask = attn_mask.to(x.dtype) if attn_mask is not None else None
    mixed = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    out = attention.out_proj(mixed.transpose(1, 2).flatten(2))
    return out if attention.batch_first else out.transpose(0, 1)


def _quantized(encoder: ClipEncoder) -> bool:
    return any(isinstance(module, torch.ao.nn.quantized.dynamic.Linear)
               for module in encoder.model.modules())


def _weights_beside(path: Path) -> None:
    """Move the weights the tracing exporter wrote into the graph's file to `<file>.data`, as
    dynamo writes them: ONNX Runtime maps that file instead of parsing the weights out of the
    graph (ViT-B-32's image queries took 1.30 s cold against 0.76 s, a serving process held
    175 MB more)."""
    import onnx

    graph = onnx.load(str(path))
    onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def _onnx_export(module: ImageTower | TextTower, example: torch.Tensor, input_name: str, path: Path,
                 axes: list[str], max_length: int | None = None, traceable: bool = True) -> None:
    """Write `module`'s graph for inputs like `example`, whose leading dimensions named in
    `axes` may vary ("length" up to `max_length`).

    The tracing exporter comes first where `traceable` and the tower has at most
    TRACE_AT_MOST bytes of weights: ten times faster than the dynamo one on small models,
    for the same operators. Dynamo exports the rest.
    """
    try:
        import onnxscript  # noqa: F401  torch's ONNX exporters need it
    except ImportError:
        raise NotExported("onnxscript is not installed") from None
    module = module.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporters' advice is for their developers
            if traceable and module.weight_bytes() <= TRACE_AT_MOST \
                    and _traced_export(module, example, input_name, path, axes):
                return
            dims = {axis: torch.export.Dim(name, max=max_length if name == "length" else None)
                    for axis, name in enumerate(axes)}
            program = torch.onnx.export(module, (example,), input_names=[input_name],
                                        output_names=["features"], dynamic_shapes=(dims,),
                                        dynamo=True, external_data=True, verbose=False)
            program.save(str(path), external_data=True)
    except OSError:
        raise
    except Exception as error:  # the exporter raises many kinds for one cause: unsupported code
        raise NotExported(f"the ONNX export failed: {first_line(error)}") from None


def _traced_export(module: torch.nn.Module, example: torch.Tensor, input_name: str, path: Path,
                   axes: list[str]) -> bool:
    """Export by tracing; False (nothing left behind) where tracing cannot. Attention runs its
    decomposed path meanwhile: the tracer knows no ONNX for the fused kernel."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                          output_names=["features"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={input_name: dict(enumerate(axes)), "features": {0: axes[0]}})
        _weights_beside(path)
        return True
    except OSError:
        raise
    except Exception:  # the same causes as dynamo's, which may still export it
        for leftover in path.parent.glob(f"{path.name}*"):
            leftover.unlink()
        return False
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


if __name__ == "__main__":  # export_in_child: python -m retrieval.encoders.onnx_export NAME PRETRAINED
    exported_key, unfinished = write_graphs_for_cache(ModelSpec(sys.argv[1], sys.argv[2] or None))
    print(json.dumps({"key": exported_key, "staging": unfinished and str(unfinished)}), flush=True)
    # Every file is written and closed. The interpreter's teardown with torch and open_clip
    # loaded would take a second and grow the process by 0.1 GB (measured: 768 -> 883 MB).
    os._exit(0)
