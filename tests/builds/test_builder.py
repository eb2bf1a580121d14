"""The builder's decisions, seen at the encoder: what a build encodes, reuses, moves, keeps and
forgets, on a few tiny files (the end-to-end builds are in test_builds.py)."""

from __future__ import annotations

import gc
import os
import shutil
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import write_image
from support.recording import record_encoding

from retrieval import Index, context
from retrieval.build import builder
from retrieval.build.builder import Builder, BuildOptions
from retrieval.encoders import onnx_towers


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "pictures"
    for number in range(3):
        write_image(root / f"p{number}.png", (70 * number, 20, 200))
    (root / "notes.txt").write_text("first line\nsecond line\n")
    return root


@pytest.fixture
def index(tmp_path, tiny_model):
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as opened:
        yield opened


def build(index: Index, *sources: Path, **options):
    """One build of `sources` by a Builder of its own, with encoders that record their work."""
    encoders = record_encoding(index.context)
    with index.context.write_lock():
        report = Builder(index.context, BuildOptions(workers=1, **options)).run(sources, [])
    return report, encoders.recording.images, sorted(encoders.recording.texts)


def test_a_first_build_encodes_each_image_and_line_once(index, folder):
    report, images, texts = build(index, folder)
    assert (report.new, images, texts) == (4, 3, ["first line", "second line"])
    assert (report.images_encoded, report.texts_encoded) == (3, 2)
    assert index.count("image") == len(index.vectors("image")) == 3


def test_an_unchanged_folder_reaches_no_encoder(index, folder):
    build(index, folder)
    report, images, texts = build(index, folder)
    assert (report.unchanged, report.new, images, texts) == (4, 0, 0, [])


def test_a_touched_file_with_the_same_content_is_not_encoded(index, folder):
    build(index, folder)
    stat = (folder / "p1.png").stat()
    os.utime(folder / "p1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    report, images, _ = build(index, folder)
    assert (report.unchanged, report.changed, images) == (4, 0, 0)


def test_a_moved_file_keeps_its_item_and_vector(index, folder):
    build(index, folder)
    before = index.search(image=folder / "p2.png", target="image", k=1)[0]
    (folder / "sub").mkdir()
    (folder / "p2.png").rename(folder / "sub" / "moved.png")
    report, images, _ = build(index, folder)
    assert (report.moved, report.removed, images) == (1, 0, 0)
    after = index.item(before.id)
    assert after.path == str(folder / "sub" / "moved.png")


def test_copies_in_one_run_are_encoded_once(index, folder, tmp_path):
    for number in range(3):
        shutil.copy(folder / "p0.png", folder / f"copy{number}.png")
    report, images, texts = build(index, folder)
    assert (report.new, images, report.vectors_reused) == (7, 3, 3)
    ids, vectors = index.store.all_vectors("image")
    assert len(ids) == 6 and len({v.tobytes() for v in vectors}) == 3


def test_a_changed_file_is_encoded_again_and_only_it(index, folder):
    build(index, folder)
    write_image(folder / "p0.png", (1, 250, 1))
    with open(folder / "notes.txt", "a") as notes:
        notes.write("third line\n")
    report, images, texts = build(index, folder)
    assert (report.changed, images, texts) == (2, 1, ["third line"])  # the other lines are reused
    assert index.count("text") == 3


def test_a_file_gone_from_the_source_is_forgotten(index, folder):
    build(index, folder)
    (folder / "p1.png").unlink()
    report, images, _ = build(index, folder)
    assert (report.removed, images) == (1, 0)
    assert index.count("image") == len(index.vectors("image")) == 2


def test_a_bad_file_is_skipped_and_not_read_again_until_it_changes(index, folder):
    (folder / "bad.png").write_bytes(b"\x89PNG not really")
    report, _, _ = build(index, folder)
    assert [Path(s.path).name for s in report.skipped] == ["bad.png"]
    again, _, _ = build(index, folder)
    assert (again.skipped, again.skipped_unchanged) == ([], 1)
    judged, images, _ = build(index, folder, max_megapixels=50)  # under another limit: read again
    assert [Path(s.path).name for s in judged.skipped] == ["bad.png"]
    assert (images, judged.unchanged) == (0, 4)  # indexed files stay as they are


def test_vectors_are_the_models(index, folder):
    build(index, folder)
    encoder = index.encoder
    stored = index.store.vectors_for_ids(np.array([index.search(image=folder / "p0.png", target="image",
                                                                k=1)[0].id]))
    expected = encoder.encode_images([Image.open(folder / "p0.png").convert("RGB")])
    assert np.allclose(stored, expected, atol=1e-5)


def test_the_image_tower_is_let_go_before_the_text_tower_opens(index, folder, monkeypatch):
    """A build holds one tower at a time: the image tower's session is gone (no longer
    referenced anywhere) by the time the texts' tower opens, and the build still encodes both."""
    load_image_tower, load_text_tower = context.load_image_tower, context.load_text_tower
    image_towers, image_tower_alive = [], []

    def loading_image_tower(*args, **kwargs):
        tower = load_image_tower(*args, **kwargs)
        image_towers.append(weakref.ref(tower))
        return tower

    def loading_text_tower(*args, **kwargs):
        gc.collect()
        image_tower_alive.extend(ref() is not None for ref in image_towers)
        return load_text_tower(*args, **kwargs)

    monkeypatch.setattr(context, "load_image_tower", loading_image_tower)
    monkeypatch.setattr(context, "load_text_tower", loading_text_tower)
    report, images, texts = build(index, folder)
    assert (image_tower_alive, images, texts) == ([False], 3, ["first line", "second line"])


def test_the_image_tower_opens_while_the_build_reads_files(index, folder, monkeypatch):
    """The image tower's session (a second of pre-packing for ViT-B-32) opens while the build
    reads, hashes and decodes the first files: its opening here waits until a file was read,
    which never happens if the build waits for the session before reading."""
    file_read = threading.Event()
    read_source, open_session = builder.read_source, onnx_towers.open_session
    read_before_opening = []

    def reading(path: str) -> bytes:
        file_read.set()
        return read_source(path)

    def opening(path: Path, *args, **kwargs):
        if path.name == onnx_towers.IMAGE_FILE:
            read_before_opening.append(file_read.wait(timeout=30))
        return open_session(path, *args, **kwargs)

    monkeypatch.setattr(builder, "read_source", reading)
    monkeypatch.setattr(onnx_towers, "open_session", opening)
    report, images, _ = build(index, folder)
    assert (read_before_opening, images, report.skipped) == ([True], 3, [])
