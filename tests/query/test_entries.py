"""Entries: files sharing a stem searched as one, where each modality carries only part of the
answer (the picture its shape, in grey; the sound its colour, as pitch), so only fusing them
finds the right entry; parts and contributions reported; the command."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from support.sounds import render_sound, write_captioned_sounds, write_sound
from support.tiny_model import CLASSES, caption_for, render_shape

from retrieval import Index
from retrieval.cli import cli
from retrieval.core.errors import QueryWarning, UsageError
from retrieval.core.types import FUSIONS
from retrieval.query.entries import entry_of
from retrieval.query.filters import FilterError
from retrieval.train.audio import AudioTrainingOptions

PER_CLASS = 2


def write_entries(root: Path) -> Path:
    """Entries `e<class>_<n>`: a grey render of the shape and a steady tone at the colour's pitch."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for number, (color, shape) in enumerate(CLASSES):
        for copy in range(PER_CLASS):
            grey = render_shape(color, shape, rng).convert("L").convert("RGB")
            grey.save(root / f"e{number}_{copy}.png")
            write_sound(root / f"e{number}_{copy}.wav", render_sound(color, "circle", rng))
    return root


@pytest.fixture(scope="module")
def entry_index(tmp_path_factory, trained_model) -> Path:
    root = tmp_path_factory.mktemp("entries")
    with Index.open(root / "index", model=trained_model, create=True) as index:
        index.train_audio(write_captioned_sounds(root / "pairs"), AudioTrainingOptions(
            epochs=15, width=8, n_mels=32, learning_rate=3e-3, held_out=0), reindex=False)
        report = index.add(write_entries(root / "entries"))
        assert report.images_encoded == report.audio_encoded == 9 * PER_CLASS
    return root / "index"


def class_number(path: str) -> int:
    return int(Path(path).stem.split("_")[0][1:])


def recall_at_1(found: list[int]) -> float:
    return float(np.mean([got == want for want, got in enumerate(found)]))


def single_modality(index: Index, modality: str) -> float:
    return recall_at_1([class_number(index.search(caption_for(c, s), target=modality, k=1)[0].path)
                        for c, s in CLASSES])


def fused(index: Index, fusion: str) -> float:
    return recall_at_1([class_number(index.search_entries(caption_for(c, s), fusion=fusion, k=1)[0].entry)
                        for c, s in CLASSES])


def test_fusing_beats_every_single_modality(entry_index):
    with Index.open(entry_index, readonly=True) as index:
        best_single = max(single_modality(index, "image"), single_modality(index, "audio"))
        scores = {fusion: fused(index, fusion) for fusion in FUSIONS if fusion != "attention"}
    assert best_single <= 0.5, best_single  # each part tells only half of the answer
    for fusion in ("rrf", "sum", "mean", "weighted", "concat"):
        assert scores[fusion] >= best_single + 0.2, (fusion, scores, best_single)
    # max keeps one modality's evidence per entry, so it can match the best single one, no more
    assert scores["max"] <= best_single + 1e-9, scores


def test_entry_hits_name_their_parts_and_contributions(entry_index):
    with Index.open(entry_index, readonly=True) as index:
        [hit] = index.search_entries("a blue triangle", fusion="sum", k=1)
        assert set(hit.parts) == {"image", "audio"}
        assert {Path(p.path).stem for p in hit.parts.values()} == {Path(hit.entry).name}
        assert hit.score == pytest.approx(sum(hit.contributions.values()))
        assert hit.contributions["image"] == pytest.approx(hit.parts["image"].score)
        [best] = index.search_entries("a blue triangle", fusion="max", k=1)
        assert len(best.contributions) == 1
        with pytest.raises(UsageError, match="fusion must be one of"):
            index.search_entries("x", fusion="median")
        with pytest.raises(UsageError, match="stem, folder or a manifest file"):
            index.search_entries("x", grouping="day")


def write_things(root: Path) -> Path:
    """Folders `cat` and `dog`, each an image and its text file."""
    for name in ("cat", "dog"):
        folder = root / name
        folder.mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 30, 30) if name == "cat" else (30, 30, 200)).save(folder / "a.png")
        (folder / "a.txt").write_text(f"a photo of a {name}\n")
    return root


def test_folders_as_entries_and_captions_in_their_images_entry(tmp_path, tiny_model):
    write_things(tmp_path / "things")
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(tmp_path / "things")
        caption = index.search("a photo of a cat", target="text", k=1)[0]
        assert entry_of(caption, "stem") == str(tmp_path / "things" / "cat" / "a")
        assert entry_of(caption, "folder") == str(tmp_path / "things" / "cat")
        hits = index.search_entries("a photo of a cat", grouping="folder", k=5)
        assert sorted(h.entry for h in hits) == [str(tmp_path / "things" / n) for n in ("cat", "dog")]
        assert all(set(h.parts) == {"image", "text"} for h in hits)


def test_a_filter_keeps_the_items_entries_are_made_of(tmp_path, tiny_model):
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(write_things(tmp_path / "things"))
        dogs = index.search_entries("a photo of a cat", grouping="folder", k=5, filter="under:dog")
        assert [hit.entry for hit in dogs] == [str(tmp_path / "things" / "dog")]
        for fusion in ("sum", "mean"):  # late and early fusion
            images = index.search_entries("a photo of a cat", grouping="folder", k=5, fusion=fusion,
                                          filter="modality:image")
            assert len(images) == 2 and all(set(h.parts) == set(h.contributions) == {"image"} for h in images)
        with pytest.raises(FilterError, match="size>lots"):
            index.search_entries("a photo", grouping="folder", filter="size>lots")
    runner = CliRunner()
    found = runner.invoke(cli, ["a photo of a cat", "--entries", "folder", "--filter", "under:dog",
                                "--index", str(tmp_path / "index"), "--json"])
    assert found.exit_code == 0, found.output
    assert [hit["entry"] for hit in json.loads(found.stdout)] == [str(tmp_path / "things" / "dog")]
    refused = runner.invoke(cli, ["a photo", "--entries", "folder", "--filter", "size>lots",
                                  "--index", str(tmp_path / "index")])
    assert refused.exit_code == 2 and "size>lots" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_where_and_under_keep_the_items_entries_are_made_of(tmp_path, tiny_model):
    """`retrieve "..." --entries` once ignored --where and --under."""
    things = write_things(tmp_path / "things")
    with Index.open(tmp_path / "index", model=tiny_model, create=True) as index:
        index.add(things)
        under = index.search_entries("a photo of a cat", grouping="folder", k=5, under=things / "dog")
        assert [hit.entry for hit in under] == [str(things / "dog")]
        where = index.search_entries("a photo", grouping="folder", k=5, where="modality = 'image'")
        assert len(where) == 2 and all(set(h.parts) == {"image"} for h in where)
    runner = CliRunner()
    for flags in (["--under", str(things / "dog")], ["--where", "path LIKE '%/dog/%'"]):
        found = runner.invoke(cli, ["a photo of a cat", "--entries", "folder", *flags,
                                    "--index", str(tmp_path / "index"), "--json"])
        assert found.exit_code == 0, found.output
        assert [hit["entry"] for hit in json.loads(found.stdout)] == [str(things / "dog")], flags


def test_entries_on_the_command_line(entry_index, tmp_path):
    runner = CliRunner()
    index_dir = tmp_path / "index"
    shutil.copytree(entry_index, index_dir)
    result = runner.invoke(cli, ["a red square", "--entries", "stem", "--fusion", "rrf", "-k", "2",
                                 "--index", str(index_dir), "--json"])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 2 and set(hits[0]["parts"]) == {"image", "audio"}
    text = runner.invoke(cli, ["a red square", "--entries", "stem", "--index", str(index_dir)])
    assert text.exit_code == 0 and "image" in text.stdout and "audio" in text.stdout


def write_queries(path: Path, entries: Path) -> Path:
    """Each class's caption and its entries, named relative to the queries file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(entries, path.parent)
    path.write_text("".join(f"{caption_for(c, s)}\t{relative}/e{n}_{copy}\n"
                            for n, (c, s) in enumerate(CLASSES) for copy in range(PER_CLASS)))
    return path


def test_evaluate_entries_measures_each_modality_and_each_fusion(entry_index, tmp_path, monkeypatch):
    """A relative QUERIES path once reported all zeros: its entries never met the index's."""
    monkeypatch.chdir(tmp_path)
    write_queries(tmp_path / "q" / "queries.tsv", Path(entry_index).parent / "entries")
    result = CliRunner().invoke(cli, ["evaluate-entries", "q/queries.tsv", "--index", str(entry_index),
                                      "--json"])
    assert result.exit_code == 0, result.output
    scores = {name: data["recall"]["1"] for name, data in json.loads(result.stdout).items()}
    assert set(scores) == {"image", "audio", *FUSIONS} - {"attention"}  # no gate trained here
    with Index.open(entry_index, readonly=True) as index:  # the same measure as the tests above
        assert scores["image"] == single_modality(index, "image")
        assert scores["rrf"] == fused(index, "rrf")
    assert min(scores[f] for f in ("rrf", "sum", "mean", "weighted", "concat")) > max(
        scores["image"], scores["audio"])
    table = CliRunner().invoke(cli, ["evaluate-entries", "q/queries.tsv", "--index", str(entry_index)])
    assert table.exit_code == 0 and "| rrf |" in table.stdout and "| image |" in table.stdout


def test_queries_that_name_no_entry_are_an_error_not_zeros(entry_index, tmp_path):
    queries = tmp_path / "queries.tsv"
    queries.write_text("a red square\telsewhere/e0_0\n")
    for command in ("evaluate-entries", "train-fusion"):
        result = CliRunner().invoke(cli, [command, str(queries), "--index", str(entry_index)])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: no entry named in {queries} is in index ")
        assert f"'{tmp_path}/elsewhere/e0_0' is not one of its {9 * PER_CLASS} entries" in result.stderr
    known = f"{caption_for(*CLASSES[0])}\t{Path(entry_index).parent}/entries/e0_0\n"
    queries.write_text(f"a red square\telsewhere/e0_0\n{known}")
    (tmp_path / "known.tsv").write_text(known)
    with Index.open(entry_index, readonly=True) as index:
        with pytest.warns(QueryWarning, match="1 of 2 queries"):
            both = index.evaluate_entries(queries, depth=10)
        alone = index.evaluate_entries(tmp_path / "known.tsv", depth=10)
    assert both["rrf"].recall[10] == alone["rrf"].recall[10] / 2  # the unknown one is a miss


def test_a_manifest_names_the_entries(entry_index, tmp_path):
    """Regroup the corpus by a manifest: each colour's grey pictures and sounds form one entry."""
    entries = Path(entry_index).parent / "entries"
    manifest = tmp_path / "entries.csv"
    rows = [f"{color},{entries / f'e{n}_{copy}.{suffix}'}" for n, (color, _) in enumerate(CLASSES)
            for copy in range(PER_CLASS) for suffix in ("png", "wav")]
    manifest.write_text("entry,path\n" + "\n".join(rows) + "\n")
    with Index.open(entry_index, readonly=True) as index:
        hits = index.search_entries("a blue square", grouping=str(manifest), fusion="sum", k=3)
        assert sorted(h.entry for h in hits) == ["blue", "green", "red"]
        assert hits[0].entry == "blue" and set(hits[0].parts) == {"image", "audio"}
        with pytest.raises(UsageError, match="stem, folder or a manifest file"):
            index.search_entries("x", grouping=str(tmp_path / "missing.csv"))
        # Queries name a manifest's entries by name: once read as paths, none ever matched.
        queries = tmp_path / "colours.tsv"
        queries.write_text("a blue square\tblue\na red circle\tred\n")
        scores = index.evaluate_entries(queries, str(manifest), depth=10)
        assert scores["sum"].recall[1] > 0
    (tmp_path / "bad.jsonl").write_text('{"entry": "a"}\n')
    refused = pytest.raises(UsageError, match="bad.jsonl, line 1: needs an entry and a path")
    with Index.open(entry_index, readonly=True) as index, refused:
        index.search_entries("x", grouping=str(tmp_path / "bad.jsonl"))


def test_a_trained_attention_gate_fuses_per_query(entry_index, tmp_path, monkeypatch):
    """Trained from a relative QUERIES path, which once found "no entry ... in index"."""
    index_dir = tmp_path / "index"
    shutil.copytree(entry_index, index_dir)
    monkeypatch.chdir(tmp_path)
    queries = write_queries(Path("queries.tsv"), Path(entry_index).parent / "entries")
    runner = CliRunner()
    untrained = runner.invoke(cli, ["a red circle", "--entries", "stem", "--fusion", "attention",
                                    "--index", str(index_dir)])
    assert untrained.exit_code == 2 and "retrieve train-fusion" in untrained.stderr
    trained = runner.invoke(cli, ["train-fusion", str(queries), "--index", str(index_dir), "--held-out", "0",
                                  "--json"])
    assert trained.exit_code == 0, trained.output
    assert len(json.loads(trained.stdout)["epochs"]) == 30
    with Index.open(index_dir, readonly=True) as index:
        best_single = max(single_modality(index, "image"), single_modality(index, "audio"))
        assert fused(index, "attention") >= best_single + 0.2
        [hit] = index.search_entries("a green square", fusion="attention", k=1)
        assert hit.score == pytest.approx(sum(hit.contributions.values()), abs=1e-5)
    table = runner.invoke(cli, ["evaluate-entries", str(queries), "--index", str(index_dir)])
    assert "| attention |" in table.stdout
    # 9 queries, each answered by 2 entries: once "on 18 queries ... held-out R@1 0.000"
    again = runner.invoke(cli, ["train-fusion", str(queries), "--index", str(index_dir), "--held-out", "0",
                                "--epochs", "1"])
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(
        "trained the fusion gate on 9 queries (18 query-entry pairs) for 1 epoch in ")
    assert again.stdout.rstrip().endswith("; nothing held out to measure")


def test_multi_part_queries_with_weights_and_negation_find_entries(entry_index, tmp_path):
    """Combined queries against entries: terms added and taken away, and a sound as a term."""
    green_triangle = CLASSES.index(("green", "triangle"))
    with Index.open(entry_index, readonly=True) as index:
        for fusion in ("rrf", "sum", "mean", "concat"):
            # green square + blue triangle - blue square: what is left is green and triangular
            hits = index.search_entries("a green square + a blue triangle - a blue square",
                                        fusion=fusion, k=2)
            assert [class_number(h.entry) for h in hits] == [green_triangle] * 2, fusion
        rng = np.random.default_rng(11)
        hum = write_sound(tmp_path / "hum.wav", render_sound("green", "circle", rng))
        heard = index.search_entries(audio=hum, fusion="sum", k=2)
        assert {CLASSES[class_number(h.entry)][0] for h in heard} == {"green"}  # the sound tells colour
    result = CliRunner().invoke(cli, ["--audio", str(hum), "--entries", "stem", "--fusion", "sum",
                                      "--index", str(entry_index), "-k", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert CLASSES[class_number(json.loads(result.stdout)[0]["entry"])][0] == "green"
