"""Captions from CoCa: the searches on hand-made distributions, a tiny CoCa trained to caption
renders, every way to name a caption model, and the fine-tuning loss."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import open_clip
import pytest
import torch
from open_clip.loss import CoCaLoss
from support.tiny_coca import TINY_COCA_CFG, create_tiny_coca
from support.tiny_model import CLASSES, caption_for, render_batch, render_shape

from retrieval.core.errors import ModelLoadError, UsageError
from retrieval.encoders.caption_spec import CaptionOptions, caption_model_spec
from retrieval.encoders.captioner import (
    Captioner,
    beam_search,
    can_decode_stepwise,
    caption_decoder,
    coca_loss,
    load_captioner,
    sample_top_p,
)
from retrieval.encoders.clip import load_encoder
from retrieval.encoders.spec import ModelSpec

START, END, VOCABULARY = 8, 9, 10
MAX_LENGTH = 8  # the tiny CoCa's context holds 11 caption tokens
WORDS = {word for color, shape in CLASSES for word in caption_for(color, shape).split()}


def table_model(*tables: dict[int, dict[int, float]]):
    """Next-token log-probabilities from a table per image: last token -> {token: probability};
    tokens a table leaves out share what is left of the probability."""
    def next_log_probs(rows: torch.Tensor, tokens: torch.Tensor, parents: object) -> torch.Tensor:
        out = torch.empty(len(rows), VOCABULARY)
        for row, (image, last) in enumerate(zip(rows.tolist(), tokens[:, -1].tolist())):
            given = tables[image].get(last, {})
            rest = max(1 - sum(given.values()), 1e-9) / (VOCABULARY - len(given))
            out[row] = torch.tensor([given.get(token, rest) for token in range(VOCABULARY)]).log()
        return out
    return next_log_probs


def search(method: str, model, images: int, max_length: int = 6, no_repeat_ngram: int = 0, seed: int = 0,
           **options) -> list[list[int]]:
    if method == "beam":
        return beam_search(model, images, START, END, max_length=max_length, no_repeat_ngram=no_repeat_ngram,
                           **options)
    return sample_top_p(model, images, START, END, max_length=max_length, no_repeat_ngram=no_repeat_ngram,
                        generator=torch.Generator().manual_seed(seed), **options)


# -- the searches -------------------------------------------------------------------------------

def test_beam_search_finds_the_likelier_caption_greedy_misses_per_image():
    # Image 0: 1 is likelier first, but every caption through it is less likely than 2 6 (0.38).
    misleading = {START: {1: 0.6, 2: 0.4}, 1: {3: 0.34, 4: 0.33, 5: 0.33}, 2: {6: 0.95},
                  3: {END: 1.0}, 4: {END: 1.0}, 5: {END: 1.0}, 6: {END: 1.0}}
    plain = {START: {7: 0.9}, 7: {END: 1.0}}
    model = table_model(misleading, plain)
    assert search("beam", model, 2, beam_width=1) == [[1, 3], [7]]
    assert search("beam", model, 2, beam_width=2) == [[2, 6], [7]]
    # Each image's search is its own: batch companions change nothing.
    assert search("beam", table_model(plain, misleading), 2, beam_width=2) == [[7], [2, 6]]


@pytest.mark.parametrize("method", ["beam", "top-p"])
def test_captions_end_at_max_length_and_are_never_empty(method):
    endless = {token: {1: 0.5, 2: 0.5, END: 1e-6} for token in (START, 1, 2)}
    eager = {START: {END: 0.99, 3: 0.01}, 3: {END: 1.0}}
    written = search(method, table_model(endless, eager), 2, max_length=5)
    assert len(written[0]) == 5 and set(written[0]) <= {1, 2}
    assert written[1] == [3]


@pytest.mark.parametrize("method", ["beam", "top-p"])
def test_no_repeat_ngram_forbids_repeated_ngrams(method):
    looping = {START: {1: 1.0}, 1: {2: 0.9, 3: 0.1}, 2: {1: 0.9, 3: 0.1}, 3: {4: 0.5, 5: 0.5},
               4: {5: 0.5, 6: 0.5}, 5: {6: 0.5, 4: 0.5}, 6: {4: 0.5, 5: 0.5}}
    loose = search(method, table_model(looping), 1, max_length=10)[0]
    bigrams = list(zip(loose, loose[1:]))
    assert len(set(bigrams)) < len(bigrams)  # the search repeats without the rule
    guarded = search(method, table_model(looping), 1, max_length=10, no_repeat_ngram=2)[0]
    bigrams = list(zip(guarded, guarded[1:]))
    assert len(guarded) == 10 and len(set(bigrams)) == len(bigrams)


def test_top_p_draws_from_the_nucleus_only_and_repeatably():
    first = {START: {1: 0.5, 2: 0.3, 3: 0.15, 4: 0.05}, **{token: {END: 1.0} for token in (1, 2, 3, 4)}}
    model = table_model(*[first] * 300)
    drawn = search("top-p", model, 300, top_p=0.9)
    assert {tokens[0] for tokens in drawn} == {1, 2, 3}  # 0.5 + 0.3 + 0.15 reach 0.9; 4 is outside
    assert search("top-p", model, 300, top_p=0.9) == drawn
    assert search("top-p", model, 300, top_p=0.9, seed=1) != drawn
    assert {tokens[0] for tokens in search("top-p", model, 300, top_p=0.4)} == {1}


@pytest.mark.parametrize("options, parameter", [
    ({"method": "greedy"}, "method"), ({"beam_width": 0}, "beam_width"), ({"max_length": 0}, "max_length"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": 0}, "temperature"),
    ({"no_repeat_ngram": -1}, "no_repeat_ngram"),
])
def test_bad_options_name_their_parameter(options, parameter):
    with pytest.raises(UsageError, match=f"^{parameter} must"):
        CaptionOptions(**options)


# -- a tiny CoCa --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def held_out() -> tuple[list, list[str]]:
    """Renders the tiny CoCa never saw, four of every class, and their captions."""
    rng = np.random.default_rng(12345)
    pairs = [(render_shape(color, shape, rng), caption_for(color, shape))
             for color, shape in CLASSES for _ in range(4)]
    return [image for image, _ in pairs], [caption for _, caption in pairs]


def captioner(spec: str, **options) -> Captioner:
    return load_captioner(ModelSpec.parse(spec), CaptionOptions(max_length=MAX_LENGTH, **options), "cpu")


def test_trained_tiny_coca_captions_renders_it_never_saw(trained_coca, held_out):
    images, truths = held_out
    written = captioner(trained_coca).caption_images(images)
    exact = np.mean([caption == truth for caption, truth in zip(written, truths)])
    assert exact >= 0.9, list(zip(written, truths))


def test_top_p_captions_are_well_formed(trained_coca, held_out):
    images, truths = held_out
    written = captioner(trained_coca, method="top-p").caption_images(images)
    assert len(written) == len(images)
    for caption in written:
        words = caption.split()
        assert 1 <= len(words) <= MAX_LENGTH and set(words) <= WORDS, caption
    assert np.mean([caption == truth for caption, truth in zip(written, truths)]) >= 0.5


def test_batches_caption_as_one_image_at_a_time(trained_coca, held_out):
    images = held_out[0][::3]
    model = captioner(trained_coca, beam_width=4)
    singly = [model.caption_tensors(model.preprocess_image(image)[None])[0] for image in images]
    assert model.caption_tensors(torch.stack([model.preprocess_image(image) for image in images])) == singly
    assert model.caption_images([]) == []


def test_every_way_of_naming_a_coca_model_captions_alike(trained_coca, held_out, tmp_path, monkeypatch):
    images = held_out[0][::4]
    expected = captioner(trained_coca).caption_images(images)
    folder = Path(trained_coca.removeprefix("local-dir:"))

    # A registered architecture name with a checkpoint file.
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "tiny-coca-test.json").write_text(json.dumps(TINY_COCA_CFG))
    open_clip.add_model_config(configs)
    model, _, _ = open_clip.create_model_and_transforms(trained_coca)
    checkpoint = tmp_path / "tiny-coca.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    by_checkpoint = load_captioner(caption_model_spec("tiny-coca-test", str(checkpoint)),
                                   CaptionOptions(max_length=MAX_LENGTH), "cpu")
    assert by_checkpoint.identity == f"tiny-coca-test@{checkpoint}"

    # An hf-hub repository, offline, from a Hugging Face cache that holds it.
    repository = tmp_path / "hub" / "models--someone--tiny-coca"
    revision = "0" * 40
    shutil.copytree(folder, repository / "snapshots" / revision)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    by_hub = load_captioner(caption_model_spec("hf-hub:someone/tiny-coca"),
                            CaptionOptions(max_length=MAX_LENGTH), "cpu")
    assert by_hub.identity == "hf-hub:someone/tiny-coca"

    assert by_checkpoint.caption_images(images) == expected
    assert by_hub.caption_images(images) == expected


def test_a_model_without_caption_decoder_is_refused_in_one_line(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    for spec in (ModelSpec.parse(tiny_model), caption_model_spec("ViT-B-32")):
        # Refused from its configuration, before any weights are sought.
        with pytest.raises(ModelLoadError, match="is not a CoCa model") as raised:
            load_captioner(spec, device="cpu")
        assert "\n" not in str(raised.value) and "`caption_model`" in str(raised.value)
    with pytest.raises(ModelLoadError, match="is not a CoCa model"):
        Captioner(load_encoder(ModelSpec.parse(tiny_model), "cpu"))


def test_offline_the_default_caption_model_fails_in_one_line_before_it_is_built(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def built(*args, **kwargs):
        raise AssertionError("the model was built before its weights were found")

    monkeypatch.setattr(open_clip.CoCa, "__init__", built)
    spec = caption_model_spec()
    with pytest.raises(ModelLoadError) as raised:
        load_captioner(spec, device="cpu")
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"could not load weights for caption model {spec.identity}")
    assert "`caption_pretrained` /path/to/checkpoint" in message and "`caption_model` local-dir:" in message


@torch.inference_mode()
def test_stepwise_decoding_gives_the_full_forwards_log_probabilities():
    model, preprocess, tokenizer = create_tiny_coca(seed=5)
    torch.nn.init.normal_(model.text_decoder.text_projection, std=0.5)  # open_clip leaves it unset
    model.eval()
    images, _ = render_batch(1, np.random.default_rng(5), preprocess)
    _, image_tokens = model.visual(images[:3])
    assert can_decode_stepwise(model)
    stepwise, full = caption_decoder(model, image_tokens), caption_decoder(model, image_tokens, cached=False)
    start = tokenizer([""])[0, 0].item()
    rows, tokens, parents = torch.arange(3), torch.full((3, 1), start), None
    # Rows fork, die and reorder between calls, as beams do; images run out, as they finish.
    for step_parents in ([0, 0, 1, 1, 2, 2], [2, 3, 4, 5], [0, 1, 2], [2, 0], [1, 1, 0]):
        expected = full(rows, tokens, parents)
        torch.testing.assert_close(stepwise(rows, tokens, parents), expected, atol=1e-5, rtol=1e-5)
        parents = torch.tensor(step_parents)
        rows = rows[parents]
        tokens = torch.cat([tokens[parents], expected[parents].argsort(dim=-1)[:, -2:-1]], dim=1)


def test_max_length_beyond_the_models_context_is_refused(trained_coca):
    with pytest.raises(UsageError, match="max_length must be at most 11 for caption model local-dir:"):
        load_captioner(ModelSpec.parse(trained_coca), CaptionOptions(max_length=12), "cpu")


def test_coca_loss_is_open_clips_loss_on_the_full_forward():
    model, preprocess, tokenizer = create_tiny_coca(seed=3)
    images, labels = render_batch(1, np.random.default_rng(3), preprocess)
    captions = [caption_for(*CLASSES[label]) for label in labels.tolist()]
    captions[0] = "a red circle on a light grey ground"  # captions of several lengths
    tokens = tokenizer(captions)
    loss = coca_loss(model, images, tokens, caption_weight=2.0, contrastive_weight=0.5)
    contrastive, caption = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=0.5)(**model(images, tokens))
    torch.testing.assert_close(loss.contrastive, contrastive)
    torch.testing.assert_close(loss.caption, caption)
    torch.testing.assert_close(loss.total, contrastive + caption)
    loss.total.backward()
    for tower in (model.visual, model.text, model.text_decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
