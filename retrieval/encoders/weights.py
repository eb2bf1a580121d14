"""Build an open_clip model straight from its checkpoint, without a random model first.

open_clip builds a randomly initialised model (every weight allocated and filled), reads the
whole checkpoint into memory, then copies it into the model: three copies of the weights at
the peak, and seconds spent on random numbers that are thrown away. Here the same open_clip
call runs with three changes, so that every route it knows (tag from the Hugging Face cache,
checkpoint file, `local-dir:`, `hf-hub:`) and all of its checkpoint conversions still apply:

- parameters are made on the meta device: no memory, and the initialisers have nothing to do;
- checkpoint files are memory-mapped (safetensors maps on its own; torch.load is told to);
- `load_state_dict` assigns the checkpoint's tensors as the parameters instead of copying.

The weights then exist once, as pages of the (page-cached) checkpoint file, read as they are
first used: an image-only build never pages in the text tower. The mappings are private
(copy-on-write): training changes the process's copy, never the file. Buffers are still made for
real, since the few that no checkpoint holds (causal masks) are computed when the model is.
A model with anything left on the meta device afterwards (no checkpoint at all, or a buffer
derived from random weights) is built again the plain way, so the result is always open_clip's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import open_clip
import torch
from torch.utils.serialization import config as serialization_config

# The patches below are process-wide while a model is built: one build at a time, and they
# act only in the building thread (a server may load another model in another thread).
_BUILD_LOCK = threading.Lock()


def create_model_and_transforms(name: str, pretrained: str | None, device: str
                                ) -> tuple[torch.nn.Module, object]:
    """open_clip's model and inference preprocess for `name`/`pretrained`, on `device`.

    Raises whatever open_clip raises for weights it cannot find or read.
    """
    try:
        with _BUILD_LOCK, checkpoint_tensors_become_parameters():
            # device=None: open_clip moves the model before it loads weights, and meta
            # parameters cannot move; it is moved below, once the weights are in.
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=None)
    except Exception:  # e.g. a legacy torch.save file cannot be mapped: the plain build
        model = None   # below reads it, or raises open_clip's own error for the real cause
    if model is not None and not _on_meta(model):
        return model.to(device), preprocess
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=pretrained, device=device)
    return model, preprocess


@contextmanager
def checkpoint_tensors_become_parameters() -> Iterator[None]:
    """In this thread, parameters made meanwhile are on the meta device and load_state_dict
    assigns (cast to each parameter's dtype) instead of copying; torch.load maps files."""
    register_parameter = torch.nn.Module.register_parameter
    load_state_dict = torch.nn.Module.load_state_dict
    mmap = serialization_config.load.mmap
    builder = threading.get_ident()
    assigning = False  # assignment registers the checkpoint's tensors: those stay real

    def register_on_meta(module, name, param):
        if param is not None and not assigning and param.device.type != "meta" \
                and threading.get_ident() == builder:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    def load_by_assignment(module, state_dict, strict=True, assign=False):
        nonlocal assigning
        if threading.get_ident() != builder:
            return load_state_dict(module, state_dict, strict=strict, assign=assign)
        targets = module.state_dict(keep_vars=True)
        state_dict = {key: _like(value, targets.get(key)) for key, value in state_dict.items()}
        assigning = True
        try:
            return load_state_dict(module, state_dict, strict=strict, assign=True)
        finally:
            assigning = False

    torch.nn.Module.register_parameter = register_on_meta
    torch.nn.Module.load_state_dict = load_by_assignment
    serialization_config.load.mmap = True
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register_parameter
        torch.nn.Module.load_state_dict = load_state_dict
        serialization_config.load.mmap = mmap


def _like(value, target: torch.Tensor | None):
    """A checkpoint tensor in the dtype of the parameter it becomes (copying only then)."""
    if isinstance(value, torch.Tensor) and target is not None and value.dtype != target.dtype:
        return value.to(target.dtype)
    return value


def _on_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))
