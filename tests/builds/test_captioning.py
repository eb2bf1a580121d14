"""Captions a CoCa model writes at build time: right for held-out renders, searchable from text
and from the image, told apart from human captions, incremental, and refused in one line
offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import offline_env, run_cli_process, write_shape_folder
from support.tiny_model import CLASSES, caption_for, render_shape

from retrieval import Index
from retrieval.core.errors import ModelLoadError, UsageError

MAX_LENGTH = 8  # the tiny CoCa's context holds 11 caption tokens


def uncaptioned_shapes(root: Path, seed: int = 777, per_class: int = 2) -> Path:
    """Held-out renders of every class, without any human caption."""
    folder = write_shape_folder(root, seed, per_class)
    (folder / "captions.tsv").unlink()
    return folder


def truth(path: str) -> str:
    color, shape, _ = Path(path).stem.split("_")
    return caption_for(color, shape)


def written_captions(index: Index) -> dict[str, dict]:
    """Image path -> its written caption's hit (searched by its own image's vector)."""
    found = {}
    for hit in index.search("a", target="text", k=1000):
        if hit.generated:
            found[hit.metadata["image"]] = hit
    return found


@pytest.fixture(scope="module")
def captioned(trained_model, trained_coca, tmp_path_factory) -> tuple[Path, Path]:
    """An index of held-out renders, every one captioned by the trained tiny CoCa."""
    root = tmp_path_factory.mktemp("captioned")
    shapes = uncaptioned_shapes(root / "shapes")
    with Index.open(root / "index", model=trained_model, create=True, batch_size=8) as index:
        report = index.add(shapes, caption=True, caption_model=trained_coca, caption_max_length=MAX_LENGTH)
    assert report.captions_written == 2 * len(CLASSES)
    return root / "index", shapes


def test_written_captions_say_what_the_renders_show(captioned):
    index_dir, shapes = captioned
    with Index.open(index_dir, readonly=True) as index:
        captions = written_captions(index)
    assert sorted(captions) == sorted(str(path) for path in shapes.glob("*.png"))
    right = sum(hit.text == truth(image) for image, hit in captions.items())
    assert right / len(captions) >= 0.9, {image: hit.text for image, hit in captions.items()}


def test_written_captions_are_found_by_text_and_from_their_image(captioned):
    index_dir, shapes = captioned
    with Index.open(index_dir, readonly=True) as index:
        found = {}
        for color, shape in CLASSES:
            best = index.search(caption_for(color, shape), target="text", k=1)[0]
            assert best.generated and best.text == caption_for(color, shape)
            found[caption_for(color, shape)] = truth(best.metadata["image"])
        # The captions are right for nearly every render (see above): so are the images found.
        assert sum(query == image for query, image in found.items()) >= len(CLASSES) - 1, found
        rng = np.random.default_rng(4242)  # a render no index holds
        query = shapes.parent / "query.png"
        render_shape("green", "triangle", rng).save(query)
        best = index.search(image=str(query), target="text", k=1)[0]
        assert best.generated and best.text == "a green triangle"
        # An image hit shows its written caption, marked as such, and names the model.
        image_hit = index.search("a blue square", target="image", k=1)[0]
        assert image_hit.generated and image_hit.text == "a blue square"
        assert image_hit.metadata["captions"] == []
        assert image_hit.metadata["generated_caption"] == image_hit.text


def test_cli_table_and_json_mark_written_captions(captioned, trained_coca):
    index_dir, _ = captioned
    result, _ = run_cli_process("a red circle", "--index", index_dir, "--target", "text", "-k", "1", "--json")
    assert result.returncode == 0, result.stderr
    [hit] = json.loads(result.stdout)
    assert hit["generated"] is True and hit["text"] == "a red circle"
    assert hit["metadata"]["caption_model"].startswith("local-dir:") and "image_hash" not in hit["metadata"]
    table, _ = run_cli_process("a red circle", "--index", index_dir, "--target", "text", "-k", "1",
                               env={**os.environ, "COLUMNS": "1000"})
    assert "[generated] a red circle" in table.stdout
    info, _ = run_cli_process("info", "--index", index_dir)
    assert f"captions {2 * len(CLASSES)} written by a model" in info.stdout


def test_human_captions_are_kept_apart_and_spare_their_image(tiny_model, tiny_coca, tmp_path):
    shapes = write_shape_folder(tmp_path / "shapes", seed=5, per_class=1)  # each has a human caption
    extra = render_shape("red", "circle", np.random.default_rng(6))
    extra.save(shapes / "uncaptioned.png")
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        report = index.add(shapes, caption=True, caption_model=tiny_coca, caption_max_length=3)
        assert report.captions_written == 1  # only the image without a human caption
        hits = index.search("a red circle", target="text", k=len(CLASSES) + 1)
        assert {hit.uri for hit in hits if hit.generated} == {f"{shapes / 'uncaptioned.png'}#caption"}
        assert all(not hit.generated for hit in hits if not hit.uri.endswith("#caption"))
        # --caption-all: every image, beside its human captions (which stay first on its hit)
        report = index.add(caption_every_image=True)
        assert report.captions_written == len(CLASSES)
        image = index.search(image=str(shapes / "red_circle_0.png"), target="image", k=1)[0]
        assert image.text == "a red circle" and not image.generated and image.metadata["generated_caption"]


def test_an_image_whose_name_is_not_utf8_gets_its_caption(tiny_model, tiny_coca, tmp_path):
    """The store keeps such a name as \\xNN text: the captioner must read the file it names."""
    shapes = uncaptioned_shapes(tmp_path / "shapes", per_class=1)
    odd = os.fsencode(shapes) + b"/odd\xff.png"
    os.rename(shapes / "red_circle_0.png", odd)
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        report = index.add(shapes, caption=True, caption_model=tiny_coca, caption_max_length=3)
    assert report.skipped == [] and report.captions_written == len(CLASSES)


def test_captions_follow_images_incrementally(tiny_model, tiny_coca, tmp_path):
    shapes = uncaptioned_shapes(tmp_path / "shapes", per_class=1)
    other = tmp_path / "other-coca"  # the same weights under another identity: another model
    shutil.copytree(tiny_coca.removeprefix("local-dir:"), other)
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        first = index.add(shapes, caption=True, caption_model=tiny_coca, caption_max_length=3)
        assert first.captions_written == len(CLASSES)

        def captions() -> dict[str, tuple[str, str]]:
            rows = index.search("a", target="text", k=100)
            return {hit.metadata["image"]: (hit.text, hit.metadata["caption_model"]) for hit in rows}

        before = captions()
        # Unchanged: nothing is written; the recorded request needs no option.
        assert index.add().captions_written == 0 and captions() == before
        # New, changed, moved and removed images.
        render_shape("blue", "circle", np.random.default_rng(99)).save(shapes / "new.png")
        changed = shapes / "red_circle_0.png"
        render_shape("green", "square", np.random.default_rng(98)).save(changed)
        (shapes / "green_square_0.png").rename(shapes / "moved.png")
        (shapes / "blue_square_0.png").unlink()
        report = index.add()
        assert report.captions_written == 2 and report.moved == 1
        after = captions()
        gone = {str(shapes / "green_square_0.png"), str(shapes / "blue_square_0.png")}
        assert set(after) == set(before) - gone | {str(shapes / "new.png"), str(shapes / "moved.png")}
        assert after[str(shapes / "moved.png")] == before[str(shapes / "green_square_0.png")]
        assert index.count("text") == len(after)  # no caption left behind, none twice
        # Another caption model: new images only, unless asked to recaption.
        assert index.add(caption_model=f"local-dir:{other}").captions_written == 0
        assert {model for _, model in captions().values()} == {tiny_coca}
        report = index.add(recaption=True)
        assert report.captions_written == len(after)
        assert {model for _, model in captions().values()} == {f"local-dir:{other}"}
        assert index.count("text") == len(after)
        # Stopped: nothing written, but a changed image's caption no longer describes it: it goes.
        render_shape("red", "square", np.random.default_rng(97)).save(shapes / "new.png")
        assert index.add(caption=False).captions_written == 0
        assert str(shapes / "new.png") not in captions() and index.count("text") == len(after) - 1


def test_a_copy_reuses_the_caption_of_its_content(tiny_model, tiny_coca, tmp_path):
    shapes = uncaptioned_shapes(tmp_path / "shapes", per_class=1)
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(shapes, caption=True, caption_model=tiny_coca, caption_max_length=3)
        shutil.copy(shapes / "red_circle_0.png", shapes / "copy.png")
        report = index.add()
        assert report.captions_written == 0 and report.captions_reused == 1
        texts = {hit.metadata["image"]: hit.text for hit in index.search("a", target="text", k=100)}
        assert texts[str(shapes / "copy.png")] == texts[str(shapes / "red_circle_0.png")]


def test_bad_caption_requests_are_refused_in_one_line(tiny_model, tmp_path):
    shapes = uncaptioned_shapes(tmp_path / "shapes", per_class=1)
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        with pytest.raises(ModelLoadError, match="is not a CoCa model") as raised:
            index.add(shapes, caption=True, caption_model=tiny_model)
        assert "\n" not in str(raised.value)
        with pytest.raises(UsageError, match="^method must be one of beam, top-p"):
            index.add(shapes, caption=True, caption_method="greedy")
        with pytest.raises(UsageError, match="`caption` False writes no captions"):
            index.add(shapes, caption=False, caption_model=tiny_model)


def test_a_caption_length_the_model_cannot_hold_is_refused_before_it_is_recorded(tiny_model, tiny_coca,
                                                                                 tmp_path):
    """Refused at once, naming the parameter, and not recorded: a later plain build works."""
    shapes = uncaptioned_shapes(tmp_path / "shapes", per_class=1)
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        with pytest.raises(UsageError, match="^`caption_max_length` must be at most 21 for caption model"):
            index.add(shapes, caption=True, caption_model=tiny_coca, caption_max_length=30)
        assert index.stats()["captioning"] is None
        assert index.add(shapes).images_encoded == len(CLASSES)


def test_offline_the_default_caption_model_fails_in_one_line(tiny_model, tmp_path):
    shapes = uncaptioned_shapes(tmp_path / "shapes", per_class=1)
    result, imported = run_cli_process("index", shapes, "--index", tmp_path / "index", "--model",
                                       tiny_model, "--caption", env=offline_env(tmp_path))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("error: could not load weights for caption model "
                           "coca_ViT-B-32@mscoco_finetuned_laion2b_s13b_b90k")
    assert "--caption-pretrained /path/to/checkpoint" in line and "--caption-model local-dir:" in line
    assert "torch" not in imported  # refused before any model is built
