"""Every option of every `retrieve` command is passed by some test (see support/options.py)."""

from __future__ import annotations

import click
from support.options import untested_options


def test_every_option_of_every_command_is_passed_by_a_test():
    assert untested_options() == [], "add a test under tests/cli/ that passes each of these"


def test_an_option_no_test_passes_is_reported(tmp_path):
    @click.group()
    def group() -> None: ...

    @group.command("index")
    @click.option("--quiet", is_flag=True)
    @click.option("--new-option")
    def index(quiet: bool, new_option: str | None) -> None: ...

    @group.command("search")
    @click.option("-k", "--top-k")
    def search(top_k: str | None) -> None: ...

    (tmp_path / "test_a.py").write_text(
        'from retrieval.cli import cli\n\ndef test_a():\n    run(["index", "--quiet", "-k", "2"])\n')
    assert untested_options(group, tmp_path) == ["index --new-option"]
    (tmp_path / "test_b.py").write_text('import retrieval.cli\nARGS = "index --new-option=x"\n')
    assert untested_options(group, tmp_path) == []
    (tmp_path / "test_b.py").write_text('ARGS = "index --new-option=x"\n')  # runs no CLI
    assert untested_options(group, tmp_path) == ["index --new-option"]
