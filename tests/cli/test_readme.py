"""README's code, run as written: every ```sh and ```python block that can run offline does, on the
tiny model, in a sandbox laid out at the paths README names (HOME holds ~/Pictures, ~/Sounds and
~/Videos; the working directory holds query.jpg, bark.wav, sound-pairs/, photos/ ...).

`retrieve` lines go through click's CliRunner after the shell's word splitting and `~`
expansion; python blocks are executed. The one thing README names that cannot run here, the real
ViT-B-32 weights, is replaced by the tiny model: the default model is patched, and the few places
that spell the real model out are rewritten (REAL_MODEL). A block that cannot run offline at all
is listed in NOT_RUN with the reason, and a block in neither place fails, so README cannot drift.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support import write_image
from support.clips import write_clip
from support.sounds import render_sound, write_sound
from support.tiny_model import CLASSES, caption_for, render_shape

import retrieval.encoders.caption_spec
import retrieval.encoders.spec
from retrieval import Index
from retrieval.cli import cli

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# Blocks that cannot run offline or within a test, by their first command, with the reason.
NOT_RUN = {
    "retrieve serve --index indexes/photos":
        "a server runs until stopped (tests/serve/test_server.py serves it)",
    "curl 'http://127.0.0.1:8000/api/search?q=a+dog+in+the+park&k=3'": "needs a running server "
    "(tests/serve/test_server.py asks it the same)",
    "retrieve serve --index shards/0 --shard-index shards/1 --shard-index shards/2": "servers run until "
    "stopped, on other machines (tests/serve/test_fanout.py fans out to real ones)",
    "pip install 'retrieval[ray]'":
        "a Ray cluster (tests/builds/test_distributed.py, marked slow, runs Ray locally)",
    'python3 -m pytest -q -m "" tests/builds/test_crash.py -s': "the test suite itself",
    "python3 scripts/benchmark.py --json bench.json": "a benchmark of minutes on real-size models",
    "python3 scripts/benchmark.py --only all --skip ray,scale --sizes 10000,100000,1000000 \\":
        "the whole benchmark, an hour on real-size models and peers (tests/e2e/test_benchmark.py "
        "checks its plumbing)",
    "python3 scripts/benchmark.py --only duplicates --json duplicates.json": "a benchmark of minutes on "
    "real-size models (tests/query/test_duplicates.py measures the tiny model)",
    "python3 scripts/benchmark.py --scale --scale-dir /big/disk": "13 minutes and 25 GB of disk",
}
# The real model, wherever README spells it out, becomes the default one (patched to the tiny model).
REAL_MODEL = {
    " --model ViT-B-32 --pretrained laion2b_s34b_b79k": "",
    'ModelSpec.parse("ViT-B-32", "laion2b_s34b_b79k")': "ModelSpec.parse()",
}
# Absolute paths README names that a test cannot create: moved into the sandbox's HOME.
ABSOLUTE_PATHS = {"/data/photos": "~/data/photos"}
# What must exist before a block runs, where README assumes it (the shop's entries).
GIVEN = {
    'retrieve "a red circle" --entries stem --fusion rrf --index indexes/shop':
        ["index ~/shop --index indexes/shop --quiet"],
}


@dataclass(frozen=True)
class Block:
    """One fenced code block of README: its language, code and first line's number."""

    language: str
    code: str
    line: int

    @property
    def first_command(self) -> str:
        """The first line that is not a comment, without its trailing comment: the block's name."""
        for line in self.code.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                return re.sub(r"\s+#.*$", "", line).strip()
        return ""


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [Block(match.group(1), match.group(2), text.count("\n", 0, match.start()) + 2)
            for match in re.finditer(r"^```(\w*)\n(.*?)^```[ \t]*$", text, re.M | re.S)]


def runnable_blocks() -> list:
    """Every sh and python block, as a test parameter; those in NOT_RUN skipped with the reason."""
    params = []
    for block in readme_blocks():
        if block.language not in ("sh", "python") or block.first_command.startswith("python3 -m venv"):
            continue  # output, a folder layout, or Set up (test_set_up_is_what_ci_runs)
        reason = NOT_RUN.get(block.first_command)
        marks = [pytest.mark.skip(reason=f"README.md:{block.line}: {reason}")] if reason else []
        params.append(pytest.param(block, id=f"README.md:{block.line}", marks=marks))
    return params


def test_the_lists_of_exceptions_name_blocks_readme_has():
    firsts = {block.first_command for block in readme_blocks()}
    assert set(NOT_RUN) <= firsts, f"NOT_RUN names blocks README no longer has: {set(NOT_RUN) - firsts}"
    assert set(GIVEN) <= firsts
    assert {block.language for block in readme_blocks()} <= {"sh", "python", ""}, "a new kind of block"


def test_set_up_is_what_ci_runs():
    """README's install and test commands are .ci/run's, word for word."""
    set_up = next(block for block in readme_blocks() if block.first_command.startswith("python3 -m venv"))
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in set_up.code.splitlines()]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert commands[0].startswith("python3 -m venv ") and "/bin/activate" in commands[0]
    assert commands[1:] == ["python3 -m pip install -e '.[dev]'", "ruff check retrieval tests scripts",
                            "lint-imports", "python3 -m pytest -q"]
    assert ci[-4:] == commands[1:]
    assert any(line.startswith("python3 -m venv ") for line in ci)
    assert any(line.startswith(". ") and line.endswith('/bin/activate"') for line in ci)


# -- the sandbox ------------------------------------------------------------------------------

def write_render(path: Path, number: int, rng: np.random.Generator) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color, shape = CLASSES[number % len(CLASSES)]
    render_shape(color, shape, rng).save(path)
    return path


@pytest.fixture(scope="module")
def sandbox_template(tmp_path_factory) -> Path:
    """The files README's blocks name: HOME in `home/`, the working directory at the top."""
    top = tmp_path_factory.mktemp("readme")
    home = top / "home"
    rng = np.random.default_rng(0)
    # ~/Pictures: photos, beach/ among them, captions.tsv at the top; a Flickr token file elsewhere.
    for number in range(6):
        folder = home / "Pictures" / ("beach" if number < 3 else "city")
        write_render(folder / f"photo{number}.jpg", number, rng)
    (home / "Pictures" / "captions.tsv").write_text("photo0.jpg#0\ta sunset at the beach\n"
                                                   "photo3.jpg#0\ta street at night\n")
    (home / "flickr8k").mkdir()
    (home / "flickr8k" / "Flickr8k.token.txt").write_text("photo1.jpg#0\ta dog in the park\n"
                                                         "photo4.jpg#0\tpeople on a bus\n")
    write_image(top / "query.jpg", (200, 30, 30))
    write_image(top / "dog.jpg", (30, 200, 30))
    write_image(top / "leash.jpg", (30, 30, 200))
    # Sounds: training pairs (each with its caption; short, as README's blocks train with the
    # default epochs and tower width), ~/Sounds, and bark.wav to query with.
    for number, (color, shape) in enumerate(CLASSES):
        if number < 6:
            write_sound(top / "sound-pairs" / f"{color}_{shape}.wav", render_sound(color, shape, rng, 0.3))
            (top / "sound-pairs" / f"{color}_{shape}.txt").write_text(caption_for(color, shape) + "\n")
        write_sound(home / "Sounds" / f"sound{number}.flac", render_sound(color, shape, rng, seconds=1.5))
    write_sound(top / "bark.wav", render_sound("red", "square", rng, 0.5))
    # Videos: two short clips in ~/Videos, and one to query with.
    (home / "Videos").mkdir()
    for number in range(2):
        write_clip(home / "Videos" / f"clip{number}.mp4", "libx264", "aac", CLASSES[number:number + 1],
                   number)
    write_clip(top / "query.mp4", "libx264", "aac", CLASSES[2:3], seed=2)
    # The shop's entries: pictures with their captions beside them, by stem.
    for number in range(4):
        picture = write_render(home / "shop" / f"item{number}.png", number, rng)
        picture.with_suffix(".txt").write_text(caption_for(*CLASSES[number % len(CLASSES)]) + "\n")
    # A Flickr-style folder for the fine-tuning recipe, and its Karpathy split in the working directory.
    names = [f"{number:03}.jpg" for number in range(18)]
    for number, name in enumerate(names):
        write_render(top / "photos" / "images" / name, number, rng)
    captions = [caption_for(*CLASSES[number % len(CLASSES)]) for number in range(len(names))]
    (top / "photos" / "captions.tsv").write_text(
        "".join(f"{name}#0\t{caption}\n" for name, caption in zip(names, captions)))
    (top / "dataset_flickr8k.json").write_text(json.dumps({"images": [
        {"filename": name, "split": "test" if number % 3 == 0 else "train",
         "sentences": [{"raw": caption}]} for number, (name, caption) in enumerate(zip(names, captions))]}))
    # The on-disk index's corpus, at the absolute path README names, moved into HOME.
    for number in range(40):
        write_render(home / "data" / "photos" / f"{number:03}.png", number, rng)
    return top


@pytest.fixture
def sandbox(sandbox_template, tmp_path, monkeypatch, tiny_model, tiny_coca) -> Path:
    """A fresh copy of the sandbox as working directory and HOME, with the tiny models as default
    (the tiny CoCa for captions)."""
    top = tmp_path / "sandbox"
    shutil.copytree(sandbox_template, top)
    monkeypatch.chdir(top)
    monkeypatch.setenv("HOME", str(top / "home"))
    monkeypatch.delenv("RETRIEVAL_INDEX", raising=False)
    monkeypatch.delenv("RETRIEVAL_SERVER", raising=False)
    monkeypatch.setattr(retrieval.encoders.spec, "DEFAULT_MODEL", tiny_model)
    monkeypatch.setattr(retrieval.encoders.caption_spec, "DEFAULT_CAPTION_MODEL", tiny_coca)
    monkeypatch.setattr(retrieval.encoders.caption_spec, "DEFAULT_CAPTION_PRETRAINED", None)
    return top


# -- running blocks ----------------------------------------------------------------------------

def shell_lines(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, words split and `~` expanded."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append([str(Path(word).expanduser()) if word.startswith("~") else word
                             for word in words])
    return commands


def run_retrieve(words: list[str], where: str) -> str:
    assert words[0] == "retrieve", f"{where}: {' '.join(words)}: teach tests/cli/test_readme.py to run it " \
                                   "or list the block in NOT_RUN"
    result = CliRunner().invoke(cli, words[1:], catch_exceptions=False)
    assert result.exit_code == 0, f"{where}: {shlex.join(words)} exited {result.exit_code}:\n{result.output}"
    return result.output


def rewritten(code: str) -> str:
    for table in (REAL_MODEL, ABSOLUTE_PATHS):
        for written, runnable in table.items():
            code = code.replace(written, runnable)
    return code


@pytest.mark.parametrize("block", runnable_blocks())
def test_readme_block_runs_as_written(block: Block, sandbox: Path, monkeypatch):
    where = f"README.md:{block.line}"
    if "--captioning" in block.code:  # scored as without Java, the way README names: METEOR is a
        which = shutil.which          # Java start of seconds, scored in tests/train/test_caption_metrics.py
        monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs:
                            None if name == "java" else which(name, *args, **kwargs))
    for given in GIVEN.get(block.first_command, []):
        run_retrieve(["retrieve", *shell_lines(given)[0]], f"{where} (given)")
    code = rewritten(block.code)
    if block.language == "python":
        exec(compile(code, where, "exec"), {"__name__": "__readme__"})
    else:
        for words in shell_lines(code):
            run_retrieve(words, where)


def test_the_python_quickstart_indexes_both_captions_files(sandbox: Path):
    """Bug 11: README's example named captions.tsv relative to the working directory, and failed."""
    block = next(block for block in readme_blocks()
                 if block.language == "python" and "index.add(\"~/Pictures\"" in block.code)
    exec(compile(block.code, f"README.md:{block.line}", "exec"), {"__name__": "__readme__"})
    with Index.open(sandbox / "indexes" / "photos", readonly=True) as index:
        captions = {hit.text for hit in index.search("a picture", target="text", k=50)}
    assert captions == {"a sunset at the beach", "a street at night", "a dog in the park", "people on a bus"}
