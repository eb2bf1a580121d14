"""The `retrieve` command: a thin click layer over `retrieval.Index`, one module per group of commands.

`retrieve "a dog in the park"` searches (the default command); `retrieve index SRC...` builds.
Exit codes: 0 success, 1 runtime failure, 2 usage error.
"""

from __future__ import annotations

import click

from ..core.imports import exit_quickly
from .build import convert_command, index_command, info_command, remove_command
from .common import SearchFirstGroup
from .duplicates import duplicates_command
from .evaluate import evaluate_command, evaluate_entries_command
from .search import search_command
from .serve import serve_command
from .train import train_audio_command, train_command, train_fusion_command, train_temporal_command


@click.group(cls=SearchFirstGroup, default="search", default_if_no_args=False)
@click.version_option(package_name="retrieval")
def cli() -> None:
    """Search images, texts and sounds by meaning, with open_clip, FAISS and SQLite.

    \b
      retrieve index ~/Pictures --captions captions.tsv   build or update an index
      retrieve "a dog in the park"                        text -> images
      retrieve --image q.jpg --target text                image -> captions
      retrieve "cat + 2:dog - grass"                      combined query
      retrieve train-audio sounds/                        teach the index to hear
      retrieve "a dog barking" --target audio             text -> sounds
      retrieve --audio bark.wav --target image            sound -> images
      retrieve duplicates --script rm.sh                  find copies, plan what to keep
    """


for command in (search_command, index_command, remove_command, convert_command, info_command,
                train_command, train_audio_command, train_fusion_command, train_temporal_command,
                evaluate_command, evaluate_entries_command, serve_command, duplicates_command):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="retrieve")
    finally:
        exit_quickly()


if __name__ == "__main__":
    main()
