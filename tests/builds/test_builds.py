"""The Python API: building, incremental updates, storage invariants and search."""

from __future__ import annotations

import json
import os
import shutil
import time

import faiss
import numpy as np
import pytest
from support import held_lock, run_cli_process, write_image, write_shape_folder
from support.stored import item_ids, items_by_uri

from retrieval import Index
from retrieval.core.errors import (
    IndexFormatError,
    IndexLockedError,
    IndexNotFoundError,
    ModelLoadError,
    ModelMismatchError,
    UsageError,
)
from retrieval.encoders.spec import ModelSpec
from retrieval.storage.store import Store
from retrieval.storage.vectors import VectorIndex


def build(index_dir, sources, model, **options):
    with Index.open(index_dir, model=model, create=True) as index:
        return index.add(*sources, **options)


def sqlite_ids(index_dir, modality):
    with Index.open(index_dir, readonly=True) as index:
        return item_ids(index.store, modality)


def faiss_ids(index_dir, modality):
    return VectorIndex.load(index_dir / f"{modality}.faiss").ids().tolist()


def assert_consistent(index_dir):
    """Every SQLite item has exactly one FAISS vector and vice versa; the manifest agrees."""
    manifest = json.loads((index_dir / "manifest.json").read_text())
    for modality in ("image", "text"):
        ids = sqlite_ids(index_dir, modality)
        assert faiss_ids(index_dir, modality) == ids
        assert manifest["counts"][modality] == len(ids)
        assert manifest["vectors"][modality]["count"] == len(ids)


def forbid_encoding(monkeypatch):
    """Make any encoder call fail, to prove a build encodes nothing."""
    from retrieval.encoders.clip import ClipEncoder

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was called")

    for name in ("encode_image_tensors", "encode_texts", "encode_images"):
        monkeypatch.setattr(ClipEncoder, name, refuse)


def test_build_indexes_images_captions_and_texts(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    report = build(index_dir, [photo_folder], tiny_model)
    # 6 images, sidecar, captions.tsv, notes.txt
    assert (report.new, report.images_encoded, report.skipped) == (9, 6, [])
    assert report.texts_encoded == 2 + 3 + 2
    with Index.open(index_dir) as index:
        assert index.count("image") == 6 and index.count("text") == 7
        stats = index.stats()
    assert stats["model"]["name"] == tiny_model and stats["dim"] == 32
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["model"]["name"] == tiny_model
    assert manifest["index_type"] == "auto"
    assert manifest["vectors"]["image"]["kind"] == manifest["vectors"]["text"]["kind"] == "flat"
    assert_consistent(index_dir)


def test_captions_link_to_their_images(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with Index.open(index_dir) as index:
        hits = {h.uri: h for h in index.search(image=photo_folder / "city" / "img3.jpg",
                                               target="image", k=6)}
        assert hits[str(photo_folder / "city" / "img3.jpg")].metadata["captions"] == [
            "a yellow picture", "something sunny"]
        assert hits[str(photo_folder / "beach" / "img0.jpg")].text == "a red picture"
        assert hits[str(photo_folder / "beach" / "img1.jpg")].text is None
        captions = index.search(image=photo_folder / "city" / "img4.jpg", target="text", k=7)
    by_text = {hit.text: hit for hit in captions}
    assert by_text["a cyan picture"].metadata["image"] == str(photo_folder / "city" / "img4.jpg")
    assert "image" not in by_text["a note about cats"].metadata


def test_unchanged_rebuild_encodes_nothing(tmp_path, photo_folder, tiny_model, monkeypatch):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    forbid_encoding(monkeypatch)
    report = build(index_dir, [photo_folder], tiny_model)
    assert (report.new, report.changed, report.unchanged, report.removed) == (0, 0, 9, 0)
    # Touched files are read and hashed, but their content is known: still no encoding.
    for path in photo_folder.rglob("*.jpg"):
        os.utime(path, (time.time() + 10, time.time() + 10))
    report = build(index_dir, [photo_folder], tiny_model)
    assert (report.new, report.changed, report.unchanged) == (0, 0, 9)
    assert_consistent(index_dir)


def test_an_unchanged_reindex_imports_neither_torch_nor_open_clip(tmp_path, photo_folder, tiny_model):
    """Finding nothing to encode takes a tenth of a second; importing torch would take seconds."""
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    result, imported = run_cli_process("index", "--index", index_dir, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["unchanged"] == 9
    assert not {"torch", "open_clip"} & imported


def test_ray_is_not_started_for_a_reindex_with_nothing_to_embed(tmp_path, tiny_model, monkeypatch):
    """Starting Ray takes seconds (20-55 s on a busy 2-core machine) for nothing to do."""
    corpus = write_shape_folder(tmp_path / "shapes", seed=3, per_class=1)
    build(tmp_path / "index", [corpus], tiny_model)

    def refuse(address):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("retrieval.build.ray.connect", refuse)
    with Index.open(tmp_path / "index") as index:
        report = index.add(corpus, engine="ray")
    assert (report.unchanged, report.new, report.skipped) == (10, 0, [])


def test_an_index_left_without_its_vector_size_searches_and_rebuilds(tmp_path, photo_folder,
                                                                       tiny_model):
    """What a Ray build of texts alone once left: vectors stored, vector size 0, no FAISS files.
    Searches, re-indexes and --rebuild then all ended in a traceback."""
    from click.testing import CliRunner

    from retrieval.cli import cli

    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with Index.open(index_dir) as index, index.store.conn:
        index.store.set_info("dim", "0")  # as the Ray build of texts alone once left it
    for leftover in [index_dir / "manifest.json", *index_dir.glob("*.faiss")]:
        leftover.unlink()
    run = CliRunner().invoke
    searched = run(cli, ["a red picture", "--index", str(index_dir), "--target", "text", "--json"])
    assert searched.exit_code == 0, searched.output
    assert len(json.loads(searched.stdout)) == 7  # every caption and text
    reindexed = run(cli, ["index", "--index", str(index_dir), "--json"])
    assert reindexed.exit_code == 0, reindexed.output
    assert json.loads(reindexed.stdout)["unchanged"] == 9
    assert_consistent(index_dir)
    rebuilt = run(cli, ["index", "--index", str(index_dir), "--rebuild", "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.stdout)["new"] == 9  # everything encoded again
    assert_consistent(index_dir)


def test_a_rebuild_with_a_model_that_cannot_be_had_keeps_the_index(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with pytest.raises(ModelLoadError, match="could not load weights for model ViT-B-32"):
        Index.open(index_dir, model="ViT-B-32", rebuild=True)  # offline: nothing cached
    with Index.open(index_dir, readonly=True) as index:
        assert (index.spec.name, index.count("image"), index.count("text")) == (
            ModelSpec.parse(tiny_model).name, 6, 7)


def test_bare_rebuild_rescans_known_sources(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    (photo_folder / "beach" / "img1.jpg").unlink()
    with Index.open(index_dir) as index:
        report = index.add()
    assert report.removed == 1
    assert_consistent(index_dir)


def test_changed_image_keeps_its_id_and_gets_a_new_vector(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    target = photo_folder / "beach" / "img1.jpg"
    with Index.open(index_dir) as index:
        before = index.search(image=target, target="image", k=1)[0]
    write_image(target, (10, 10, 10), size=(64, 64))
    report = build(index_dir, [photo_folder], tiny_model)
    assert (report.changed, report.images_encoded) == (1, 1)
    with Index.open(index_dir) as index:
        after = index.search(image=target, target="image", k=1)[0]
    assert after.id == before.id and after.score == pytest.approx(1.0, abs=1e-5)
    assert_consistent(index_dir)


def test_moved_file_keeps_id_and_vector(tmp_path, photo_folder, tiny_model, monkeypatch):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    old = photo_folder / "beach" / "img2.jpg"
    with Index.open(index_dir) as index:
        before = index.search(image=old, target="image", k=1)[0]
    new = photo_folder / "city" / "renamed.jpg"
    old.rename(new)
    forbid_encoding(monkeypatch)
    report = build(index_dir, [photo_folder], tiny_model)
    assert (report.moved, report.new, report.removed) == (1, 0, 0)
    with Index.open(index_dir) as index:
        rows = index.store.items([before.id])
    assert rows[before.id].uri == str(new)
    assert_consistent(index_dir)


def test_copied_file_reuses_the_vector(tmp_path, photo_folder, tiny_model, monkeypatch):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    shutil.copy(photo_folder / "beach" / "img2.jpg", photo_folder / "copy.jpg")
    forbid_encoding(monkeypatch)
    report = build(index_dir, [photo_folder], tiny_model)
    assert (report.new, report.vectors_reused, report.images_encoded) == (1, 1, 0)
    assert_consistent(index_dir)


def test_deleted_files_leave_sqlite_and_faiss(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    (photo_folder / "city" / "img3.jpg").unlink()
    (photo_folder / "notes.txt").unlink()
    report = build(index_dir, [photo_folder], tiny_model)
    assert report.removed == 2
    with Index.open(index_dir) as index:
        assert index.count("image") == 5 and index.count("text") == 5
        uris = {h.uri for h in index.search("anything", target="image", k=10)}
        orphan = [h for h in index.search("sunny", target="text", k=10) if h.text == "something sunny"]
    assert str(photo_folder / "city" / "img3.jpg") not in uris
    assert "image" not in orphan[0].metadata  # its caption no longer points at a removed image
    assert_consistent(index_dir)


def test_edited_captions_file_updates_only_changed_lines(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    captions = photo_folder / "captions.tsv"
    with Index.open(index_dir) as index:
        kept = next(row.id for row in items_by_uri(index.store, "text").values()
                    if row.text == "a yellow picture")
    captions.write_text("img3.jpg#0\ta yellow picture\nimg4.jpg#0\ta teal picture\n")
    report = build(index_dir, [photo_folder], tiny_model)
    assert (report.changed, report.texts_encoded) == (1, 1)
    with Index.open(index_dir) as index:
        texts = {row.text: row.id for row in items_by_uri(index.store, "text").values()}
    assert texts["a yellow picture"] == kept
    assert "something sunny" not in texts and "a teal picture" in texts
    assert_consistent(index_dir)


def test_remove_forgets_a_folder(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with Index.open(index_dir) as index:
        assert index.remove(photo_folder / "beach") == 4  # 3 images and a sidecar
        assert index.count("image") == 3
    assert (photo_folder / "beach" / "img0.jpg").exists()
    assert_consistent(index_dir)


def test_under_matches_whole_folder_names(tmp_path, tiny_model):
    """`under` was a text prefix: photos/ima matched photos/images/, and photos/images
    matched photos/images2/ too."""
    photos = tmp_path / "photos"
    inside = write_image(photos / "images" / "a.jpg", (200, 10, 10))
    write_image(photos / "images2" / "b.jpg", (10, 200, 10))
    write_image(photos / "imagesque.jpg", (10, 10, 200))
    index_dir = tmp_path / "index"
    build(index_dir, [photos], tiny_model)
    with Index.open(index_dir) as index:
        assert index.search("x", k=5, under=str(photos / "ima")) == []
        assert index.search("x", k=5, under=str(photos / "Images")) == []
        assert [h.path for h in index.search("x", k=5, under=str(photos / "images"))] == [str(inside)]
        assert [h.path for h in index.search("x", k=5, under=f"{photos}/images/")] == [str(inside)]
        assert [h.path for h in index.search("x", k=5, under=str(inside))] == [str(inside)]
        assert index.remove(photos / "ima") == 0
        assert index.remove(photos / "images") == 1
        assert index.count("image") == 2


def test_exclude_dirs_and_hidden_files(tmp_path, photo_folder, tiny_model):
    write_image(photo_folder / ".hidden" / "secret.jpg", (1, 2, 3))
    write_image(photo_folder / ".dotfile.jpg", (1, 2, 3))
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model, exclude=["city"])
    with Index.open(index_dir) as index:
        paths = set(index.store.files_by_path())
    assert {os.path.relpath(p, photo_folder) for p in paths} == {
        "beach/img0.jpg", "beach/img1.jpg", "beach/img2.jpg", "beach/img0.txt", "captions.tsv",
        "notes.txt"}


def test_interrupted_build_opens_and_resumes_without_duplicates(tmp_path, tiny_model,
                                                                monkeypatch):
    source = tmp_path / "many"
    for number in range(40):
        write_image(source / f"{number:02}.png", (number * 6, 100, 255 - number * 6))
    reference_dir = tmp_path / "reference"
    build(reference_dir, [source], tiny_model)

    from retrieval.encoders.clip import ClipEncoder
    real = ClipEncoder.encode_image_tensors
    calls = []

    def crash_on_third_batch(self, pixels):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, pixels)

    monkeypatch.setattr(ClipEncoder, "encode_image_tensors", crash_on_third_batch)
    index_dir = tmp_path / "index"
    with Index.open(index_dir, model=tiny_model, create=True, batch_size=8) as index:
        with pytest.raises(KeyboardInterrupt):
            index.add(source)
    with Index.open(index_dir) as index:
        assert index.count("image") == 16  # two batches committed
        assert len(index.search("anything", k=100)) == 16
    monkeypatch.setattr(ClipEncoder, "encode_image_tensors", real)
    report = build(index_dir, [source], tiny_model)
    assert (report.new, report.unchanged) == (24, 16)
    assert sqlite_ids(index_dir, "image") == sqlite_ids(reference_dir, "image")
    assert_consistent(index_dir)


def test_stale_or_missing_faiss_file_is_rebuilt_from_sqlite(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with Index.open(index_dir) as index:
        expected = [h.id for h in index.search("red", k=6)]
    (index_dir / "image.faiss").unlink()
    (index_dir / "manifest.json").write_text("{ not json")
    with Index.open(index_dir) as index:
        assert [h.id for h in index.search("red", k=6)] == expected
    assert_consistent(index_dir)


def test_other_model_is_refused_unless_rebuilding(tmp_path, photo_folder, tiny_model,
                                                  other_tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with pytest.raises(ModelMismatchError, match="built with model"):
        Index.open(index_dir, model=other_tiny_model)
    with Index.open(index_dir, model=other_tiny_model, rebuild=True) as index:
        report = index.add()
        assert report.images_encoded == 6
        assert index.stats()["model"]["name"] == other_tiny_model
    assert_consistent(index_dir)


def test_second_writer_is_refused_naming_the_first(tmp_path, photo_folder, tiny_model):
    """The refusal once said only "another process"; it names the writer and since when."""
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with Index.open(index_dir) as second:
        with held_lock(index_dir):
            with pytest.raises(IndexLockedError,
                               match=rf"written by pid {os.getpid()} \(.+\) since \d{{4}}-\d\d-\d\d "):
                second.add(photo_folder)
        assert second.add(photo_folder).unchanged == 9  # and once it is done, the second may write


def test_missing_index_is_explained(tmp_path):
    with pytest.raises(IndexNotFoundError, match="retrieve index"):
        Index.open(tmp_path / "nowhere")


def test_bad_files_are_skipped_and_counted_without_losing_items(tmp_path, photo_folder,
                                                                tiny_model, monkeypatch):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    bad = photo_folder / "bad"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.png").write_text("not an image at all")
    good = (photo_folder / "beach" / "img0.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    write_image(bad / "huge.png", (9, 9, 9), size=(1200, 1000))
    write_image(bad / "locked.jpg", (5, 5, 5))
    (bad / "dangling.jpg").symlink_to(bad / "missing-target.jpg")
    import builtins
    real_open = builtins.open

    def deny_locked(path, *args, **kwargs):  # tests run as root, where chmod cannot deny reads
        if str(path).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny_locked)
    report = build(index_dir, [photo_folder], tiny_model, max_megapixels=1.0)
    reasons = {os.path.basename(s.path): s.reason for s in report.skipped}
    assert set(reasons) == {"zero.jpg", "text.png", "truncated.jpg", "huge.png", "locked.jpg",
                            "dangling.jpg"}
    assert reasons["zero.jpg"] == "empty file"
    assert "megapixels" in reasons["huge.png"]
    assert "Permission denied" in reasons["locked.jpg"]
    assert reasons["dangling.jpg"] == "broken symlink"
    assert "truncated" in reasons["truncated.jpg"]
    with Index.open(index_dir) as index:
        assert index.count("image") == 6 and index.count("text") == 7
    assert_consistent(index_dir)


def test_unicode_and_non_utf8_names(tmp_path, tiny_model):
    source = tmp_path / "names"
    write_image(source / "façade 猫.jpg", (200, 100, 0))
    raw = os.fsencode(source) + b"/caf\xe9.jpg"
    write_image(tmp_path / "plain.jpg", (0, 100, 200))
    shutil.copy(tmp_path / "plain.jpg", raw)
    index_dir = tmp_path / "index"
    report = build(index_dir, [source], tiny_model)
    assert (report.new, report.skipped) == (2, [])
    with Index.open(index_dir) as index:
        uris = {hit.uri for hit in index.search("x", k=5)}
    assert uris == {str(source / "façade 猫.jpg"), str(source) + "/caf\\xe9.jpg"}
    assert build(index_dir, [source], tiny_model).unchanged == 2


def test_search_filters(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with Index.open(index_dir) as index:
        beach = index.search("sea", k=10, under=str(photo_folder / "beach"))
        assert {h.path for h in beach} == {str(photo_folder / "beach" / f"img{i}.jpg")
                                           for i in range(3)}
        named = index.search("sea", k=10, where="path LIKE '%img4%'")
        assert [h.uri for h in named] == [str(photo_folder / "city" / "img4.jpg")]
        scores = [h.score for h in index.search("sea", k=10)]
        floor = scores[2]
        assert [h.score for h in index.search("sea", k=10, min_score=floor)] == scores[:3]
        assert index.search("sea", k=10, where="size < 0") == []
        with pytest.raises(UsageError, match="no such column"):
            index.search("sea", where="nonsense_column = 1")
        with pytest.raises(UsageError):
            index.search("sea", where="1; DROP TABLE items")
        assert index.count("image") == 6


def test_targets_and_combined_queries(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    image = photo_folder / "city" / "img5.jpg"
    with Index.open(index_dir) as index:
        assert {h.modality for h in index.search("a cat")} == {"image"}
        assert {h.modality for h in index.search("a cat", target="text")} == {"text"}
        assert {h.modality for h in index.search(image=image)} == {"text"}
        self_hit = index.search(image=image, target="image", k=1)[0]
        assert self_hit.uri == str(image) and self_hit.score == pytest.approx(1.0, abs=1e-5)
        # An image path inside a combined query is an image term.
        assert index.search(f"{image}", target="image", k=1)[0].uri == str(image)
        weighted = index.search("3:a cat", target="text", k=7)
        plain = index.search("a cat", target="text", k=7)
        assert [h.id for h in weighted] == [h.id for h in plain]
        assert [h.score for h in weighted] == pytest.approx([h.score for h in plain], abs=1e-5)
        mixed = index.search(f"a cat - {image}", target="image", k=6)
        assert mixed[-1].uri == str(image)  # subtracting an image pushes it to the bottom
        with pytest.raises(UsageError, match="cancel"):
            index.search("dog - dog")
        with pytest.raises(UsageError, match="target"):
            index.search("dog", target="smell")
        with pytest.raises(UsageError, match="no such file"):
            index.search(image=tmp_path / "missing.jpg")


def test_search_on_an_empty_index(tmp_path, tiny_model):
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        assert index.search("anything") == []


def test_progress_bar_reports_items_per_second(tmp_path, photo_folder, tiny_model, capsys):
    build(tmp_path / "index", [photo_folder], tiny_model, progress=True)
    assert "img/s" in capsys.readouterr().err


def test_vectors_survive_in_sqlite(tmp_path, photo_folder, tiny_model):
    """What FAISS holds can always be recovered from SQLite without the model."""
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    faiss_index = faiss.read_index(str(index_dir / "image.faiss"))
    with Index.open(index_dir, readonly=True) as index:
        ids, vectors = index.store.all_vectors("image")
    assert len(ids) == faiss_index.ntotal == 6
    for item_id, vector in zip(ids, vectors):
        np.testing.assert_array_equal(vector, faiss_index.reconstruct(int(item_id)))


@pytest.mark.parametrize("version, message", [(2, "newer than this version"),
                                              (0, "cannot read; build it again")])
def test_other_format_versions_are_refused(tmp_path, photo_folder, tiny_model, version,
                                           message):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    with Index.open(index_dir) as index, index.store.conn:
        index.store.set_info("format_version", str(version))
    for readonly in (True, False):
        with pytest.raises(IndexFormatError, match=message):
            Index.open(index_dir, readonly=readonly)


def test_newer_manifest_is_refused(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    build(index_dir, [photo_folder], tiny_model)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["format_version"] = 99
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="format version 99"):
        Index.open(index_dir).search("x")


def test_unreadable_database_is_explained(tmp_path):
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / "meta.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(IndexFormatError, match="cannot be read"):
        Index.open(index_dir)


def test_an_index_killed_before_recording_its_model_can_be_read(tmp_path, tiny_model):
    index_dir = tmp_path / "index"
    Index.open(index_dir, model=tiny_model, create=True).close()
    store = Store(index_dir / "meta.sqlite")
    with store.conn:
        for key in ("model_name", "model_pretrained"):
            store.delete_info(key)
    store.close()
    with Index.open(index_dir, readonly=True) as index:
        assert index.search("anything") == []


# -- issue 14: builds that finish, remember what they were told, and redo little -------------


def image_bytes(path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def test_a_non_utf8_name_and_its_escaped_spelling_are_two_files(tmp_path, tiny_model):
    """The bytes a<ff>b.jpg and the name `a\\xffb.jpg` once had one stored path: every build
    ended in `UNIQUE constraint failed` and the rest of the folder was never indexed."""
    source = tmp_path / "names"
    raw = os.fsencode(source) + b"/a\xffb.jpg"
    write_image(source / "a\\xffb.jpg", (200, 10, 10))
    write_image(tmp_path / "blue.jpg", (10, 10, 200))
    shutil.copy(tmp_path / "blue.jpg", raw)
    write_image(source / "z.jpg", (10, 200, 10))
    report = build(tmp_path / "index", [source], tiny_model)
    assert (report.new, report.images_encoded, report.skipped) == (3, 3, [])
    from retrieval.core.paths import path_from_display

    with Index.open(tmp_path / "index") as index:
        hits = index.search("x", k=5)
        # stored and shown escaped, and each names its own file
        assert {hit.uri for hit in hits} == {str(source) + "/a\\xffb.jpg",
                                             str(source) + "/a\\\\xffb.jpg", str(source / "z.jpg")}
        for hit in hits:
            assert image_bytes(path_from_display(hit.uri)) == image_bytes(
                os.fsdecode(raw) if hit.uri.endswith("/a\\xffb.jpg") else
                path_from_display(hit.uri))
        assert image_bytes(path_from_display(str(source) + "/a\\xffb.jpg")) == image_bytes(raw)
        assert index.add(source).unchanged == 3
        os.unlink(raw)
        assert index.add(source).removed == 1
        assert {hit.uri for hit in index.search("x", k=5)} == {
            str(source) + "/a\\\\xffb.jpg", str(source / "z.jpg")}
    assert_consistent(tmp_path / "index")


def test_an_unexpected_error_on_one_file_is_one_warning_and_the_build_goes_on(tmp_path,
                                                                              tiny_model):
    """An image named `notes.jsonl#id=7.jpg` has the uri of record "7.jpg" of notes.jsonl: writing
    the second one fails. That file is skipped with one line, everything else is indexed."""
    from click.testing import CliRunner

    from retrieval.cli import cli

    source = tmp_path / "src"
    write_image(source / "notes.jsonl#id=7.jpg", (200, 10, 10))
    (source / "notes.jsonl").write_text('{"id": "7.jpg", "text": "a red square"}\n')
    (source / "zebra.txt").write_text("read after notes.jsonl\n")
    write_image(source / "z.jpg", (10, 200, 10))
    result = CliRunner().invoke(cli, ["index", str(source), "--index", str(tmp_path / "index"),
                                      "--model", tiny_model])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: skipped {source / 'notes.jsonl'}: unexpected error "
                        "(IntegrityError: UNIQUE constraint failed: items.uri)"]
    with Index.open(tmp_path / "index") as index:
        texts = {hit.text for hit in index.search("x", target="text", k=5)}
        assert (index.count("image"), texts) == (2, {"read after notes.jsonl"})
        assert index.store.file_row(str(source / "notes.jsonl")) is None  # nothing of it was kept
    assert_consistent(tmp_path / "index")


def test_a_bare_build_reads_external_captions_files_again(tmp_path, photo_folder, tiny_model):
    captions = tmp_path / "elsewhere" / "captions.csv"
    captions.parent.mkdir()
    captions.write_text("image,caption\nimg1.jpg,a green picture\n")
    build(tmp_path / "index", [photo_folder], tiny_model, captions=[captions])
    captions.write_text("image,caption\nimg1.jpg,a green picture\nimg2.jpg,a blue picture\n")
    with Index.open(tmp_path / "index") as index:
        report = index.add()
        assert (report.changed, report.texts_encoded) == (1, 1)
        hits = index.search(image=photo_folder / "beach" / "img2.jpg", target="image", k=6)
        by_uri = {hit.uri: hit for hit in hits}
        assert by_uri[str(photo_folder / "beach" / "img2.jpg")].metadata["captions"] == [
            "a blue picture"]
        captions.unlink()  # like a source that is not there (unmounted): kept as it was
        assert index.add().removed == 0
        assert index.remove(captions) == 1
        assert index.store.captions_files() == []
    assert_consistent(tmp_path / "index")


def test_a_bare_build_walks_each_source_as_it_was_told(tmp_path, photo_folder, tiny_model):
    """--include-hidden and --exclude-dir are recorded per source: a bare build once removed
    what they had included, and indexed what they had left out."""
    write_image(photo_folder / ".hidden" / "secret.jpg", (1, 2, 3))
    other = tmp_path / "other"
    write_image(other / ".dot.jpg", (3, 2, 1))
    write_image(other / "city" / "kept.jpg", (5, 5, 5))
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(photo_folder, include_hidden=True, exclude=["city"])
        index.add(other)
        paths = {row.path for row in index.store.files_by_path().values()}

        report = index.add()
        assert (report.new, report.removed) == (0, 0)
        assert {row.path for row in index.store.files_by_path().values()} == paths
        assert str(photo_folder / ".hidden" / "secret.jpg") in paths
        assert str(other / "city" / "kept.jpg") in paths  # excluded in photos only
        assert not any(path.startswith(str(photo_folder / "city")) for path in paths)

        # A source named again is walked as this call says, and recorded so.
        assert index.add(photo_folder).removed == 1
        assert index.add().new == 0
    assert_consistent(tmp_path / "index")


def test_skipped_files_are_not_read_again_until_they_change(tmp_path, photo_folder, tiny_model,
                                                            monkeypatch):
    bad = photo_folder / "bad"
    bad.mkdir()
    (bad / "text.png").write_text("not an image at all")
    write_image(bad / "huge.png", (9, 9, 9), size=(1200, 1000))
    (bad / "zero.jpg").write_bytes(b"")
    (photo_folder / "broken.jsonl").write_text("{not json\n")
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        first = index.add(photo_folder, max_megapixels=1.0)
        assert len(first.skipped) == 4
        from retrieval.build import builder as build_module
        reads = []
        real_read = build_module.read_source
        monkeypatch.setattr(build_module, "read_source", lambda p: reads.append(p) or real_read(p))

        again = index.add(photo_folder, max_megapixels=1.0)
        assert again.skipped == [] and reads == []
        assert again.skipped_unchanged == 4
        assert "4 skipped (4 unchanged since their warning)" in again.summary()

        (bad / "zero.jpg").write_bytes(b"still not an image")  # changed: judged again
        report = index.add(photo_folder, max_megapixels=1.0)
        assert [(os.path.basename(s.path), s.reason) for s in report.skipped] == [
            ("zero.jpg", "not an image PIL can read")]
        assert report.skipped_unchanged == 3

        write_image(bad / "text.png", (1, 200, 1))  # mended: indexed, and forgotten as bad
        assert index.add(photo_folder, max_megapixels=1.0).images_encoded == 1
        report = index.add(photo_folder)  # another limit: images are judged again
        assert (report.images_encoded, report.skipped_unchanged) == (1, 1)  # huge.png fits
        assert [os.path.basename(s.path) for s in report.skipped] == ["zero.jpg"]
        assert set(index.store.skipped_files()) == {str(bad / "zero.jpg"),
                                                    str(photo_folder / "broken.jsonl")}
        index.remove(bad)
        assert set(index.store.skipped_files()) == {str(photo_folder / "broken.jsonl")}


def test_copies_added_in_one_run_are_encoded_once(tmp_path, tiny_model):
    source = tmp_path / "src"
    write_image(source / "a.jpg", (200, 10, 10))
    write_image(source / "b.jpg", (10, 200, 10))
    for name in ("copy1.jpg", "sub/copy2.jpg"):
        (source / name).parent.mkdir(exist_ok=True)
        shutil.copy(source / "a.jpg", source / name)
    (source / "bad.png").write_text("not an image")
    shutil.copy(source / "bad.png", source / "bad-copy.png")
    report = build(tmp_path / "index", [source], tiny_model)
    assert (report.new, report.images_encoded, report.vectors_reused) == (4, 2, 2)
    assert sorted((os.path.basename(s.path), s.reason) for s in report.skipped) == [
        ("bad-copy.png", "not an image PIL can read"),
        ("bad.png", "not an image PIL can read")]
    with Index.open(tmp_path / "index") as index:
        vectors = {hit.uri: index.item_vector(hit.id)[1] for hit in index.search("x", k=5)}
    np.testing.assert_array_equal(vectors[str(source / "copy1.jpg")], vectors[str(source / "a.jpg")])
    np.testing.assert_array_equal(vectors[str(source / "sub/copy2.jpg")], vectors[str(source / "a.jpg")])
    assert_consistent(tmp_path / "index")


def test_an_interrupted_caption_file_resumes_where_it_stopped(tmp_path, tiny_model, monkeypatch):
    """A captions file is committed a batch at a time: after a crash once 16 captions were
    encoded, the next build, a bare one, encodes only the captions that were not committed."""
    source = tmp_path / "src"
    write_image(source / "a.jpg", (200, 10, 10))
    captions = tmp_path / "captions.tsv"  # outside the source: recorded as the build begins
    captions.write_text("".join(f"a.jpg#{n}\tcaption number {n}\n" for n in range(40)))
    from retrieval.encoders.clip import ClipEncoder
    real = ClipEncoder.encode_texts
    encoded = []

    def crash_after_16_texts(self, texts):
        if len(encoded) + len(texts) > 16:
            raise KeyboardInterrupt
        encoded.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(ClipEncoder, "encode_texts", crash_after_16_texts)
    with Index.open(tmp_path / "index", model=tiny_model, create=True, batch_size=8) as index:
        with pytest.raises(KeyboardInterrupt):
            index.add(source, captions=[captions])
    monkeypatch.setattr(ClipEncoder, "encode_texts", real)
    with Index.open(tmp_path / "index", batch_size=8) as index:
        assert index.count("text") == 16
        report = index.add()
        assert (report.texts_encoded, report.new, index.count("text")) == (24, 1, 40)
        assert index.add().unchanged == 2
        hits = index.search(image=source / "a.jpg", target="image", k=1)
        assert len(hits[0].metadata["captions"]) == 40
    assert_consistent(tmp_path / "index")
