"""The candidate default models' architectures (tiny configs of them) through every loading route,
MobileCLIP's towers folded for inference, SigLIP 2's Hugging Face tokenizer offline, and the
model presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from support import put_in_hub_cache
from support.model_families import (
    FAMILY_CONFIGS,
    parameter_count,
    unfolded_model,
    write_family_model,
)

from retrieval import ModelLoadError, ModelSpec, load_encoder
from retrieval.encoders.spec import MODEL_PRESETS


@pytest.fixture(scope="module")
def tiny_mobileclip(tmp_path_factory) -> str:
    return write_family_model(tmp_path_factory.mktemp("mobileclip"), "mobileclip")


@pytest.fixture(scope="module")
def tiny_siglip2(tmp_path_factory) -> str:
    return write_family_model(tmp_path_factory.mktemp("siglip2"), "siglip2")


def pixels(side: int) -> torch.Tensor:
    return torch.randn((2, 3, side, side), generator=torch.Generator().manual_seed(0))


def assert_folded_and_equal(encoder, reference: torch.nn.Module) -> None:
    """Fewer parameters than the model as trained (branches folded), the same vectors."""
    assert parameter_count(encoder.model) < parameter_count(reference)
    batch = pixels(encoder.input_side)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_image(batch), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_image_tensors(batch), expected, atol=1e-4)


def test_a_mobile_model_is_folded_for_inference(tiny_mobileclip):
    encoder = load_encoder(ModelSpec.parse(tiny_mobileclip), "cpu")
    assert_folded_and_equal(encoder, unfolded_model(tiny_mobileclip))


def test_a_mobile_model_loaded_to_fine_tune_keeps_its_branches(tiny_mobileclip):
    encoder = load_encoder(ModelSpec.parse(tiny_mobileclip), "cpu", trainable=True)
    assert parameter_count(encoder.model) == parameter_count(unfolded_model(tiny_mobileclip))


def test_a_mobile_checkpoint_file_is_folded_when_loaded(tiny_mobileclip, tmp_path):
    """`--model NAME --pretrained FILE`, as a fine-tuned checkpoint is loaded (it is saved unfolded)."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny-mobileclip.json").write_text(json.dumps(FAMILY_CONFIGS["mobileclip"]))
    open_clip.add_model_config(configs)
    trained = unfolded_model(tiny_mobileclip)
    with torch.no_grad():
        for parameter in trained.parameters():  # other weights than the local-dir model's
            parameter.mul_(0.9)
    checkpoint = tmp_path / "fine-tuned.pt"
    torch.save({"state_dict": trained.state_dict()}, checkpoint)
    encoder = load_encoder(ModelSpec.parse("tiny-mobileclip", str(checkpoint)), "cpu")
    assert_folded_and_equal(encoder, trained)


def test_a_mobile_model_from_the_hub_cache_is_folded(tiny_mobileclip, tmp_path, monkeypatch):
    import huggingface_hub

    put_in_hub_cache(tmp_path / "hub", "someone/tiny-mobileclip",
                     Path(tiny_mobileclip.removeprefix("local-dir:")))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    encoder = load_encoder(ModelSpec.parse("hf-hub:someone/tiny-mobileclip"), "cpu")
    assert_folded_and_equal(encoder, unfolded_model(tiny_mobileclip))


def test_a_siglip2_model_with_its_tokenizer_in_the_folder(tiny_siglip2):
    encoder = load_encoder(ModelSpec.parse(tiny_siglip2), "cpu")
    reference = unfolded_model(tiny_siglip2)
    tokens = open_clip.get_tokenizer(tiny_siglip2)(["a dog in the park", "a red circle"])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_texts(["a dog in the park", "a red circle"]), expected,
                               atol=1e-4)
    assert encoder.encode_images([Image.new("RGB", (40, 30))]).shape == (1, 192)


def test_a_siglip2_folder_without_its_tokenizer_is_one_line(tmp_path):
    spec = write_family_model(tmp_path / "model", "siglip2", tokenizer=False)
    with pytest.raises(ModelLoadError, match="needs its Hugging Face tokenizer") as raised:
        load_encoder(ModelSpec.parse(spec), "cpu")
    assert "\n" not in str(raised.value) and "tokenizer.json" in str(raised.value)


def test_siglip2_offline_without_a_cached_tokenizer_says_how_to_supply_it(tmp_path, monkeypatch):
    """The weights are at hand (a checkpoint file); the tokenizer is in no cache and the hub is off."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    checkpoint = tmp_path / "siglip2.safetensors"
    checkpoint.write_bytes(b"not read: the tokenizer is checked first")
    with pytest.raises(ModelLoadError) as raised:
        load_encoder(ModelSpec.parse("ViT-B-16-SigLIP2", str(checkpoint)), "cpu")
    message = str(raised.value)
    assert "\n" not in message
    assert "needs the Hugging Face tokenizer timm/ViT-B-16-SigLIP2" in message
    assert "hf download timm/ViT-B-16-SigLIP2" in message and "local-dir:" in message


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_a_preset_names_a_known_model_and_tag(preset):
    chosen = MODEL_PRESETS[preset]
    assert ModelSpec.parse(preset) == ModelSpec(chosen.model, chosen.pretrained)
    assert chosen.pretrained in open_clip.list_pretrained_tags_by_model(chosen.model)


def test_a_preset_with_a_checkpoint_keeps_the_presets_architecture(tmp_path):
    checkpoint = tmp_path / "tuned.pt"
    assert ModelSpec.parse("balanced", str(checkpoint)) == \
        ModelSpec(MODEL_PRESETS["balanced"].model, str(checkpoint.resolve()))


def test_the_default_model_is_the_fast_preset():
    assert ModelSpec.parse() == ModelSpec.parse("fast")
