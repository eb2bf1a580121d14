"""Models built straight from their checkpoints equal open_clip's own, by every route, and no
randomly initialised model is made on the way."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch

from retrieval.encoders.clip import load_encoder
from retrieval.encoders.spec import ModelSpec


def assert_same_model(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Every parameter and buffer, the non-persistent ones (causal masks) included, equal."""
    ours_tensors = dict([*ours.named_parameters(), *ours.named_buffers()])
    theirs_tensors = dict([*theirs.named_parameters(), *theirs.named_buffers()])
    assert ours_tensors.keys() == theirs_tensors.keys()
    for name, tensor in theirs_tensors.items():
        assert ours_tensors[name].dtype == tensor.dtype, name
        assert torch.equal(ours_tensors[name], tensor), name
        assert ours_tensors[name].requires_grad == tensor.requires_grad, name


def open_clip_model(name: str, pretrained: str | None = None) -> torch.nn.Module:
    return open_clip.create_model_and_transforms(name, pretrained=pretrained)[0]


@pytest.fixture(scope="module")
def registered_tiny(tiny_model, tmp_path_factory) -> str:
    """The tiny architecture under a name, for the `NAME --pretrained FILE` route."""
    folder = Path(tiny_model.removeprefix("local-dir:"))
    configs = tmp_path_factory.mktemp("configs")
    config = json.loads((folder / "open_clip_config.json").read_text())
    (configs / "tiny-weights-test.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(configs)
    return "tiny-weights-test"


def test_local_dir_model_equals_open_clip(tiny_model):
    encoder = load_encoder(ModelSpec.parse(tiny_model), "cpu")
    assert_same_model(encoder.model, open_clip_model(tiny_model))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_checkpoint_file_model_equals_open_clip(legacy, tiny_model, registered_tiny, tmp_path):
    """A legacy torch.save file cannot be memory-mapped: it is read the plain way instead."""
    source = open_clip_model(tiny_model)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": source.state_dict()}, checkpoint,
               _use_new_zipfile_serialization=not legacy)
    encoder = load_encoder(ModelSpec.parse(registered_tiny, str(checkpoint)), "cpu")
    assert_same_model(encoder.model, open_clip_model(registered_tiny, str(checkpoint)))
    assert_same_model(encoder.model, source)


def test_half_precision_checkpoint_is_cast_as_open_clip_casts_it(tiny_model, registered_tiny,
                                                                  tmp_path):
    state = {k: v.half() for k, v in open_clip_model(tiny_model).state_dict().items()}
    checkpoint = tmp_path / "tiny-fp16.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    encoder = load_encoder(ModelSpec.parse(registered_tiny, str(checkpoint)), "cpu")
    assert encoder.model.visual.conv1.weight.dtype == torch.float32
    assert_same_model(encoder.model, open_clip_model(registered_tiny, str(checkpoint)))


def test_hf_hub_model_from_the_cache_equals_open_clip(tiny_model, tmp_path, monkeypatch):
    """`hf-hub:` (and tags, which open_clip fetches the same way) read the Hugging Face cache."""
    folder = Path(tiny_model.removeprefix("local-dir:"))
    repo = tmp_path / "hub" / "models--someone--tiny-clip"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (snapshot / name).write_bytes((folder / name).read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    encoder = load_encoder(ModelSpec.parse("hf-hub:someone/tiny-clip"), "cpu")
    assert_same_model(encoder.model, open_clip_model("hf-hub:someone/tiny-clip"))


def test_no_random_model_is_made_first(tiny_model, monkeypatch):
    """open_clip initialises every weight before loading the checkpoint over it; here the
    initialisers may run, but only on meta tensors, which hold no memory."""
    devices: list[str] = []

    def spy(name: str):
        original = getattr(torch.nn.init, name)

        def recording(tensor, *args, **kwargs):
            devices.append(tensor.device.type)
            return original(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.nn.init, name, recording)

    for name in ("normal_", "uniform_", "kaiming_uniform_", "ones_", "zeros_", "constant_"):
        spy(name)
    encoder = load_encoder(ModelSpec.parse(tiny_model), "cpu")
    assert devices and set(devices) == {"meta"}
    assert not any(p.is_meta for p in encoder.model.parameters())


@pytest.mark.parametrize("route", ["local-dir", "checkpoint"])
def test_training_in_place_never_writes_the_checkpoint(route, tiny_model, registered_tiny,
                                                       tmp_path):
    """The weights are pages of the mapped checkpoint: changes must stay private to the process."""
    folder = tmp_path / "model"
    folder.mkdir()
    source = Path(tiny_model.removeprefix("local-dir:"))
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        (folder / name).write_bytes((source / name).read_bytes())
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": open_clip_model(tiny_model).state_dict()}, checkpoint)
    spec = (ModelSpec.parse(f"local-dir:{folder}") if route == "local-dir"
            else ModelSpec.parse(registered_tiny, str(checkpoint)))
    weights = folder / "open_clip_model.safetensors" if route == "local-dir" else checkpoint
    before = weights.read_bytes()
    encoder = load_encoder(spec, "cpu")
    with torch.no_grad():
        for parameter in encoder.model.parameters():
            parameter.add_(1.0)
    del encoder
    assert weights.read_bytes() == before


def test_modules_made_in_other_threads_meanwhile_stay_real():
    """A server may load another model (CLAP, say) in another thread while one is built."""
    import threading

    from retrieval.encoders.weights import checkpoint_tensors_become_parameters

    made = {}
    with checkpoint_tensors_become_parameters():
        here = torch.nn.Linear(2, 2)
        other = threading.Thread(target=lambda: made.setdefault("linear", torch.nn.Linear(2, 2)))
        other.start()
        other.join()
    assert here.weight.is_meta and not made["linear"].weight.is_meta
    assert not torch.nn.Linear(2, 2).weight.is_meta  # and nothing stays patched
