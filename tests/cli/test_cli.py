"""The `retrieve` command and scripts/build_index.py: output, options, errors and exit codes."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from support import held_lock, write_image
from support.stored import committed_items, integrity

from retrieval import Index
from retrieval.build.builder import BuildReport
from retrieval.cli import cli
from retrieval.cli.train import trained_line

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def built(tmp_path, photo_folder, tiny_model) -> Path:
    index_dir = tmp_path / "index"
    code, out, err = run("index", photo_folder, "--index", index_dir, "--model", tiny_model)
    assert code == 0, err
    return index_dir


def test_index_prints_a_summary_and_warnings(tmp_path, photo_folder, tiny_model):
    (photo_folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    code, out, err = run("index", photo_folder, "--index", tmp_path / "i", "--model", tiny_model)
    assert code == 0
    assert out.startswith("9 new, 0 changed, 0 unchanged, 0 moved, 0 removed, 1 skipped;")
    assert "items/s" in out
    assert err.strip().splitlines() == [
        f"warning: skipped {photo_folder / 'broken.jpg'}: not an image PIL can read"]
    code, out, _ = run("index", photo_folder, "--index", tmp_path / "i", "--json", "--quiet")
    report = json.loads(out)
    assert (report["unchanged"], report["images_encoded"]) == (9, 0)
    assert (report["skipped"], report["skipped_unchanged"]) == ([], 1)  # warned about once
    (photo_folder / "broken.jpg").write_bytes(b"\xff\xd8 still not")
    code, out, _ = run("index", photo_folder, "--index", tmp_path / "i", "--json", "--quiet")
    assert json.loads(out)["skipped"] == [{"path": str(photo_folder / "broken.jpg"),
                                           "reason": "not an image PIL can read"}]


def test_text_query_prints_a_table(built, photo_folder, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # lines are cut to the terminal's width; tmp paths are long
    code, out, _ = run("a red picture", "--index", built, "-k", "3")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3
    rank, score, path = lines[0].split()[:3]
    assert rank == "1" and -1 <= float(score) <= 1 and path.startswith(str(photo_folder))


def test_unquoted_words_form_one_query(built):
    quoted = json.loads(run("a red picture", "--index", built, "--json")[1])
    unquoted = json.loads(run("a", "red", "picture", "--index", built, "--json")[1])
    assert [h["id"] for h in quoted] == [h["id"] for h in unquoted]


def test_json_output_has_every_field(built, photo_folder):
    code, out, _ = run("sunny", "--index", built, "--json", "-k", "6")
    hits = json.loads(out)
    assert code == 0 and len(hits) == 6
    assert set(hits[0]) == {"id", "modality", "uri", "score", "path", "text", "metadata",
                            "generated", "duplicates"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    yellow = next(h for h in hits if h["uri"].endswith("img3.jpg"))
    assert yellow["text"] == "a yellow picture"
    assert yellow["metadata"]["captions"] == ["a yellow picture", "something sunny"]


def test_a_query_that_starts_with_a_dash(built, photo_folder):
    """`retrieve "- dog"` once said "No such option '- '"; `retrieve -- "- dog"` said the same,
    because the default-command dispatch ate the `--`."""
    with Index.open(built, readonly=True) as index:
        expected = [hit.id for hit in index.search("- dog")]
    code, out, err = run("- dog", "--index", built, "--json")
    assert code == 0, err
    assert [h["id"] for h in json.loads(out)] == expected
    ends = CliRunner().invoke(cli, ["--json", "--", "- dog"], env={"RETRIEVAL_INDEX": str(built)})
    assert ends.exit_code == 0, ends.stderr
    assert [h["id"] for h in json.loads(ends.stdout)] == expected
    assert run("--index", built, "--json", "--", "-dog")[0] == 0
    code, _, err = run("-dog", "--index", built)  # -d -o -g, or a query: say how to mean a query
    assert code == 2 and "goes after --, as in: retrieve -- -dog" in err.splitlines()[-1]
    code, _, err = run("--imgae", "q.jpg", "red", "--index", built)
    assert code == 2 and "--image" in err.splitlines()[-1]


def test_a_query_term_like_a_missing_file_warns_and_searches_its_words(built, photo_folder):
    code, out, err = run("2:holiday/beach.jpg + red", "--index", built, "--json", "-k", "2")
    assert code == 0 and len(json.loads(out)) == 2
    assert err.splitlines() == [
        "warning: query term 'holiday/beach.jpg' names no image, sound or video file; "
        "searched as text"]
    assert run("a red picture", "--index", built)[2] == ""
    # a query that fails says only why: its one error line
    code, _, err = run("holiday/beach.jpg", "--image", photo_folder / "notes.txt", "--index", built)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: query image"), err


def test_weights_reach_the_fusion(built):
    """`--fusion weighted` once equalled mean: the CLI had no way to give weights."""
    def entries(*options: str) -> list[tuple[str, float]]:
        code, out, err = run("red", "--entries", "stem", "--index", built, "--json", *options)
        assert code == 0, err
        return [(hit["entry"], hit["score"]) for hit in json.loads(out)]

    weighted = entries("--fusion", "weighted", "--weights", "image=1, text=0")
    with Index.open(built, readonly=True, one_shot=True) as index:  # the towers the CLI's search uses
        expected = index.search_entries("red", grouping="stem", fusion="weighted",
                                        weights={"image": 1, "text": 0})
    assert weighted == [(hit.entry, hit.score) for hit in expected]
    assert weighted != entries("--fusion", "weighted")  # the caption of img0 no longer counts
    assert all(hit.contributions.get("text", 0) == 0 for hit in expected)
    assert entries("--fusion", "weighted") == entries("--fusion", "mean")
    for bad in (["--weights", "image:2", "--entries", "stem"], ["--weights", "image=x", "--entries", "stem"],
                ["--weights", "image=2"]):
        code, _, err = run("red", "--index", built, *bad)
        assert code == 2 and "--weights" in err.splitlines()[-1], err
    code, _, err = run("red", "--index", built, "--entries", "stem", "--weights", "imag=2")
    assert code == 2 and "imag" in err


def test_image_query_returns_captions_and_images(built, photo_folder):
    image = photo_folder / "city" / "img3.jpg"
    texts = json.loads(run("--image", image, "--index", built, "--json")[1])
    assert {h["modality"] for h in texts} == {"text"}
    images = json.loads(run("--image", image, "--target", "image", "--index", built,
                            "--json", "-k", "1")[1])
    assert images[0]["uri"] == str(image)


def test_text_to_text(built):
    hits = json.loads(run("cats", "--target", "text", "--index", built, "--json", "-k", "20")[1])
    assert {h["text"] for h in hits} >= {"a note about cats", "a note about dogs"}


def test_combined_query_with_image_and_negation(built, photo_folder):
    image = photo_folder / "city" / "img3.jpg"
    hits = json.loads(run(f"a photo - {image}", "--target", "image", "--index", built, "--json")[1])
    assert hits[-1]["uri"] == str(image)
    plus = json.loads(run(f"2:{image} + a photo", "--target", "image", "--index", built,
                          "--json", "-k", "1")[1])
    assert plus[0]["uri"] == str(image)


def test_filters(built, photo_folder):
    under = json.loads(run("x", "--under", photo_folder / "city", "--index", built, "--json")[1])
    assert {Path(h["path"]).parent.name for h in under} == {"city"}
    where = json.loads(run("x", "--where", "path LIKE '%img1%'", "--index", built, "--json")[1])
    assert [Path(h["uri"]).name for h in where] == ["img1.jpg"]
    none = json.loads(run("x", "--min-score", "1.01", "--index", built, "--json")[1])
    assert none == []


def test_counts_agree_with_their_nouns():
    """"1 epochs", "1 files", "held-out R@1 0.000" with nothing held out: no more."""
    assert BuildReport(new=1, images_encoded=1, vectors_reused=1).summary().startswith(
        "1 new, 0 changed, 0 unchanged, 0 moved, 0 removed, 0 skipped; encoded 1 image, 0 texts, "
        "0 audio windows and 0 video segments, reused 1 vector in ")
    report = {"held_out": 0, "epochs": [{"recall_at_1": 0.0}], "seconds": 1.25}
    assert trained_line("bilstm:ab", "9 segments", report) == (
        "trained bilstm:ab on 9 segments for 1 epoch in 1.2 s; nothing held out to measure")
    report = {"held_out": 2, "epochs": [{"recall_at_1": 0.5}] * 3, "seconds": 3.0}
    assert trained_line("the fusion gate", "9 queries (18 query-entry pairs)", report, "pair") == (
        "trained the fusion gate on 9 queries (18 query-entry pairs), 2 pairs held out, for 3 epochs "
        "in 3.0 s; held-out R@1 0.500")


def test_info(built, tiny_model):
    code, out, _ = run("info", "--index", built, "--json")
    stats = json.loads(out)
    assert code == 0
    assert stats["model"]["name"] == tiny_model
    assert stats["counts"] == {"image": 6, "text": 7, "audio": 0, "video": 0}
    assert stats["audio_model"] is None
    assert "image   6" in run("info", "--index", built)[1]


def test_remove(built, photo_folder):
    code, out, _ = run("remove", photo_folder / "city", "--index", built)
    assert (code, out.strip()) == (0, "removed 3 files")
    stats = json.loads(run("info", "--index", built, "--json")[1])
    assert stats["counts"]["image"] == 3
    code, out, _ = run("remove", photo_folder / "beach" / "img1.jpg", "--index", built)
    assert (code, out.strip()) == (0, "removed 1 file")  # once "1 files"


def test_index_from_env_variable(built, monkeypatch):
    monkeypatch.setenv("RETRIEVAL_INDEX", str(built))
    assert len(json.loads(run("red", "--json", "-k", "2")[1])) == 2


@pytest.mark.parametrize("args, code, message", [
    (["a dog", "--index", "{tmp}/missing"], 1, "no index at"),
    (["a dog", "--index", "{empty}"], 1, "holds no items yet"),
    (["a dog", "--where", "bogus = 1", "--index", "{built}"], 2, "--where"),
    (["--image", "{tmp}/nope.jpg", "--index", "{built}"], 2, "no such file"),
    (["  ", "--index", "{built}"], 2, "the query is empty"),
    (["a dog", "-k", "0", "--index", "{built}"], 2,
     "error: -k must be at least 1, not 0 (see cli search --help)"),
    (["a dog", "--target", "nope", "--index", "{built}"], 2, "error: --target: 'nope' is not one of"),
    (["a dog", "--bogus", "--index", "{built}"], 2, "error: no such option '--bogus'"),
    (["evaluate-entries", "--index", "{built}"], 2, "error: missing argument 'QUERIES'"),
    (["train", "{tmp}", "--learning-rate", "0"], 2,
     "error: --learning-rate must be more than 0, not 0.0 (see cli train --help)"),
    (["a dog", "--model", "{other}", "--index", "{built}"], 1, "built with model"),
    (["index", "{tmp}/no-such-folder", "--index", "{built}"], 2, "no such file or folder"),
    (["index", "{tmp}/no\rsuch\nfolder", "--index", "{built}"], 2,  # a name may not split the line
     "no\\x0dsuch\\x0afolder: no such file or folder"),
    (["index", "{tmp}", "--index", "{tmp}/new", "--model", "Nope-1"], 1, "unknown model 'Nope-1'"),
    (["index", "{tmp}", "--index", "{tmp}/new", "--model", "hf-hub:org/repo", "--pretrained", "openai"],
     2, "--pretrained cannot be combined with a hf-hub: model (--model hf-hub:org/repo)"),
    (["index", "{tmp}", "--index", "{tmp}/new", "--caption-model", "local-dir:{tmp}",
      "--caption-pretrained", "x.pt"], 2, "--caption-pretrained cannot be combined with a local-dir: model"),
])
def test_errors_are_one_line_with_exit_codes(built, tmp_path, tiny_model, other_tiny_model, args,
                                             code, message):
    empty = tmp_path / "empty"
    Index.open(empty, model=tiny_model, create=True).close()
    values = {"tmp": tmp_path, "built": built, "empty": empty, "other": other_tiny_model}
    result = CliRunner().invoke(cli, [a.format(**values) for a in args])
    assert result.exit_code == code
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # click's usage errors too


def test_offline_default_model_fails_with_advice(tmp_path, photo_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(cli, ["index", str(photo_folder), "--index", str(tmp_path / "i")])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("error: could not load weights for model ViT-B-32@laion2b_s34b_b79k")
    assert "--pretrained /path/to/checkpoint" in line and "\n" not in line


def test_failed_model_does_not_stick_to_a_new_index(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "i"
    assert run("index", photo_folder, "--index", index_dir, "--model", "Nope-1")[0] == 1
    code, _, err = run("index", photo_folder, "--index", index_dir, "--model", tiny_model)
    assert code == 0, err


def test_rebuild_with_another_model(built, photo_folder, other_tiny_model):
    code, _, err = run("index", "--index", built, "--model", other_tiny_model)
    assert code == 1 and "--rebuild" in err
    code, out, _ = run("index", "--index", built, "--model", other_tiny_model, "--rebuild", "--json")
    assert code == 0 and json.loads(out)["images_encoded"] == 6


def run_build_script(monkeypatch, capsys, *args: str | Path) -> tuple[int, str, str]:
    """scripts/build_index.py ARGS, run as `python scripts/build_index.py` runs it (in this
    process: a new one would spend seconds importing torch)."""
    script = ROOT / "scripts" / "build_index.py"
    monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    out, err = capsys.readouterr()
    return done.value.code or 0, out, err


def test_build_script_has_the_same_options(tmp_path, photo_folder, tiny_model, monkeypatch, capsys):
    code, script, _ = run_build_script(monkeypatch, capsys, "--help")
    assert code == 0 and script.startswith("Usage: build_index.py ")
    command = run("index", "--help")[1]
    def options(help_text: str) -> str:  # the two wrap at different places, hyphens included
        return " ".join(re.sub(r"-\n\s*", "-", help_text.split("Options:")[1]).split())

    assert options(script) == options(command)
    code, out, err = run_build_script(monkeypatch, capsys, photo_folder, "--index", tmp_path / "index",
                                      "--model", tiny_model, "--json")
    assert code == 0, err
    assert json.loads(out)["new"] == 9


@pytest.mark.slow  # the default run kills builds in tests/builds/test_crash.py
def test_kill_9_during_a_build_leaves_an_index_that_answers_and_resumes(tmp_path, tiny_model):
    source = tmp_path / "many"
    for number in range(300):
        write_image(source / f"{number:03}.png", (number % 256, 90, 255 - number % 256))
    index_dir = tmp_path / "index"
    command = [sys.executable, "-m", "retrieval.cli", "index", str(source), "--index",
               str(index_dir), "--model", tiny_model, "--batch-size", "8", "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    committed = 0
    while committed < 40 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
        committed = _count_images(index_dir)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 0 < committed < 300, "the build should be killed half-way"
    hits = json.loads(run("anything", "--index", index_dir, "--json", "-k", "500")[1])
    assert len(hits) == _count_images(index_dir)
    code, out, _ = run("index", str(source), "--index", index_dir, "--json", "--quiet")
    report = json.loads(out)
    assert code == 0 and report["new"] + report["unchanged"] == 300
    with Index.open(index_dir) as index:
        assert index.count("image") == 300
        assert len(index.vectors("image")) == 300
        assert integrity(index.store)["duplicated uris"] == 0


def _count_images(index_dir: Path) -> int:
    return committed_items(index_dir, "image") or 0


def test_console_script_is_installed():
    # Installed beside the interpreter running the tests, whether or not its venv is activated.
    script = shutil.which("retrieve", path=sysconfig.get_path("scripts"))
    assert script, f"no retrieve script in {sysconfig.get_path('scripts')}"
    done = subprocess.run([script, "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0 and "retrieve index" in done.stdout


REFUSED_WITHOUT_TORCH = """
import sys
from retrieval.cli import main
sys.argv = ["retrieve", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    print(done.code, "torch" in sys.modules)
"""


def test_a_second_writer_is_refused_at_once_naming_the_first(built, photo_folder):
    """It once imported torch and opened the model first: refused only after 10-14 s."""
    with held_lock(built):
        done = subprocess.run([sys.executable, "-c", REFUSED_WITHOUT_TORCH, "index", str(photo_folder),
                               "--index", str(built)], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["1", "False"], done.stderr  # refused before torch was imported
    assert done.stderr.startswith(f"error: index {built} is being written by pid {os.getpid()} (")
    assert done.stderr.rstrip().endswith("or add --wait to wait for it")
    assert len(done.stderr.splitlines()) == 1


def test_a_writer_with_wait_waits_for_the_first(built, photo_folder):
    with held_lock(built):
        second = subprocess.Popen([sys.executable, "-m", "retrieval", "remove", str(photo_folder / "city"),
                                   "--index", str(built), "--wait"], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        waiting = second.stderr.readline()  # it says so, then waits: the lock is still held here
        assert waiting.startswith(f"waiting for pid {os.getpid()} (") and str(built) in waiting
    out, err = second.communicate()
    assert (second.returncode, out.strip()) == (0, "removed 3 files"), err


def test_python_dash_m_retrieval_runs_the_command():
    """`python -m retrieval` once failed: "'retrieval' is a package and cannot be directly executed"."""
    done = subprocess.run([sys.executable, "-m", "retrieval", "--help"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: retrieve ") and "retrieve index" in done.stdout


def test_index_type_option_and_convert(tmp_path, photo_folder, tiny_model):
    index_dir = tmp_path / "index"
    code, _, err = run("index", photo_folder, "--index", index_dir, "--model", tiny_model,
                       "--index-type", "hnsw")
    assert code == 0, err
    assert json.loads(run("info", "--index", index_dir, "--json")[1])["index_type"] == "hnsw"
    before = json.loads(run("red", "--index", index_dir, "--json")[1])
    code, out, _ = run("convert", "flat", "--index", index_dir, "--ef-search", "99")
    assert (code, out.strip()) == (0, "index type flat: image flat, text flat, audio flat, video flat")
    after = json.loads(run("red", "--index", index_dir, "--json")[1])
    assert [h["id"] for h in after] == [h["id"] for h in before]
    assert run("convert", "nonsense", "--index", index_dir)[0] == 2


def test_search_device_reaches_the_model(built, photo_folder):
    """A text query may use the exported numpy text tower; an image query needs the model."""
    image = photo_folder / "city" / "img3.jpg"
    code, out, err = run("--image", image, "--index", built, "--device", "cpu", "--target", "image",
                         "--json", "-k", "1")
    assert code == 0 and json.loads(out)[0]["uri"] == str(image), err
    code, _, err = run("--image", image, "--index", built, "--device", "bogus")
    assert code == 2 and "--device 'bogus' is not a device" in err and len(err.splitlines()) == 1
