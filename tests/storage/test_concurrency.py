"""Readers in threads and processes keep searching, without an error, while a build writes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import write_image

from retrieval import Index

# Readers pause briefly between searches (PAUSE), so that six busy readers leave the writer
# some of a 2-core machine; each still searches many times while every batch lands.
PAUSE = 0.05
FIRST, ADDED = 20, 60  # images indexed before the readers start, and added while they search

READER_PROCESS = f'''
import json, sys, time
from pathlib import Path
from retrieval import Index
index_dir, stop = sys.argv[1], Path(sys.argv[2])
done, errors, seen = 0, [], set()
with Index.open(index_dir, readonly=True) as index:
    while not stop.exists():
        try:
            hits = index.search("a picture", k=5)
            seen.add(index.count("image"))
            done += 1
        except Exception as error:
            errors.append(repr(error))
        time.sleep({PAUSE})
print(json.dumps({{"searches": done, "errors": errors, "sizes": len(seen)}}))
'''


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    for number in range(FIRST + ADDED):
        folder = root / ("first" if number < FIRST else "later")
        write_image(folder / f"{number:03}.png", (number % 256, 90, (number * 5) % 256))
    return root


def test_readers_search_while_a_build_writes(tmp_path, corpus, tiny_model):
    index_dir = tmp_path / "index"
    with Index.open(index_dir, model=tiny_model, create=True) as index:
        index.add(corpus / "first")
    stop = tmp_path / "stop"
    script = tmp_path / "reader.py"
    script.write_text(READER_PROCESS)
    readers = [subprocess.Popen([sys.executable, str(script), str(index_dir), str(stop)],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    shared = Index.open(index_dir, readonly=True)
    errors: list[str] = []
    counts: list[int] = []
    sizes: set[int] = set()

    def search_loop(index: Index) -> None:
        done = 0
        while not stop.exists():
            try:
                hits = index.search("a picture", k=5)
                assert all(Path(hit.uri).is_file() for hit in hits)
                sizes.add(index.count("image"))
                done += 1
            except Exception as error:  # noqa: BLE001 - every failure is the finding
                errors.append(repr(error))
            time.sleep(PAUSE)
        counts.append(done)

    own = [Index.open(index_dir, readonly=True) for _ in range(2)]
    threads = [threading.Thread(target=search_loop, args=(index,))
               for index in [shared, shared, *own]]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # readers are running before the writer starts
    build = subprocess.run([sys.executable, "-m", "retrieval.cli", "index", str(corpus),
                            "--index", str(index_dir), "--batch-size", "8", "--quiet"],
                           capture_output=True, text=True)
    time.sleep(0.5)
    stop.write_text("")
    for thread in threads:
        thread.join()
    reports = [json.loads(reader.communicate(timeout=60)[0]) for reader in readers]
    for index in [shared, *own]:
        index.close()
    assert build.returncode == 0, build.stderr
    assert errors == [] and all(report["errors"] == [] for report in reports)
    assert all(count > 0 for count in counts) and all(r["searches"] > 0 for r in reports)
    assert max(sizes) == FIRST + ADDED and min(sizes) == FIRST  # readers saw the build land, no restart
    with Index.open(index_dir, readonly=True) as index:
        assert len(index.search("a picture", k=500)) == FIRST + ADDED
