"""Storage faults: a read-only index folder and a full disk, on real file systems.

Each case runs in a private mount namespace (`unshare -m`, root only), where the index
folder is bind-mounted read-only or lives on a tiny tmpfs; elsewhere these tests skip.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retrieval import Index

ROOT = Path(__file__).resolve().parents[2]


def in_namespace(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a shell script inside a new mount namespace."""
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def namespaces_work(tmp_path_factory) -> None:
    probe = tmp_path_factory.mktemp("probe")
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    done = in_namespace('mount --bind "$1" "$1" && mount -o remount,ro,bind "$1"', str(probe))
    if done.returncode != 0:
        pytest.skip(f"cannot make mount namespaces here: {done.stderr.strip()}")


def cli(*args: str) -> str:
    return " ".join([sys.executable, "-m", "retrieval.cli", *(f"'{a}'" for a in args)])


def test_read_only_index_answers_and_refuses_writes(namespaces_work, tmp_path, photo_folder,
                                                    tiny_model):
    index_dir = tmp_path / "index"
    with Index.open(index_dir, model=tiny_model, create=True) as index:
        index.add(photo_folder)
        expected = [h.id for h in index.search("a red picture", k=3)]
    before = {p: p.read_bytes() for p in index_dir.rglob("*") if p.is_file()}
    (photo_folder / "new.txt").write_text("a new line of text\n")
    script = (f'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && '
              f'{cli("a red picture", "--index", str(index_dir), "--json", "-k", "3")} && '
              f'{cli("index", str(photo_folder), "--index", str(index_dir), "--quiet")}')
    done = in_namespace(script, str(index_dir))
    search_output, _, _ = done.stdout.partition("\n]")
    assert [hit["id"] for hit in json.loads(search_output + "\n]")] == expected
    assert done.returncode == 1
    assert done.stderr.strip().startswith(f"error: cannot write to index {index_dir}")
    assert "the folder is read-only" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in index_dir.rglob("*") if p.is_file()} == before


DISK_FULL_DRIVER = '''
import json, sys
from pathlib import Path
from retrieval import Index
from retrieval.core.errors import IndexWriteError
index_dir, source, model = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
result = {}
try:
    with Index.open(index_dir, model=model, create=True) as index:
        index.add(source)
    result["error"] = None
except IndexWriteError as error:
    result["error"] = str(error)
result["leftovers"] = sorted(p.name for p in index_dir.iterdir() if p.name.endswith(".tmp"))
with Index.open(index_dir, readonly=True) as index:
    result["counts"] = {m: index.count(m) for m in ("image", "text")}
    result["answers"] = len(index.search("a red picture", target="image", k=3))
    result["faiss"] = len(index.vectors("image"))
print(json.dumps(result))
'''


def test_full_disk_fails_cleanly_and_keeps_what_was_committed(namespaces_work, tmp_path,
                                                              photo_folder, tiny_model):
    # A 1 MB disk: the text tower export (~13 MB) is skipped, then SQLite runs out of room
    # somewhere in a corpus of ~1.5 MB of text.
    lines = [f"line {n} " + "of some length " * 20 for n in range(3000)]
    (photo_folder / "long.txt").write_text("\n".join(lines) + "\n")
    disk = tmp_path / "disk"
    disk.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DISK_FULL_DRIVER)
    script = (f'mount -t tmpfs -o size=1m tmpfs "$1" && cd {ROOT} && '
              f'{sys.executable} {driver} "$1/index" {photo_folder} {tiny_model}')
    done = in_namespace(script, str(disk))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["error"].startswith("cannot write to index"), result
    assert "full" in result["error"] or "No space left on device" in result["error"]
    assert result["leftovers"] == []
    assert result["faiss"] == result["counts"]["image"]
    assert result["answers"] == min(3, result["counts"]["image"])
