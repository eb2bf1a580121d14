"""CLAP through transformers: a tiny random CLAP saved offline, faithful vectors, one-line errors."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from support import offline_env, put_in_hub_cache, run_cli_process, write_image

transformers = pytest.importorskip("transformers")
from support.tiny_clap import SAMPLE_RATE, save_tiny_clap  # noqa: E402
from transformers import ClapModel, ClapProcessor  # noqa: E402

from retrieval import Index  # noqa: E402
from retrieval.cli import cli  # noqa: E402
from retrieval.core.errors import ModelLoadError, ModelMismatchError, UsageError  # noqa: E402
from retrieval.encoders.clap import DEFAULT_CLAP, load_clap  # noqa: E402
from retrieval.encoders.spec import CLAP_PREFIX  # noqa: E402
from retrieval.media.audio import load_audio  # noqa: E402

TEXTS = ["a dog barks", "rain on a tin roof", "x", ""]


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory) -> Path:
    return save_tiny_clap(tmp_path_factory.mktemp("tiny-clap"))


def tones(*frequencies: float, seconds: float = 0.5) -> list[np.ndarray]:
    time_axis = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return [(0.5 * np.sin(2 * np.pi * f * time_axis)).astype(np.float32) for f in frequencies]


def test_loads_by_folder_with_or_without_prefix(tiny_clap, tmp_path, monkeypatch):
    for ref in (str(tiny_clap), CLAP_PREFIX + str(tiny_clap)):
        encoder = load_clap(ref, device="cpu")
        assert (encoder.identity, encoder.sample_rate, encoder.dim) == (
            f"clap:{tiny_clap}", SAMPLE_RATE, 16)
    monkeypatch.chdir(tiny_clap.parent)
    assert load_clap(f"clap:{tiny_clap.name}", device="cpu").identity == f"clap:{tiny_clap}"


def test_loading_draws_no_bar(tiny_clap, capfd):
    """transformers' "Loading weights: 100%" bar once showed through retrieve index --quiet."""
    load_clap(str(tiny_clap), device="cpu")
    assert capfd.readouterr().err == ""


def test_vectors_equal_plain_transformers(tiny_clap):
    encoder = load_clap(str(tiny_clap), device="cpu", batch_size=2)
    waves = tones(220, 440, 880)
    model = ClapModel.from_pretrained(tiny_clap).eval()
    processor = ClapProcessor.from_pretrained(tiny_clap)
    with torch.inference_mode():
        audio = model.get_audio_features(
            **processor(audio=waves, sampling_rate=SAMPLE_RATE, return_tensors="pt")).pooler_output
        text = model.get_text_features(
            **processor(text=TEXTS, padding=True, return_tensors="pt")).pooler_output
    for vectors, expected in ((encoder.encode_audio(waves), audio), (encoder.encode_texts(TEXTS), text)):
        assert vectors.dtype == np.float32 and vectors.shape == (len(expected), 16)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(vectors, torch.nn.functional.normalize(expected, dim=-1).numpy(),
                                   atol=1e-5)
    np.testing.assert_array_equal(encoder.encode_audio(waves), encoder.encode_audio(waves))
    assert not np.allclose(encoder.encode_audio(waves)[0], encoder.encode_audio(waves)[1])


def test_empty_inputs_and_long_texts(tiny_clap):
    encoder = load_clap(str(tiny_clap), device="cpu")
    assert encoder.encode_audio([]).shape == encoder.encode_texts([]).shape == (0, 16)
    assert encoder.encode_texts(["a very long caption " * 50]).shape == (1, 16)


def test_waves_past_the_window_are_cut_not_cropped_at_random(tiny_clap):
    encoder = load_clap(str(tiny_clap), device="cpu")
    long_wave = tones(330, seconds=1.7)[0] * np.linspace(0.1, 1, int(SAMPLE_RATE * 1.7), dtype=np.float32)
    first = encoder.encode_audio([long_wave])
    np.testing.assert_array_equal(first, encoder.encode_audio([long_wave]))
    np.testing.assert_allclose(first, encoder.encode_audio([long_wave[:SAMPLE_RATE]]), atol=1e-6)


def test_fused_model_vector_does_not_depend_on_its_batch(tmp_path):
    encoder = load_clap(str(save_tiny_clap(tmp_path / "fused", fused=True)), device="cpu")
    waves = tones(220, 440)
    alone = encoder.encode_audio(waves[1:])
    for _ in range(4):  # the extractor's random "longer" flag would land on either clip
        np.testing.assert_allclose(encoder.encode_audio(waves)[1:], alone, atol=1e-5)


def test_rejects_waves_that_are_not_mono(tiny_clap):
    encoder = load_clap(str(tiny_clap), device="cpu")
    for wave in (np.zeros((2, 800), np.float32), np.zeros(0, np.float32)):
        with pytest.raises(UsageError, match="mono"):
            encoder.encode_audio([wave])


def assert_one_line(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError) as error:
        load_clap(f"clap:{tmp_path / 'nowhere'}")
    assert_one_line(error, str(tmp_path / "nowhere"), "does not exist", "save_pretrained")


def test_folder_without_weights(tiny_clap, tmp_path):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_clap, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as error:
        load_clap(str(folder))
    assert_one_line(error, f"clap:{folder}", "no weights", "save_pretrained")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError) as error:
        load_clap(str(folder))
    assert_one_line(error, f"clap:{folder}", "no config.json", "save_pretrained")


def test_folder_with_broken_processor_files(tiny_clap, tmp_path):
    folder = tmp_path / "no-processor"
    shutil.copytree(tiny_clap, folder)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelLoadError) as error:
        load_clap(str(folder))
    assert_one_line(error, f"clap:{folder}", "processor and tokenizer files")


def test_original_laion_checkpoint(tmp_path):
    checkpoint = tmp_path / "630k-audioset-best.pt"
    checkpoint.write_bytes(b"not really a checkpoint")
    with pytest.raises(ModelLoadError) as error:
        load_clap(f"clap:{checkpoint}")
    assert_one_line(error, str(checkpoint), "convert_clap_original_pytorch_to_hf.py")


@pytest.mark.parametrize("read_at_import", [True, False])
def test_offline_hub_name_fails_fast(monkeypatch, read_at_import):
    import huggingface_hub

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: False stands for a variable set later.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", read_at_import)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelLoadError) as error:
        load_clap(DEFAULT_CLAP)
    assert time.monotonic() - started < 5
    assert_one_line(error, f"clap:{DEFAULT_CLAP}", f"download {DEFAULT_CLAP}", "save_pretrained",
                    "clap:/path/to/folder")


def test_cached_hub_model_loads_without_asking_the_network(tiny_clap, tmp_path, monkeypatch,
                                                           no_network):
    import huggingface_hub

    put_in_hub_cache(tmp_path / "hub", "someone/tiny-clap", tiny_clap)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    encoder = load_clap("clap:someone/tiny-clap", device="cpu")
    np.testing.assert_allclose(encoder.encode_texts(TEXTS), load_clap(str(tiny_clap)).encode_texts(TEXTS),
                               atol=1e-6)
    assert no_network == []


def test_a_hub_model_neither_cached_nor_reachable_fails_at_once_leaving_nothing(tiny_model, tmp_path):
    folder = tmp_path / "sounds"
    folder.mkdir()
    soundfile.write(folder / "tone.wav", tones(440)[0], SAMPLE_RATE)
    result, imported = run_cli_process(
        "index", folder, "--index", tmp_path / "new", "--model", tiny_model,
        "--audio-model", f"clap:{DEFAULT_CLAP}", env=offline_env(tmp_path))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    missing = f"clap:{DEFAULT_CLAP} ({DEFAULT_CLAP}/config.json is not in the Hugging Face cache"
    assert missing in result.stderr
    assert "127.0.0.1 cannot be reached (Connection refused)" in result.stderr
    assert not {"torch", "transformers"} & imported
    assert not (tmp_path / "new").exists()


def test_without_transformers(tiny_clap, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ModelLoadError) as error:
        load_clap(str(tiny_clap))
    assert_one_line(error, f"clap:{tiny_clap}", "pip install 'retrieval[clap]'")


def test_an_index_embeds_its_audio_with_clap(tiny_clap, tiny_model, tmp_path):
    """Audio vectors in CLAP's space: searched by text and sound through CLAP, not CLIP."""
    folder = tmp_path / "sounds"
    folder.mkdir()
    for frequency, wave in zip((220, 660, 1800), tones(220, 660, 1800, seconds=1.2)):
        soundfile.write(folder / f"tone{frequency}.wav", wave, SAMPLE_RATE)
    write_image(folder / "picture.png", (200, 30, 30))
    reference = load_clap(str(tiny_clap), device="cpu")
    with Index.open(tmp_path / "index", model=tiny_model, create=True,
                    audio_model=f"clap:{tiny_clap}") as index:
        report = index.add(folder)
        assert (report.audio_encoded, report.images_encoded, report.skipped) == (3, 1, [])
        assert index.audio_model == f"clap:{tiny_clap}" and index.dim_of("audio") == 16
        assert len(index.vectors("audio")) == 3 and index.vectors("audio").dim == 16
        hits = index.search("a dog barks", target="audio", k=3)
        sounds = reference.encode_audio([load_audio(folder / f"tone{f}.wav", SAMPLE_RATE)
                                         for f in (220, 660, 1800)])
        expected = sounds @ reference.encode_texts(["a dog barks"])[0]
        assert sorted(h.score for h in hits) == pytest.approx(sorted(expected), abs=1e-5)
        self_hit = index.search(audio=folder / "tone660.wav", k=1)[0]
        assert self_hit.path == str(folder / "tone660.wav") and self_hit.score == pytest.approx(1, abs=1e-5)
        with pytest.raises(UsageError, match="CLAP"):
            index.search(image=folder / "picture.png", target="audio")
        with pytest.raises(UsageError, match="CLAP"):
            index.search(audio=folder / "tone660.wav", target="image")
    result = CliRunner().invoke(cli, ["a dog barks", "--target", "audio", "--index",
                                      str(tmp_path / "index"), "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3


def test_changing_the_clap_model_needs_rebuild(tiny_clap, tiny_model, tmp_path):
    folder = tmp_path / "sounds"
    folder.mkdir()
    soundfile.write(folder / "tone.wav", tones(440)[0], SAMPLE_RATE)
    other = save_tiny_clap(tmp_path / "other-clap")
    with Index.open(tmp_path / "index", model=tiny_model, create=True,
                    audio_model=f"clap:{tiny_clap}") as index:
        index.add(folder)
    with pytest.raises(ModelMismatchError, match="`rebuild`"):
        Index.open(tmp_path / "index", audio_model=f"clap:{other}")
    with Index.open(tmp_path / "index", audio_model=f"clap:{other}", rebuild=True) as index:
        assert index.count("audio") == 0 and index.audio_model == f"clap:{other}"
        assert index.add().audio_encoded == 1
    with pytest.raises(UsageError, match="clap:NAME"):
        Index.open(tmp_path / "index", audio_model="tower:abc")
