"""Model loading by every route open_clip knows, offline errors, and faithful vectors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from support import offline_env, put_in_hub_cache, run_cli_process, write_image

from retrieval import Index
from retrieval.core.errors import ModelLoadError, UsageError
from retrieval.encoders.clip import load_encoder, resolve_device
from retrieval.encoders.spec import ModelSpec
from retrieval.media.images import load_image


def plain_open_clip(spec: str):
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    return model.eval(), preprocess, open_clip.get_tokenizer(spec)


def test_vectors_equal_plain_open_clip(tiny_model, tmp_path):
    encoder = load_encoder(ModelSpec.parse(tiny_model), device="cpu", batch_size=2)
    model, preprocess, tokenizer = plain_open_clip(tiny_model)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), np.uint8))
              for i in range(5)]
    texts = ["a dog in the park", "a red circle", "x", "two cats on a sofa", ""]
    with torch.no_grad():
        expected_images = model.encode_image(torch.stack([preprocess(i) for i in images]))
        expected_texts = model.encode_text(tokenizer(texts))
    expected_images = torch.nn.functional.normalize(expected_images, dim=-1).numpy()
    expected_texts = torch.nn.functional.normalize(expected_texts, dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_images(images), expected_images, atol=1e-5)
    np.testing.assert_allclose(encoder.encode_texts(texts), expected_texts, atol=1e-5)
    assert encoder.dim == 32


def test_indexed_vector_equals_plain_open_clip(tiny_model, tmp_path):
    photo = write_image(tmp_path / "photos" / "one.png", (120, 40, 200))
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(tmp_path / "photos")
        stored = next(index.store.iter_vectors("image"))[1][0]
    model, preprocess, _ = plain_open_clip(tiny_model)
    with torch.no_grad():
        expected = model.encode_image(preprocess(Image.open(photo).convert("RGB"))[None])
    expected = torch.nn.functional.normalize(expected, dim=-1).numpy()[0]
    np.testing.assert_allclose(stored, expected, atol=1e-5)
    np.testing.assert_allclose(
        load_encoder(ModelSpec.parse(tiny_model), "cpu").encode_images([load_image(photo)])[0],
        expected, atol=1e-5)


def test_checkpoint_file_with_a_registered_architecture(tiny_model, tmp_path):
    """The `--model NAME --pretrained FILE` route, with a tiny architecture registered by name."""
    folder = Path(tiny_model.removeprefix("local-dir:"))
    config = json.loads((folder / "open_clip_config.json").read_text())
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny-test.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(configs)
    model, _, _ = plain_open_clip(tiny_model)
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    encoder = load_encoder(ModelSpec.parse("tiny-test", str(checkpoint)), "cpu")
    with torch.no_grad():
        expected = torch.nn.functional.normalize(
            model.encode_text(open_clip.get_tokenizer(tiny_model)(["hello"])), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode_texts(["hello"]), expected, atol=1e-5)


@pytest.mark.parametrize("name, pretrained, message", [
    ("ViT-B-32", None, "could not load weights for model ViT-B-32@laion2b_s34b_b79k"),
    ("ViT-B-32", "no-such-tag", "unknown pretrained tag 'no-such-tag'"),
    ("ViT-B-32", "/no/such/checkpoint.pt", "checkpoint file /no/such/checkpoint.pt not found"),
    ("No-Such-Model", None, "unknown model 'No-Such-Model'"),
    ("hf-hub:nobody/no-such-repo", None, "could not load weights for model hf-hub:nobody"),
])
def test_weights_that_cannot_be_had_give_one_clear_line(name, pretrained, message, tmp_path,
                                                        monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError) as raised:
        load_encoder(ModelSpec.parse(name, pretrained), "cpu")
    text = str(raised.value)
    assert message in text and "\n" not in text
    if text.startswith("could not load"):
        assert "`pretrained`" in text and "local-dir:" in text


@pytest.mark.parametrize("kind", ["tag", "hf-hub", "checkpoint", "local-dir"])
def test_weights_not_to_be_had_fail_at_once_leaving_nothing(kind, tiny_model, photo_folder, tmp_path):
    """No network, nothing cached: one line with the whole cause, before torch is even imported
    (no huggingface_hub retries), and no index folder left behind."""
    config = Path(tiny_model.removeprefix("local-dir:")) / "open_clip_config.json"
    (tmp_path / "config-only").mkdir()
    shutil.copy(config, tmp_path / "config-only")
    model, ending = {
        "tag": (["--model", "ViT-B-32"], "127.0.0.1 cannot be reached (Connection refused))"),
        "hf-hub": (["--model", "hf-hub:nobody/no-such-repo"], "127.0.0.1 cannot be reached"),
        "checkpoint": (["--model", "ViT-B-32", "--pretrained", str(tmp_path / "none.pt")],
                       "not found"),
        "local-dir": (["--model", f"local-dir:{tmp_path / 'config-only'}"], "no weights file"),
    }[kind]
    index = tmp_path / "new" / "index"
    result, imported = run_cli_process("index", photo_folder, "--index", index, *model,
                                       env=offline_env(tmp_path))
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and ending in result.stderr
    assert not {"torch", "open_clip"} & imported
    assert not (tmp_path / "new").exists()


def test_cached_hub_weights_load_without_asking_the_network(tiny_model, tmp_path, monkeypatch,
                                                            no_network):
    """Without a network, huggingface_hub would retry its update check of each file for half a
    minute before falling back to the cache."""
    import huggingface_hub

    put_in_hub_cache(tmp_path / "hub", "someone/tiny-clip", Path(tiny_model.removeprefix("local-dir:")))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    encoder = load_encoder(ModelSpec.parse("hf-hub:someone/tiny-clip"), "cpu")
    reference = load_encoder(ModelSpec.parse(tiny_model), "cpu")
    np.testing.assert_allclose(encoder.encode_texts(["a dog"]), reference.encode_texts(["a dog"]))
    assert no_network == []


def test_a_load_failure_quotes_its_whole_cause_on_one_line(tiny_model, monkeypatch):
    cause = "open_clip explains at length what went wrong, " * 6 + "\nand goes on over a second line"

    def fail(*args, **kwargs):
        raise RuntimeError(cause)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fail)
    with pytest.raises(ModelLoadError) as raised:
        load_encoder(ModelSpec.parse(tiny_model), "cpu")
    assert " ".join(cause.split()) in str(raised.value) and "\n" not in str(raised.value)


def test_the_weight_check_reads_open_clip_tables_as_open_clip_does():
    """The check reads open_clip's tables without importing torch; they must be open_clip's own."""
    from retrieval.encoders import spec as models

    folder, alone = models.open_clip_pretrained_alone()
    assert folder == Path(open_clip.__file__).parent
    assert alone.list_pretrained() == open_clip.list_pretrained()
    assert (alone.get_pretrained_cfg("ViT-B-32", "openai")
            == open_clip.get_pretrained_cfg("ViT-B-32", "openai"))
    assert (models.HF_WEIGHTS_NAME, models.HF_SAFE_WEIGHTS_NAME) == (
        open_clip.constants.HF_WEIGHTS_NAME, open_clip.constants.HF_SAFE_WEIGHTS_NAME)


def test_local_dir_without_weights_or_config_is_refused(tiny_model, tmp_path):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        load_encoder(ModelSpec.parse(f"local-dir:{empty}"), "cpu")
    config = Path(tiny_model.removeprefix("local-dir:")) / "open_clip_config.json"
    (empty / "open_clip_config.json").write_text(config.read_text())
    with pytest.raises(ModelLoadError, match="no weights file"):
        load_encoder(ModelSpec.parse(f"local-dir:{empty}"), "cpu")


def test_model_spec_identity_is_stable():
    assert ModelSpec.parse().identity == "ViT-B-32@laion2b_s34b_b79k"
    assert ModelSpec.parse("local-dir:./models/x").name == f"local-dir:{Path('models/x').resolve()}"
    assert ModelSpec.parse("RN50", "openai").identity == "RN50@openai"
    assert ModelSpec.parse("hf-hub:org/repo").identity == "hf-hub:org/repo"


@pytest.mark.parametrize("name", ["local-dir:./models/x", "hf-hub:org/repo"])
@pytest.mark.parametrize("prefix", ["", "caption_"])
def test_weights_for_a_model_that_carries_its_own_are_refused(name, prefix):
    with pytest.raises(UsageError) as refused:
        ModelSpec.parse(name, "laion2b_s34b_b79k", parameter_prefix=prefix)
    message = str(refused.value)
    assert f"`{prefix}pretrained` cannot be combined with a {name.split(':')[0]}: model" in message
    assert f"`{prefix}model` {name.split(':')[0]}:" in message


def test_device_choice():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == "cpu"


def test_trimmed_text_encoding_equals_full_padding(tiny_model):
    """Padding is cut after the batch's longest text: the vectors must not change."""
    from retrieval.encoders.clip import can_trim_padding

    encoder = load_encoder(ModelSpec.parse(tiny_model), "cpu", batch_size=4)
    assert can_trim_padding(encoder.model)
    texts = ["a", "a dog in the park", "two " * 60 + "long", "", "a red circle on grey",
             "ünïcödé 猫 text"]
    with torch.no_grad():
        full = encoder.model.encode_text(encoder.tokenizer(texts))
    full = torch.nn.functional.normalize(full, dim=-1).numpy()
    trimmed = encoder.encode_texts(texts)
    assert np.abs(trimmed - full).max() < 1e-5


def test_int8_encoding_is_close_to_fp32(tiny_model):
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), np.uint8))
              for i in range(4)]
    full = load_encoder(ModelSpec.parse(tiny_model), "cpu").encode_images(images)
    int8 = load_encoder(ModelSpec.parse(tiny_model), "cpu", int8=True).encode_images(images)
    cosines = (full * int8).sum(axis=1)
    assert cosines.min() > 0.99 and np.abs(full - int8).max() > 0  # close, yet quantised


def test_int8_is_refused_off_the_cpu(tiny_model):
    from retrieval.core.errors import UsageError

    with pytest.raises(UsageError, match="CPU only"):
        load_encoder(ModelSpec.parse(tiny_model), "cuda", int8=True)


def test_int8_encoder_still_encodes_text_in_full_precision(tiny_model):
    texts = ["a dog in the park", "a red circle"]
    full = load_encoder(ModelSpec.parse(tiny_model), "cpu").encode_texts(texts)
    int8 = load_encoder(ModelSpec.parse(tiny_model), "cpu", int8=True).encode_texts(texts)
    np.testing.assert_allclose(int8, full, atol=1e-6)
