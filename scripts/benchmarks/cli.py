"""The command line: options, the sections chosen, and the run that prints them one by one."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __doc__ as package_doc
from . import clip_retrieval, rclip
from .context import Context, prepare_model
from .data import DEFAULT_DATA, prepare_corpus
from .engine import load_encoder
from .measure import log, timed
from .report import load_average, machine_facts, render_header, render_model
from .sections import SECTIONS, opt_in


def section_list() -> str:
    lines = ["Sections (pick with --only / --skip):"]
    for name, module in SECTIONS.items():
        first, *rest = module.SUMMARY.split("\n")
        lines.append(f"  {name:<7} {first}")
        lines += [f"{'':10}{line}" for line in rest]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    description, usage, model_note, _ = package_doc.split("\n\n", 3)
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join([usage, section_list(), model_note]))
    parser.add_argument("--model", help="open_clip model: name, local-dir:PATH or hf-hub:ORG/REPO "
                        "[default: ViT-B-32 with random weights]")
    parser.add_argument("--pretrained", help="pretrained tag or checkpoint, with a plain --model name")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test model")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps, auto [default: cpu]")
    parser.add_argument("--batch-size", type=int, default=32, help="encoder batch [default: 32]")
    parser.add_argument("--int8", action="store_true", help="encode with 8-bit weights (CPU), "
                        "as `retrieve index --int8`")
    parser.add_argument("--images", type=Path, help=f"image folder [default: {DEFAULT_DATA} if "
                        "present, else synthetic JPEGs]")
    parser.add_argument("--limit", type=int, help="use only the first N images (copied into a "
                        "temp folder, with their captions from the folder's top-level captions file)")
    parser.add_argument("--synthetic", type=int, default=200,
                        help="synthetic images to generate when there is no folder [default: 200]")
    for module in SECTIONS.values():
        if hasattr(module, "add_arguments"):
            module.add_arguments(parser)
    rclip.add_arguments(parser)
    clip_retrieval.add_arguments(parser)
    parser.add_argument("--only", default=",".join(s for s in SECTIONS if not opt_in(s)),
                        help=f"sections to run, comma-separated: {','.join(SECTIONS)}; or all")
    parser.add_argument("--skip", default="", help="sections to leave out, comma-separated")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 100 images, N=10k only: about a minute")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.images and not args.images.is_dir():
        parser.error(f"--images {args.images}: no such folder")
    if args.quick:
        args.tiny, args.limit, args.sizes = True, args.limit or 100, "10000"
    if args.only == "all":  # every section, the opt-in ones too: the README's performance section
        args.only = ",".join(SECTIONS)
    flagged = [name for name in SECTIONS if opt_in(name) and getattr(args, name, None) is True]
    if flagged:  # --scale, --peers, --models: that section alone (or those)
        args.only = ",".join(flagged)
    args.sizes = [int(size) for size in args.sizes.split(",") if size] + [1_000_000] * args.million
    args.ray_sizes = sorted(int(size) for size in args.ray_sizes.split(",") if size)
    args.sections = [s for s in SECTIONS if s in args.only.split(",") and s not in args.skip.split(",")]
    unknown = set(filter(None, args.only.split(",") + args.skip.split(","))) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict:
    """Every section asked for, each printed as soon as it is done; returns all the numbers."""
    meta = machine_facts()
    print(render_header(meta), flush=True)
    needs = set().union(*(SECTIONS[name].NEEDS for name in args.sections))
    context = Context(args, workdir)
    if needs & {"model", "encoder", "corpus"}:
        context.spec, description = prepare_model(args, workdir)
        context.encoder, load_s = (None, None)
        if "encoder" in needs:
            context.encoder, load_s = timed(
                lambda: load_encoder(context.spec, args.device, args.batch_size, args.int8))
        meta.update(model=description + (", int8 weights" if args.int8 else ""),
                    model_spec=context.spec.identity, device=args.device, model_load_s=load_s)
        print(render_model(meta), flush=True)
    results: dict[str, Any] = {"meta": meta}
    if "corpus" in needs:
        context.corpus = prepare_corpus(args, workdir)
    for name in args.sections:
        section = SECTIONS[name]
        data, text = section.run(context)
        results[name] = data
        print(f"\n## {section.TITLE}\n\n{text}", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="retrieval-benchmark-") as tmp:
        results = run(args, Path(tmp))
    meta = results["meta"]
    meta["total_s"], meta["load_average_end"] = time.perf_counter() - started, os.getloadavg()
    print(f"\nTotal benchmark time: {meta['total_s']:.0f} s; load average at the end "
          f"{load_average(meta['load_average_end'])}.", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        log(f"wrote {args.json}")
