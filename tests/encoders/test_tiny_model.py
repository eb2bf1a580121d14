"""The tiny CLIP test fixture round-trips through open_clip's local-dir loader
and, once trained, retrieves held-out synthetic renders by caption."""

from pathlib import Path

import open_clip
import torch
from support.tiny_model import create_tiny_clip, evaluate_recall, write_local_dir_model

# Differs from the training seed, so evaluation renders are unseen.
HELD_OUT_SEED = 12345


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_untrained_model_round_trips_through_local_dir(tmp_path: Path) -> None:
    spec = write_local_dir_model(tmp_path / "tiny", seed=3)
    assert spec == f"local-dir:{(tmp_path / 'tiny').resolve()}"

    reloaded, _, preprocess = open_clip.create_model_and_transforms(spec)
    _assert_same_state(reloaded.state_dict(), create_tiny_clip(seed=3)[0].state_dict())
    # open_clip silently random-initialises when it finds no weights file, so
    # also check the seed actually matters.
    assert not torch.equal(reloaded.visual.conv1.weight, create_tiny_clip(seed=4)[0].visual.conv1.weight)

    tokens = open_clip.get_tokenizer(spec)(["a red circle"])
    assert tokens.shape == (1, 77)
    with torch.no_grad():
        assert reloaded.encode_text(tokens).shape == (1, 32)
    assert preprocess.transforms[0].size == 32


def test_trained_model_retrieves_held_out_renders(trained_clip: torch.nn.Module, trained_model: str) -> None:
    # The session's trained model (train_tiny_clip(seed=0)), written by write_local_dir_model.
    reloaded, _, preprocess = open_clip.create_model_and_transforms(trained_model)
    _assert_same_state(reloaded.state_dict(), trained_clip.state_dict())
    text_to_image, image_to_text = evaluate_recall(
        reloaded, preprocess, open_clip.get_tokenizer(trained_model), seed=HELD_OUT_SEED
    )
    assert text_to_image >= 0.9
    assert image_to_text >= 0.9
