#!/usr/bin/env python3
"""Benchmark the retrieval engine and print Markdown tables: `python3 scripts/benchmark.py --help`.

The sections live in the `benchmarks` package beside this file, one module each.
"""

from benchmarks.cli import main

if __name__ == "__main__":
    main()
