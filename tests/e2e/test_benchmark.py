"""The benchmark's own plumbing (scripts/benchmarks/): which sections a command line picks, how
rounds interleave, how a whole process tree's memory is measured, that the engine is named in
one place only, and the published-quality table the models section prints. The sections'
figures are measured, never asserted on: `scripts/benchmark.py --quick` runs them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import open_clip
import pytest

import retrieval

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "scripts" / "benchmarks"
sys.path.insert(0, str(PACKAGE.parent))

from benchmarks import cli, engine, measure, models  # noqa: E402
from benchmarks.sections import SECTIONS  # noqa: E402

CANDIDATES = {"ViT-B-32", "ViT-B-32-256", "MobileCLIP-S1", "MobileCLIP-S2", "MobileCLIP2-S0",
              "MobileCLIP2-S2", "MobileCLIP2-S4", "MobileCLIP2-B", "ViT-B-16-SigLIP2", "ViT-B-32-SigLIP2-256"}


def test_opt_in_sections_run_only_when_named():
    assert not {"scale", "ray", "breakeven", "search", "peers", "models"} & set(cli.parse_args([]).sections)
    assert cli.parse_args(["--peers"]).sections == ["peers"]
    assert cli.parse_args(["--models", "--peers"]).sections == ["peers", "models"]
    assert cli.parse_args(["--only", "cli,ann", "--skip", "cli"]).sections == ["ann"]
    assert cli.parse_args(["--search"]).sections == ["search"]
    assert cli.parse_args(["--only", "all", "--skip", "ray"]).sections == [s for s in SECTIONS if s != "ray"]


@pytest.mark.parametrize("name", ["server", "duplicates", "captions", "memory"])
def test_the_long_feature_sections_run_only_when_named(name):
    assert name not in cli.parse_args([]).sections
    assert cli.parse_args(["--only", name]).sections == [name]
    assert name in cli.parse_args(["--only", "all"]).sections


def test_a_sections_options_are_benchmark_options():
    args = cli.parse_args(["--only", "server,duplicates", "--server-clients", "3",
                           "--duplicates-models", "trained-tiny", "--memory-batch-sizes", "8,16"])
    assert args.sections == ["server", "duplicates"]
    assert (args.server_clients, args.duplicates_models, args.memory_batch_sizes) == \
        (3, "trained-tiny", "8,16")


def test_no_standalone_benchmark_scripts_beside_the_package():
    """Every benchmark is a section of the one package (issue 15), not a script of its own."""
    assert sorted(p.name for p in PACKAGE.parent.glob("bench*.py")) == ["benchmark.py"]


def test_an_unknown_section_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse_args(["--only", "imagez"])
    assert stop.value.code == 2
    assert "imagez" in capsys.readouterr().err


def test_rounds_interleave_with_the_order_rotated():
    calls = []

    def contender(name):
        return lambda round_number: calls.append((round_number, name)) or f"{name}{round_number}"

    results = measure.interleaved({name: contender(name) for name in "abc"}, 3)
    assert calls == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b")]
    assert results == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1", "c2"]}


def test_memory_held_by_a_grandchild_process_is_measured():
    holder = "b = bytearray(200_000_000); import time; time.sleep(1.5)"  # bytearray writes its zeros
    spawner = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {holder!r}], check=True)"
    run = measure.run_sampled([sys.executable, "-c", spawner], interval_s=0.05)
    assert run.peak_rss_bytes > 200_000_000
    assert run.peak_tree_pss_bytes > 190_000_000


def test_a_failing_child_process_is_reported_with_its_error():
    with pytest.raises(RuntimeError, match="exited 3.*went wrong"):
        measure.run_sampled([sys.executable, "-c",
                             "import sys; print('went wrong', file=sys.stderr); sys.exit(3)"])


def imported_modules(path: Path) -> set[str]:
    """The absolute imports of a module, relative ones (within the package) left out."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module)
    return found


def test_only_engine_py_names_the_engine():
    """One table of the engine's names, so the benchmark cannot drift into its internals."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name != "engine.py":
            assert not {m for m in imported_modules(path) if m.split(".")[0] == "retrieval"}, path.name
    assert imported_modules(PACKAGE / "engine.py") <= {"__future__", "importlib", "typing"}


@pytest.mark.parametrize("name", engine.__all__)
def test_every_engine_name_is_the_packages_public_api(name):
    assert name in retrieval.__all__
    assert getattr(engine, name) is getattr(retrieval, name)


def test_every_candidate_has_published_quality_with_its_source():
    rows = {row["model"]: row for row in models.published()}
    assert set(rows) == CANDIDATES
    for name, row in rows.items():
        assert row["tag"] in open_clip.list_pretrained_tags_by_model(name), name
        assert row["source"], name
        figures = [row[key] for key in ("flickr30k_text_to_image_r1", "flickr30k_image_to_text_r1",
                                        "coco_text_to_image_r1", "coco_image_to_text_r1")]
        assert figures[2] and figures[3], f"{name}: COCO R@1 missing"
        assert all(0 < float(value) < 1 for value in figures if value), name
