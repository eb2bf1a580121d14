#!/usr/bin/env python3
"""Evaluate a model on captioned images: the same command, options and exit codes as
`retrieve evaluate`.

    python scripts/evaluate.py photos/ --captions photos/captions.tsv --index-type hnsw
"""

from retrieval.cli import evaluate_command

if __name__ == "__main__":
    evaluate_command(prog_name="evaluate.py")
