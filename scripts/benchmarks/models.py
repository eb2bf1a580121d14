"""n. Candidate default models on this CPU: bare open_clip with random weights (speed does not
depend on them), each model in processes of its own: images/s and texts/s at the build's batch,
a cold text query and a cold image query (whole processes: imports, weights read from disk,
re-parameterisation, one encode), and peak memory; beside each model's published retrieval
quality (`published_quality.csv`, every number with its source)."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

import open_clip

from .context import Context
from .data import QUERY, generated_captions, image_files, image_source, write_synthetic_images
from .measure import Measured, log, python_env, run_sampled
from .report import mib, table
from .weights import write_random_model

NAME = "models"
TITLE = "n. Candidate default models on this CPU"
SUMMARY = ("(only with --models) candidate default models, random weights, bare open_clip:\n"
           "images/s, texts/s, cold queries, peak memory, beside published retrieval quality")
NEEDS: set[str] = set()
OPT_IN = True
QUALITY = Path(__file__).with_name("published_quality.csv")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", action="store_true",
                        help="run only the models section: the candidate default models on this CPU")
    parser.add_argument("--model-candidates", help="models to measure, comma-separated "
                        f"[default: every model in {QUALITY.name}]")
    parser.add_argument("--model-batches", type=int,
                        help="timed image batches per model [default: 4; 1 with --quick]")
    parser.add_argument("--model-texts", type=int,
                        help="texts encoded per model for texts/s [default: 256; 32 with --quick]")


def published() -> list[dict[str, str]]:
    with QUALITY.open(newline="") as file:
        return list(csv.DictReader(file))


def probe(*arguments: str) -> tuple[Measured, dict]:
    measured = run_sampled([sys.executable, "-m", "benchmarks.model_probe", *arguments],
                           env=python_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    return measured, json.loads(measured.stdout.splitlines()[-1])


def query_photo(args: argparse.Namespace, workdir: Path) -> Path:
    source = image_source(args)
    if source is not None:
        return image_files(Path(source))[0]
    write_synthetic_images(workdir / "model-photo", 1, args.seed)
    return next((workdir / "model-photo").glob("*.jpg"))


def hf_tokenizer(name: str) -> str | None:
    return open_clip.get_model_config(name)["text_cfg"].get("hf_tokenizer_name")


def measure(row: dict[str, str], args: argparse.Namespace, workdir: Path, texts: Path, photo: Path,
            batches: int) -> dict:
    name = row["model"]
    folder = workdir / f"candidate-{name}"
    spec = write_random_model(name, folder, args.seed, row["tag"] or None)
    try:
        log(f"models: {name}: throughput")
        run, figures = probe("throughput", spec, str(texts), str(args.batch_size), str(batches))
        result = {**figures, "peak_rss_bytes": run.peak_rss_bytes}
        log(f"models: {name}: cold image query")
        run, figures = probe("image", spec, str(photo))
        result["cold_image"] = {**figures, "wall_s": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes}
        if result["texts_per_s"] is not None:
            log(f"models: {name}: cold text query")
            run, figures = probe("text", spec, str(texts))
            result["cold_text"] = {**figures, "wall_s": run.wall_s, "peak_rss_bytes": run.peak_rss_bytes}
        elif tokenizer := hf_tokenizer(name):
            result["text_skipped"] = (f"the text side needs the Hugging Face tokenizer {tokenizer}, which "
                                      "is in no local cache and in no package installed here")
        return result
    except RuntimeError as error:
        return {"failed": str(error).strip().splitlines()[-1][:300]}
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # hundreds of MB a model


def run(context: Context) -> tuple[dict, str]:
    args, workdir = context.args, context.workdir
    rows = published()
    wanted = args.model_candidates.split(",") if args.model_candidates else [row["model"] for row in rows]
    unknown = set(wanted) - {row["model"] for row in rows}
    if unknown:
        raise SystemExit(f"--model-candidates: {', '.join(sorted(unknown))} not in {QUALITY}; "
                         f"choose from {', '.join(row['model'] for row in rows)}")
    batches = args.model_batches or (1 if args.quick else 4)
    texts = workdir / "model-texts.json"
    count = args.model_texts or (32 if args.quick else 256)
    texts.write_text(json.dumps([QUERY, *generated_captions(count - 1, args.seed)]))
    photo = query_photo(args, workdir)
    measured = {row["model"]: measure(row, args, workdir, texts, photo, batches)
                for row in rows if row["model"] in wanted}
    data = {"batch": args.batch_size, "batches": batches, "photo": str(photo), "measured": measured,
            "published": [row for row in rows if row["model"] in wanted]}
    return data, render(data)


def render(data: dict) -> str:
    measured = {}
    for row in data["published"]:
        figures = data["measured"][row["model"]]
        if "failed" in figures:
            measured[row["model"]] = [f"failed: {figures['failed']}"] + ["-"] * 6
            continue
        text, image = figures.get("cold_text"), figures["cold_image"]
        peak = max(figures["peak_rss_bytes"], image["peak_rss_bytes"], (text or {}).get("peak_rss_bytes", 0))
        measured[row["model"]] = [
            f"{figures['images_per_s']:.1f}",
            f"{figures['texts_per_s']:.0f}" if figures["texts_per_s"] else "- (tokenizer)³",
            f"{text['wall_s']:.2f} s" if text else "-",
            f"{image['wall_s']:.2f} s",
            mib(peak),
            f"{figures['input_side']} px, {figures['folded_modules']} folded",
        ]

    def quality(value: str) -> str:
        return f"{float(value) * 100:.1f}" if value else "-"

    rows = [(row["model"], *measured[row["model"]],
             *[quality(row[key]) for key in ("flickr30k_text_to_image_r1", "flickr30k_image_to_text_r1",
                                             "coco_text_to_image_r1", "coco_image_to_text_r1")])
            for row in data["published"]]
    sources = [f"- {row['model']} ({row['tag']}): {row['source']}" for row in data["published"]]
    skipped = sorted({figures["text_skipped"] for figures in data["measured"].values()
                      if "text_skipped" in figures})
    return "\n".join([
        f"Bare open_clip on this CPU, random weights, batch {data['batch']} ({data['batches']} timed image "
        f"batches of random pixels after two warm-up batches; texts at full context length, no padding "
        f"trimmed); every model re-parameterised before use (timm's `reparameterize_model`).", "",
        table(("model", "images/s", "texts/s", "cold text query¹", "cold image query¹", "peak memory²",
               "input, re-parameterised modules", "Flickr30k T→I R@1", "Flickr30k I→T R@1",
               "COCO T→I R@1", "COCO I→T R@1"), rows), "",
        "¹ A whole new process: imports, the random weights read from a `local-dir:` folder, "
        f"re-parameterisation and one encode (the query image: {Path(data['photo']).name}).",
        "² The largest process of the model's runs (the throughput run, or a cold query).",
        *[f"³ {reason}." for reason in skipped], "",
        "Published retrieval quality (R@1 in %; T→I finds images from text, I→T texts from an image), "
        "by source:", "", *sources])
