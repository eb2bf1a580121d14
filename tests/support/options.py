"""Which options of which `retrieve` commands no test passes.

A test file passes an option to a command when it runs the CLI (names `retrieval.cli`), names
the command as a string (`"index"`, `"train-audio"`; every CLI test runs the default `search`)
and holds the option as a word of a string. A file-level reading, so it can be fooled by an
option named in one call and a command in another; it cannot miss a new option nobody names.

    python tests/support/options.py        # lists the untested options, exit 1 if there are any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import click

from retrieval.cli import cli

TESTS = Path(__file__).resolve().parents[1]


def command_options(group: click.Group) -> dict[str, list[tuple[str, ...]]]:
    """Every command's options, each as its names (`("-k",)`, `("--index",)`)."""
    return {name: [tuple(p.opts + p.secondary_opts) for p in command.params
                   if isinstance(p, click.Option)]
            for name, command in sorted(group.commands.items())}


def options_passed(tests: Path, commands: set[str], default: str) -> dict[str, set[str]]:
    """For each command, the option-like words of the test files that run it."""
    passed: dict[str, set[str]] = {}
    for path in sorted(tests.rglob("test_*.py")):
        source = path.read_text()
        if "retrieval.cli" not in source:
            continue
        words = {word.split("=", 1)[0]
                 for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str)
                 for word in node.value.split()}
        for command in {default} | (commands & words):
            passed.setdefault(command, set()).update(w for w in words if w.startswith("-"))
    return passed


def untested_options(group: click.Group = cli, tests: Path = TESTS, default: str = "search"
                     ) -> list[str]:
    """`command --option` for each option of `group` no test file under `tests` passes to its
    command (`default`: the command that runs when none is named)."""
    options = command_options(group)
    passed = options_passed(tests, set(options), default)
    return [f"{command} {names[-1]}" for command, every in options.items() for names in every
            if not set(names) & passed.get(command, set())]


if __name__ == "__main__":
    missing = untested_options()
    total = sum(len(every) for every in command_options(cli).values())
    print(f"{len(missing)} of {total} command options appear in no test", *missing, sep="\n  ")
    sys.exit(1 if missing else 0)
