"""Commands that measure retrieval: `evaluate` (captioned images) and `evaluate-entries`."""

from __future__ import annotations

import json
import sys

import click

from ..core.errors import counted
from ..core.types import MEMORY_INDEX_TYPES
from .common import (
    batch_option,
    caption_writer_options,
    device_option,
    index_option,
    json_option,
    model_options,
    printing_query_warnings,
    reports_errors,
    warn,
)


@click.command("evaluate")
@click.argument("images", type=click.Path(file_okay=False))
@click.option("--captions", required=True, type=click.Path(dir_okay=False),
              help="Flickr token TSV, Karpathy or COCO JSON, CSV or JSONL captions of IMAGES.")
@click.option("--split", help="Only this split of a Karpathy JSON file (train, val, test ...).")
@model_options
@click.option("--index-type", type=click.Choice(("auto", *MEMORY_INDEX_TYPES)), default="auto",
              show_default=True,
              help="FAISS index measured beside exact search (auto: what an index would pick).")
@click.option("--depth", default=100, show_default=True, type=click.IntRange(10),
              help="Results fetched per query from the FAISS index.")
@click.option("--captioning", is_flag=True, help="Measure captions instead: a CoCa model captions "
              "IMAGES, scored against --captions (BLEU-1..4, METEOR, ROUGE-L, CIDEr), with "
              "images/s and CLIP-score under --model.")
@caption_writer_options
@device_option
@batch_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_option
@reports_errors
def evaluate_command(images: str, captions: str, split: str | None, model: str | None,
                     pretrained: str | None, index_type: str, depth: int, captioning: bool,
                     caption_model: str | None, caption_pretrained: str | None,
                     caption_method: str | None, caption_max_length: int | None,
                     caption_beam_width: int | None, caption_top_p: float | None, device: str,
                     batch_size: int, quiet: bool, as_json: bool) -> None:
    """Measure a model on captioned images: Recall@1/5/10, median and mean rank, both ways.

    Text -> image counts a caption right when its image comes back; image -> text counts an
    image right at the rank of the first of its captions. Measured with exact search and
    through a FAISS index of --index-type, so any loss from approximate search shows.
    With --captioning, measures the captions a CoCa model writes for IMAGES instead.
    """
    from ..encoders.spec import ModelSpec
    from ..train.evaluation import evaluate

    if captioning:
        _evaluate_captioning(images, captions, split, ModelSpec.parse(model, pretrained), caption_model,
                             caption_pretrained, dict(method=caption_method, max_length=caption_max_length,
                                                      beam_width=caption_beam_width, top_p=caption_top_p),
                             device, batch_size, not quiet and sys.stderr.isatty(), as_json)
        return

    result = evaluate(ModelSpec.parse(model, pretrained), images, captions, split, index_type, depth,
                      device, batch_size, progress=not quiet and sys.stderr.isatty())
    for path in result.unreadable:
        click.echo(f"warning: skipped {path}: not a readable image (its captions are left out)",
                   err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(f"{result.model}: {counted(result.images, 'image')}, {counted(result.captions, 'caption')} "
               f"(encoded in {result.seconds['encode']:.1f} s)\n")
    click.echo(result.table())


def _evaluate_captioning(images: str, captions: str, split: str | None, model, caption_model: str | None,
                         caption_pretrained: str | None, given: dict, device: str, batch_size: int,
                         progress: bool, as_json: bool) -> None:
    from ..encoders.caption_spec import CaptionOptions, caption_model_spec
    from ..train.captioning import evaluate_captioning

    writer = (caption_model_spec(caption_model, caption_pretrained)
              if caption_model or caption_pretrained else None)
    options = CaptionOptions(**{name: value for name, value in given.items() if value is not None})
    result = evaluate_captioning(images, captions, split, model=model, caption_model=writer, options=options,
                                 device=device, batch_size=batch_size, progress=progress)
    for path in result.unreadable:
        warn(f"skipped {path}: not a readable image (its captions are left out)")
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2))
        return
    click.echo(f"{result.caption_model} ({result.method}): {counted(result.images, 'image')} captioned, "
               f"scored against {counted(result.references, 'reference')}; CLIP-score under "
               f"{result.model}\n")
    click.echo(result.table())
    for name, why in result.skipped.items():
        click.echo(f"\n{name} {why}")


@click.command("evaluate-entries")
@click.argument("queries", type=click.Path(dir_okay=False))
@index_option
@click.option("--entries", "grouping", metavar="stem|folder|MANIFEST", default="stem",
              show_default=True, help="How files group into entries (see search --entries).")
@click.option("--depth", default=50, show_default=True, type=click.IntRange(10),
              help="Entries ranked per query.")
@json_option
@reports_errors
def evaluate_entries_command(queries: str, index_dir: str, grouping: str, depth: int,
                             as_json: bool) -> None:
    """Measure entry search: R@1/5/10 and median rank for each single modality and each fusion.

    QUERIES is a TSV (query<TAB>entry), CSV or JSONL file of queries and the entries that
    answer them: paths without suffix, or folders, relative to the file; with a manifest, its
    entry names.
    """
    from ..index import Index

    with Index.open(index_dir, readonly=True) as index, printing_query_warnings():
        results = index.evaluate_entries(queries, grouping, depth)
    if as_json:
        click.echo(json.dumps({name: vars(scores) for name, scores in results.items()}, indent=2))
        return
    click.echo("| ranking by | R@1 | R@5 | R@10 | median rank |\n|---|---|---|---|---|")
    for name, scores in results.items():
        median = f"{scores.median_rank:g}" if scores.median_rank is not None else f"> {depth}"
        recall = " | ".join(f"{100 * scores.recall[k]:.1f}" for k in (1, 5, 10))
        click.echo(f"| {name} | {recall} | {median} |")
