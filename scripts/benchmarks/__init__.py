"""Benchmark the retrieval engine through its own code paths and print Markdown tables.

    python3 scripts/benchmark.py                    # full run (5-10 min on 2 CPU cores)
    python3 scripts/benchmark.py --quick            # tiny model, 100 images, N=10k (~1 min)
    python3 scripts/benchmark.py --only ann --sizes 10000 --json ann.json
    python3 scripts/benchmark.py --peers            # this project, clip-retrieval and rclip, interleaved
    python3 scripts/benchmark.py --models           # the candidate default models on this CPU

The default model is ViT-B-32 with seeded random weights written as a `local-dir:` model
(speed does not depend on weight values, and nothing is downloaded).

One module per section (`benchmarks/<section>.py`: NAME, TITLE, SUMMARY, NEEDS, `run(context)`,
optionally OPT_IN and `add_arguments(parser)`), listed in `sections.py`. They share `data.py`
(everything measured on), `measure.py` (how it is measured), `report.py` (tables) and
`engine.py`, the one place that names the engine's modules.
"""
