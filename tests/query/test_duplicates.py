"""Duplicate finding on planted copies (resized, JPEG q60, 90% crops, brightness +-10%, mirrored,
byte-for-byte copies) of distinct renders, indexed with the trained tiny model; the CLI's
every option, the plan and script it writes, and deduplicated search."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.planted import plant_copies
from support.serving import local_client
from support.tiny_model import CLASSES, render_shape

import retrieval.build.builder
import retrieval.media.images
from retrieval import Index
from retrieval.cli import cli
from retrieval.core.paths import display_path
from retrieval.core.types import Hit
from retrieval.query import duplicates
from retrieval.query.duplicates import (
    collapse_hits,
    connected_groups,
    exact_pairs,
    hash_bytes,
    hash_pairs,
    similar_pairs,
)
from retrieval.query.filters import FilterError
from retrieval.serve.app import create_app

# pHash needs imagehash (a dependency: a fresh install has it); without it those tests are skipped.
needs_imagehash = pytest.mark.skipif(not retrieval.media.images.hashing_available(),
                                     reason="imagehash is not installed: pip install -e .")
GROUPS = 6  # classes with planted copies; the other classes' renders stand alone
OLD = 1_000_000_000  # originals are older than their copies, as in a real library


def true_pairs(truth: dict[str, int]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in itertools.combinations(sorted(truth), 2) if truth[a] == truth[b]}


def found_pairs(groups) -> set[tuple[str, str]]:
    return {pair for g in groups for pair in itertools.combinations(sorted(f.path for f in g.files), 2)}


def precision_recall(groups, truth: dict[str, int]) -> tuple[float, float]:
    found, true = found_pairs(groups), true_pairs(truth)
    return len(found & true) / max(1, len(found)), len(found & true) / len(true)


def duplicate_groups(index: Index) -> dict[str, int]:
    """The number of the `duplicates` group of every image in one."""
    return {file.path: number for number, group in enumerate(index.duplicates().groups)
            for file in group.files}


def plant(folder: Path) -> dict[str, int]:
    """Renders of each class (names with a space and a quote, as shells dislike), copies of the
    first GROUPS; returns the group number of every file."""
    rng = np.random.default_rng(7)
    truth = {}
    for number, (colour, shape) in enumerate(CLASSES):
        original = folder / f"{colour} {shape}'s.png"
        folder.mkdir(parents=True, exist_ok=True)
        render_shape(colour, shape, rng, size=128).save(original)
        os.utime(original, (OLD, OLD))
        copies = plant_copies(original, folder / "copies") if number < GROUPS else []
        for path in [original, *copies]:
            truth[str(path)] = number
    return truth


@pytest.fixture(scope="module")
def planted(tmp_path_factory, trained_model) -> tuple[Path, Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("planted")
    truth = plant(root / "photos")
    with Index.open(root / "index", model=trained_model, create=True) as index:
        index.add(root / "photos")
    return root / "photos", root / "index", truth


def test_planted_duplicates_are_found_with_the_default_threshold(planted):
    photos, folder, truth = planted
    with Index.open(folder, readonly=True) as index:
        found = index.duplicates()
    precision, recall = precision_recall(found.groups, truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert found.images == len(truth) and found.unmeasured == 0
    assert [len(g.files) for g in found.groups] == sorted((len(g.files) for g in found.groups), reverse=True)
    for group in found.groups:  # the original: largest resolution (tied with edits), then oldest
        assert "copies" not in group.keep.path and group.keep.width == 128
        assert group.reason.startswith("largest resolution (128x128)") and "oldest" in group.reason


def test_exact_copies_are_grouped_whatever_the_threshold(planted):
    photos, folder, truth = planted
    with Index.open(folder, readonly=True) as index:
        found = index.duplicates(threshold=1.0)
    copies = {(str(p), str(p.parent.parent / p.name.replace("-copy", "")))
              for p in (photos / "copies").glob("*-copy.png")}
    found_groups = {tuple(sorted(f.path for f in g.files)) for g in found.groups}
    assert found_groups == {tuple(sorted(c)) for c in copies}
    assert all(g.exact and g.reason.startswith("exact copies: oldest") for g in found.groups)


@needs_imagehash
def test_perceptual_hashes_alone_and_beside_the_vectors(planted):
    photos, folder, truth = planted
    with Index.open(folder, readonly=True) as index:
        by_hash = index.duplicates(by="phash")
        both = index.duplicates(by="both")
        loose = index.duplicates(by="phash", max_distance=64)
    precision, _ = precision_recall(by_hash.groups, truth)
    assert precision >= 0.95  # pHash misses mirrored copies: its recall is not asked for
    assert min(precision_recall(both.groups, truth)) >= 0.95
    assert len(loose.groups) == 1 and len(loose.groups[0].files) == len(truth)  # every hash within 64 bits


def test_under_and_min_size(planted):
    photos, folder, truth = planted
    with Index.open(folder, readonly=True) as index:
        inside = index.duplicates(under=photos / "copies")
        large = index.duplicates(min_size=len(truth))
    assert inside.images == sum("copies" in path for path in truth)
    assert all("/copies/" in f.path for g in inside.groups for f in g.files) and inside.groups
    assert large.groups == []


def test_a_filter_keeps_the_images_it_names(planted):
    photos, folder, truth = planted
    with Index.open(folder, readonly=True) as index:
        inside = index.duplicates(filter="under:copies")  # relative to the indexed folder
        with pytest.raises(FilterError, match="size>lots"):
            index.duplicates(filter="size>lots")
    assert inside.images == sum("copies" in path for path in truth)
    assert all("/copies/" in f.path for g in inside.groups for f in g.files) and inside.groups


def test_plan_and_script_keep_one_file_per_group(planted, tmp_path):
    photos, folder, truth = planted
    with Index.open(folder, readonly=True) as index:
        found = index.duplicates()
    found.write_plan(tmp_path / "plan.json")
    found.write_script(tmp_path / "rm.sh")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [(g["keep"], len(g["remove"]) + 1) for g in plan["groups"]] == [
        (g.keep.path, len(g.files)) for g in found.groups]
    script = (tmp_path / "rm.sh").read_text().splitlines()
    assert script[0] == "#!/bin/sh" and all(line.startswith("#") or not line for line in script[1:])
    removals = [shlex.split(line[2:]) for line in script if line.startswith("# rm -- ")]
    assert sorted(r[2] for r in removals) == sorted(f.path for g in found.groups for f in g.others)
    assert all(os.path.exists(f.path) for g in found.groups for f in g.files)  # nothing removed


def test_bad_arguments_name_the_parameter(planted):
    from retrieval.core.errors import UsageError

    with Index.open(planted[1], readonly=True) as index:
        for arguments, name in [({"by": "colour"}, "by"), ({"threshold": 2}, "threshold"),
                                ({"min_size": 1}, "min_size"), ({"max_distance": 65}, "max_distance")]:
            with pytest.raises(UsageError, match=name):
                index.duplicates(**arguments)


def test_dedup_search_folds_each_group_into_one_hit(planted):
    photos, folder, truth = planted
    with Index.open(folder, readonly=True) as index:
        plain = index.search("a red circle", k=4)
        folded = index.search("a red circle", k=4, dedup=True)
        groups = duplicate_groups(index)
    assert len({truth[h.path] for h in plain}) == 1  # four copies of one picture
    # The groups are those of `duplicates` (which copies reach the threshold depends on the
    # tiny model): one hit each, every other member folded into it.
    assert len(folded) == 4 and len({groups.get(h.path, h.path) for h in folded}) == 4
    first = folded[0]
    assert sorted(d["path"] for d in first.duplicates) == sorted(
        path for path, group in groups.items() if group == groups[first.path] and path != first.path)
    assert {truth[d["path"]] for d in first.duplicates} == {truth[first.path]}


def test_api_search_dedup(planted):
    with local_client(create_app(planted[1])) as client:
        plain = client.get("/api/search", params={"q": "a red circle", "k": 3}).json()
        folded = client.post("/api/search", data={"q": "a red circle", "k": 3, "dedup": "true"}).json()
    assert all(hit["duplicates"] == [] for hit in plain)
    assert folded[0]["duplicates"] and len({h["path"] for h in folded}) == 3


@needs_imagehash
def test_hashes_are_added_by_the_next_build_without_encoding(tmp_path, trained_model, monkeypatch):
    truth = plant(tmp_path / "photos")
    # A build where imagehash is not installed records sizes, but no hashes.
    monkeypatch.setattr(retrieval.media.images, "perceptual_hashes", lambda image: (None, None))
    monkeypatch.setattr(retrieval.media.images, "hashing_available", lambda: False)
    monkeypatch.setattr(retrieval.build.builder, "hashing_available", lambda: False)
    with Index.open(tmp_path / "index", model=trained_model, create=True) as index:
        index.add(tmp_path / "photos")
        with pytest.raises(Exception, match="pip install imagehash"):
            index.duplicates(by="phash")
        assert index.duplicates().unmeasured == 0
    monkeypatch.undo()
    with Index.open(tmp_path / "index") as index:  # no model is loaded to measure them
        monkeypatch.setattr(type(index.context.encoders), "clip", property(lambda self: 1 / 0))
        missing = f"{len(truth)} images of {len(truth)} have no perceptual hash yet"
        with pytest.raises(Exception, match=missing):
            index.duplicates(by="phash")
        report = index.add()
        assert report.images_measured == len({Path(p).read_bytes() for p in truth})
        assert report.images_encoded == 0 and "measured" in report.summary()
        assert index.duplicates(by="phash").groups
        assert index.add().images_measured == 0  # measured once


def test_a_build_measures_an_image_whose_name_is_not_utf8(tmp_path, tiny_model, monkeypatch):
    """Images indexed before their facts were recorded are read again by their stored path,
    which shows bytes that are not UTF-8 as \\xNN: the file it names must be read."""
    photos = tmp_path / "photos"
    photos.mkdir()
    render_shape("red", "circle", np.random.default_rng(0), size=64).save(photos / "plain.png")
    render_shape("blue", "square", np.random.default_rng(1), size=80).save(photos / "odd.png")
    os.rename(photos / "odd.png", bytes(photos) + b"/odd\xff.png")
    # A build where imagehash is not installed: the next build with it reads the files again.
    monkeypatch.setattr(retrieval.media.images, "perceptual_hashes", lambda image: (None, None))
    monkeypatch.setattr(retrieval.build.builder, "hashing_available", lambda: False)
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(photos)
    monkeypatch.undo()
    with Index.open(tmp_path / "index") as index:
        assert index.add().images_measured == 2
        assert all(row.phash for row in index.store.image_files(None))


# -- the command ---------------------------------------------------------------------------------

def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_table_json_csv(planted):
    photos, folder, truth = planted
    code, out, _ = run("duplicates", "--index", folder)
    assert code == 0 and out.startswith(f"{GROUPS} groups of duplicates") and "keep" in out and "why:" in out
    code, out, _ = run("duplicates", "--index", folder, "--json")
    data = json.loads(out)
    assert code == 0 and len(data["groups"]) == GROUPS and data["threshold"] == 0.92
    code, out, _ = run("duplicates", "--index", folder, "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(rows) == sum(len(g["files"]) for g in data["groups"])
    assert sum(int(r["keep"]) for r in rows) == GROUPS
    code, _, err = run("duplicates", "--index", folder, "--json", "--csv")
    assert code == 2 and "one of --json and --csv" in err


@needs_imagehash
def test_cli_options(planted, tmp_path):
    photos, folder, truth = planted

    def groups(*options) -> list[dict]:
        code, out, err = run("duplicates", "--index", folder, "--json", *options)
        assert code == 0, err
        return json.loads(out)["groups"]

    assert all(g["exact"] for g in groups("--threshold", "1"))
    assert groups("--by", "phash", "--max-distance", "0") != groups("--by", "phash", "--max-distance", "64")
    assert len(groups("--by", "both")) == GROUPS
    assert all("/copies/" in f["path"] for g in groups("--under", photos / "copies") for f in g["files"])
    assert groups("--min-size", "100") == []
    assert groups("--filter", "under:copies") == groups("--under", photos / "copies")
    code, _, err = run("duplicates", "--index", folder, "--filter", "size>lots")
    assert code == 2 and "size>lots" in err and len(err.splitlines()) == 1
    code, _, err = run("duplicates", "--index", folder, "--plan", tmp_path / "plan.json",
                       "--script", tmp_path / "rm.sh")
    assert code == 0 and json.loads((tmp_path / "plan.json").read_text())["groups"]
    assert "# rm -- " in (tmp_path / "rm.sh").read_text()
    code, _, err = run("duplicates", "--index", folder, "--plan", tmp_path / "no" / "plan.json")
    assert code == 2 and "cannot write" in err and "Traceback" not in err
    code, _, err = run("duplicates", "--index", folder, "--threshold", "1.5")
    assert code == 2


def test_cli_search_dedup(planted, monkeypatch):
    photos, folder, truth = planted
    monkeypatch.setenv("COLUMNS", "70")  # long paths give way before the note does
    code, out, _ = run("search", "a red circle", "--index", folder, "-k", "3", "--dedup")
    assert code == 0 and "near-duplicates)" in out.splitlines()[0]
    code, out, _ = run("search", "a red circle", "--index", folder, "-k", "3", "--dedup", "--json")
    with Index.open(folder, readonly=True) as index:
        groups = duplicate_groups(index)
    assert len({groups.get(h["path"], h["path"]) for h in json.loads(out)}) == 3
    code, _, err = run("search", "a red circle", "--index", folder, "--dedup", "--entries", "stem")
    assert code == 2 and "--dedup" in err


# -- the pair search alone -----------------------------------------------------------------------

def test_dedup_folds_copies_that_resemble_each_other_only_through_a_third():
    """a ~ b and b ~ c, though a !~ c (a mirrored copy like the original only through a darker
    one): one group, as `duplicates` makes it, kept as its best hit; a hit like none stays."""
    angles = np.radians([0, 20, 40, 90])  # cosines: neighbours 0.94, first and third 0.77
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    hits = [Hit(id=i, modality="image", uri=f"file:///{i}.png", score=1 - i / 10, path=f"/{i}.png")
            for i in range(4)]
    kept = collapse_hits(hits, vectors, threshold=0.9)
    assert [hit.id for hit in kept] == [0, 3]
    assert [d["id"] for d in kept[0].duplicates] == [1, 2] and kept[1].duplicates == []


def test_range_search_finds_planted_pairs_exactly_and_by_cells():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    vectors[2990:] = vectors[:10] + 0.05 * rng.standard_normal((10, 16)).astype(np.float32)
    vectors[1] = vectors[0] * 3  # length does not matter: cosine 1 (and 2991 is like no one now)
    planted = {(i, 2990 + i) for i in range(10) if i != 1} | {(0, 1), (1, 2990)}
    exact = {tuple(p) for p in similar_pairs(vectors, 0.99, batch=700).tolist()}
    assert exact == planted
    assert {tuple(p) for p in similar_pairs(vectors, 0.99, exact_limit=100).tolist()} == planted
    assert connected_groups(3000, np.array(sorted(planted)))[0] == [0, 1, 2990]


def test_the_search_by_cells_finds_what_the_exact_search_finds():
    """On clustered vectors with planted near copies (cosine ~0.97, as in the benchmark), the
    search by cells that large collections get (256 dimensions: PCA to 128 first) finds every
    pair the exact search finds, and no other; the input is left as it was."""
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((40, 256)).astype(np.float32)
    vectors = centres[rng.integers(40, size=4000)] + rng.standard_normal((4000, 256)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    noise = rng.standard_normal((60, 256)).astype(np.float32)
    vectors[-60:] = vectors[:60] + 0.25 * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    before = vectors.copy()
    exact = {tuple(p) for p in similar_pairs(vectors, 0.92).tolist()}
    assert {(i, 3940 + i) for i in range(60)} <= exact
    reported = []
    by_cells = similar_pairs(vectors, 0.92, exact_limit=1000, progress=lambda *done: reported.append(done))
    assert {tuple(p) for p in by_cells.tolist()} == exact
    assert len(by_cells) == len(exact)  # each pair once, though found from both of its ends
    assert reported[-1] == (63, 63)  # sqrt(4000) cells, each reported
    assert np.array_equal(vectors, before)


def test_hash_pairs_count_bits_and_skip_missing_hashes():
    hashes = hash_bytes(["ffff000000000000", "ffff00000000000f", None, "0000000000000000",
                         "ffff000000000000"])
    assert {tuple(p) for p in hash_pairs(hashes, 4).tolist()} == {(0, 1), (0, 4), (1, 4)}
    assert {tuple(p) for p in hash_pairs(hashes, 3).tolist()} == {(0, 4)}
    assert exact_pairs(["a", "b", "a", "", ""]).tolist() == [[0, 2]]


def test_script_removes_files_whose_names_are_not_utf8(tmp_path):
    """The stored path of a name with bytes that are not UTF-8 shows them as \\xNN: the script
    must name the file itself, or its uncommented `rm` misses it (and a file literally named
    with that text would go instead)."""
    odd = os.fsdecode(bytes(tmp_path) + b"/copy\xff 'of'.jpg")
    decoy = tmp_path / "copy\\xff 'of'.jpg"  # the stored text, as a real name
    for path in (odd, decoy):
        Path(path).write_bytes(b"same")
    keep = duplicates.DuplicateFile(1, str(tmp_path / "a.jpg"), 8, 8, 4, 0.0, "d")
    other = duplicates.DuplicateFile(2, display_path(odd), 8, 8, 4, 1.0, "d")
    found = duplicates.Duplicates([duplicates.DuplicateGroup([keep, other], True, "oldest")], 2, "vector",
                                  0.92, 6)
    found.write_script(tmp_path / "rm.sh")
    script = (tmp_path / "rm.sh").read_bytes().replace(b"# rm -- ", b"rm -- ")
    (tmp_path / "run.sh").write_bytes(script)
    assert os.system(f"sh {shlex.quote(str(tmp_path / 'run.sh'))}") == 0
    assert not os.path.exists(odd) and decoy.exists()
