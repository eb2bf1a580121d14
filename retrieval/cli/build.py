"""Commands that write or describe an index: `index`, `remove`, `convert` and `info`."""

from __future__ import annotations

import json
import sys

import click

from ..core.errors import counted
from ..core.types import (
    ENGINES,
    FRAME_POOLINGS,
    FUSIONS,
    INDEX_TYPES,
    MODALITIES,
)
from .common import (
    batch_option,
    caption_writer_options,
    device_option,
    index_option,
    json_option,
    media_cap_options,
    model_options,
    print_report,
    reports_errors,
    wait_option,
    wait_or_refuse,
)


def caption_options(command):
    """--caption and the options of the captions a CoCa model writes for images at build time."""
    options = [
        click.option("--caption/--no-caption", default=None,
                     help="Write a caption with a CoCa model for every image without one (recorded: "
                     "later builds caption new and changed images) / stop writing them."),
        click.option("--caption-all/--caption-uncaptioned", "caption_all", default=None,
                     help="Caption every image, beside its human captions / only those without "
                     "[recorded; default: only those without]."),
        caption_writer_options,
        click.option("--recaption", is_flag=True,
                     help="Replace captions another caption model (or method) wrote."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("index")
@click.argument("sources", nargs=-1, type=click.Path())
@index_option
@click.option("--captions", multiple=True, type=click.Path(dir_okay=False),
              help="Captions file: Flickr token TSV, CSV, JSONL or COCO JSON (repeatable).")
@click.option("--exclude-dir", multiple=True,
              help="Folder name or path not to enter (repeatable).")
@click.option("--include-hidden", is_flag=True, help="Also index hidden files and folders.")
@media_cap_options(image="Skip images larger than this (guards against decompression bombs).",
                   audio="Skip sounds longer than this (each is decoded whole, in memory).",
                   video="Skip longer videos.")
@click.option("--frame-rate", type=click.FloatRange(min=0, min_open=True),
              help="Video frames sampled per second [recorded by the index; default 1].")
@click.option("--scene-threshold", type=click.FloatRange(0, 1, min_open=True),
              help="Also sample a video frame at every cut this large (0-1) [default: none].")
@click.option("--temporal", type=click.Choice(FRAME_POOLINGS),
              help="How a video segment's frames are pooled [recorded by the index; default mean].")
@click.option("--fusion", type=click.Choice(FUSIONS),
              help="Default fusion for searches with --entries [recorded by the index; default rrf].")
@model_options
@click.option("--audio-model", help="Embed audio with a CLAP model: clap:NAME (e.g. "
              "clap:laion/clap-htsat-unfused) or clap:/folder; default: the tower `retrieve "
              "train-audio` trains.")
@click.option("--index-type", type=click.Choice(INDEX_TYPES),
              help="FAISS index for a new index [default: auto, by size]; see `retrieve convert`.")
@click.option("--rebuild", is_flag=True, help="Drop all vectors and re-encode everything (with "
              "--model, with that model; with --audio-model alone, the sounds only).")
@device_option
@batch_option
@click.option("--int8", is_flag=True,
              help="Encode with 8-bit weights on the CPU: images about 3x faster for ViT models, "
                   "vectors at cosine 0.99+ with the exact ones.")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="ray: decode and encode images as a Ray Data job (GPUs where the cluster has them).")
@click.option("--address", help="With --engine ray: the cluster (auto, ray://HOST:PORT) "
              "[default: start Ray on this machine].")
@click.option("--follow-external-links", is_flag=True,
              help="Follow symlinks that lead outside the sources (skipped otherwise) [recorded per source].")
@caption_options
@click.option("--quiet", is_flag=True, help="No progress bar, no per-file warnings.")
@json_option
@wait_option
@reports_errors
def index_command(sources: tuple[str, ...], index_dir: str, captions: tuple[str, ...],
                  exclude_dir: tuple[str, ...], include_hidden: bool, max_megapixels: float,
                  max_audio_seconds: float, max_video_seconds: float, frame_rate: float | None,
                  scene_threshold: float | None, temporal: str | None, fusion: str | None,
                  model: str | None,
                  pretrained: str | None,
                  audio_model: str | None, index_type: str | None,
                  rebuild: bool, device: str, batch_size: int, int8: bool, engine: str,
                  address: str | None, follow_external_links: bool, caption: bool | None,
                  caption_all: bool | None, caption_model: str | None, caption_pretrained: str | None,
                  caption_method: str | None, caption_max_length: int | None,
                  caption_beam_width: int | None, caption_top_p: float | None, recaption: bool,
                  quiet: bool, as_json: bool, wait: bool) -> None:
    """Build or update an index over folders and files, incrementally.

    Only new and changed files are encoded; moved files keep their vectors; files gone from
    SOURCES are forgotten. With no SOURCES, the folders and captions files indexed before are
    scanned again, each folder with the --exclude-dir and --include-hidden it was given.
    With --caption, a CoCa model writes captions for images (see README, "Captions").
    """
    wait_or_refuse(index_dir, wait)
    from ..index import Index

    with Index.open(index_dir, model=model, pretrained=pretrained, create=True, rebuild=rebuild,
                    index_type=index_type, device=device, batch_size=batch_size,
                    int8=int8, audio_model=audio_model, wait=wait) as index:
        if frame_rate or scene_threshold or temporal or fusion:
            index.configure(fusion=fusion, frame_rate=frame_rate, scene_threshold=scene_threshold,
                            temporal=temporal)
        report = index.add(*sources, captions=captions, exclude=exclude_dir or None,
                           include_hidden=include_hidden or None,
                           follow_external_links=follow_external_links or None, max_megapixels=max_megapixels,
                           max_audio_seconds=max_audio_seconds, max_video_seconds=max_video_seconds,
                           progress=not quiet and sys.stderr.isatty(), engine=engine, address=address,
                           caption=caption, caption_every_image=caption_all, caption_model=caption_model,
                           caption_pretrained=caption_pretrained, caption_method=caption_method,
                           caption_max_length=caption_max_length, caption_beam_width=caption_beam_width,
                           caption_top_p=caption_top_p, recaption=recaption)
    print_report(report, as_json, quiet)


@click.command("remove")
@click.argument("sources", nargs=-1, required=True, type=click.Path())
@index_option
@wait_option
@reports_errors
def remove_command(sources: tuple[str, ...], index_dir: str, wait: bool) -> None:
    """Forget the files at or under SOURCES (the files themselves are untouched)."""
    wait_or_refuse(index_dir, wait)
    from ..index import Index

    with Index.open(index_dir, wait=wait) as index:
        removed = index.remove(*sources)
    click.echo(f"removed {counted(removed, 'file')}")


@click.command("convert")
@click.argument("index_type", type=click.Choice(INDEX_TYPES))
@index_option
@click.option("--ef-search", type=click.IntRange(1), help="HNSW: graph nodes visited per query.")
@click.option("--nprobe", type=click.IntRange(1), help="IVF: inverted lists scanned per query.")
@click.option("--rerank", type=click.IntRange(1),
              help="IVF: candidates re-ranked exactly, as a multiple of k.")
@click.option("--memory-budget-mb", type=click.IntRange(1),
              help="auto: RAM the vectors may take before a compressed index is chosen.")
@wait_option
@reports_errors
def convert_command(index_type: str, index_dir: str, ef_search: int | None, nprobe: int | None,
                    rerank: int | None, memory_budget_mb: int | None, wait: bool) -> None:
    """Switch the FAISS index type (auto, flat, hnsw, ivf-sq, ivf-pq, or ivf-sq-disk and
    ivf-pq-disk: lists and vectors memory-mapped from disk) without re-encoding."""
    wait_or_refuse(index_dir, wait)
    from ..index import Index

    budget = memory_budget_mb << 20 if memory_budget_mb else None
    with Index.open(index_dir, wait=wait) as index:
        index.convert(index_type, ef_search=ef_search, nprobe=nprobe, rerank=rerank,
                      memory_budget=budget)
        built = {m: index.vectors(m).index_type for m in MODALITIES}
    click.echo(f"index type {index_type}: " + ", ".join(f"{m} {t}" for m, t in built.items()))


@click.command("info")
@index_option
@json_option
@reports_errors
def info_command(index_dir: str, as_json: bool) -> None:
    """Show an index's model, vector size and item counts."""
    from ..index import Index

    with Index.open(index_dir, readonly=True) as index:
        stats = index.stats()
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    model = stats["model"]
    click.echo(f"index   {stats['path']}")
    click.echo(f"model   {model['name']}" + (f" ({model['pretrained']})" if model["pretrained"] else ""))
    click.echo(f"dim     {stats['dim']}")
    click.echo(f"type    {stats['index_type']}")
    click.echo(f"audio   {stats['audio_model'] or 'no audio encoder (see retrieve train-audio)'}")
    for modality, count in stats["counts"].items():
        click.echo(f"{modality:<7} {count}")
    captioning = stats["captioning"]
    if captioning or stats["generated_captions"]:
        writer = "builds write none now"
        if captioning:
            pretrained = f" ({captioning['pretrained']})" if captioning["pretrained"] else ""
            writer = f"builds write them with {captioning['model']}{pretrained}"
        click.echo(f"captions {stats['generated_captions']} written by a model; {writer}")
