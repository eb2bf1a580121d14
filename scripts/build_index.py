#!/usr/bin/env python3
"""Build or update an index: the same command, options and exit codes as `retrieve index`.

    python scripts/build_index.py ~/Pictures --index indexes/photos --captions captions.tsv
"""

from retrieval.cli import index_command

if __name__ == "__main__":
    index_command(prog_name="build_index.py")
