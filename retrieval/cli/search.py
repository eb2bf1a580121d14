"""`retrieve search` (the default command): text, image, sound and video queries, here or on a server."""

from __future__ import annotations

import json
import shutil

import click

from ..core.errors import IndexEmptyError
from ..core.types import FUSIONS, TARGETS
from .common import (
    SearchCommand,
    device_option,
    index_option,
    json_option,
    model_options,
    printing_query_warnings,
    reports_errors,
)


@click.command("search", cls=SearchCommand)
@click.argument("query", nargs=-1)
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False),
              help="Query image (repeatable); combined with any text query.")
@click.option("--audio", "sounds", multiple=True, type=click.Path(dir_okay=False),
              help="Query sound (repeatable): wav, flac, ogg or mp3; combined with the rest.")
@click.option("--video", "videos", multiple=True, type=click.Path(dir_okay=False),
              help="Query video (repeatable): mp4, mkv, webm or mov; combined with the rest.")
@index_option
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1),
              help="How many results.")
@click.option("--target", type=click.Choice(TARGETS),
              default="auto", show_default=True,
              help="Modality to return; auto: images for text, texts for images, sounds for sounds, "
              "videos for videos (or the next kind the index holds).")
@click.option("--filter", "filter_text", metavar="TERMS",
              help="Filter, e.g. 'modality:image under:2020 size>1MB -text:beach meta.camera=Canon' "
              "(README: Filters).")
@click.option("--where", help="Raw SQL filter over item_view (id, modality, uri, text, path, size, "
              "mtime, meta), e.g. \"path LIKE '%2024%'\"; read-only, stopped after --where-timeout.")
@click.option("--where-timeout", default=3.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a --where filter may run.")
@click.option("--under", type=click.Path(), help="Only items whose file is under this folder.")
@click.option("--min-score", type=float, help="Drop results below this cosine similarity.")
@click.option("--dedup", is_flag=True, help="One hit per group of near-duplicates, with how many "
              "others it stands for (see retrieve duplicates).")
@click.option("--entries", metavar="stem|folder|MANIFEST",
              help="Return entries instead of single items: files sharing a stem, a folder, or "
              "as a manifest (CSV/JSONL with entry and path fields) groups them.")
@click.option("--fusion", type=click.Choice(FUSIONS),
              help="How --entries fuses the modalities' evidence [default: the index's, else rrf] "
              "(attention: the gate retrieve train-fusion trained).")
@click.option("--weights", metavar="image=2,text=1", callback=lambda ctx, param, value: _weights(value),
              help="With --entries: each modality's weight in the fusion (weighted, concat, sum, "
              "max, rrf) [default: 1 each].")
@click.option("--server", envvar="RETRIEVAL_SERVER", metavar="URL",
              help="Ask a running `retrieve serve` (e.g. http://127.0.0.1:8000) instead of "
              "opening the index here: no model to load (or set RETRIEVAL_SERVER).")
@click.option("--int8", is_flag=True,
              help="Encode the text with the 8-bit text tower the build exported: about half the "
              "CPU time a query; vectors agree at cosine 0.99 or better, rankings may differ a little.")
@json_option
@model_options
@device_option
@reports_errors
def search_command(query: tuple[str, ...], images: tuple[str, ...], sounds: tuple[str, ...],
                   videos: tuple[str, ...], index_dir: str, k: int,
                   target: str, filter_text: str | None, where: str | None, where_timeout: float,
                   under: str | None, min_score: float | None,
                   dedup: bool, entries: str | None, fusion: str | None, weights: dict[str, float] | None,
                   server: str | None, int8: bool, as_json: bool,
                   model: str | None, pretrained: str | None, device: str) -> None:
    """Search the index with text, images, sounds or a combined query like "cat + 2:dog - grass".

    The index's own model encodes the query; --model only checks that it is the one expected.
    A query that starts with '-' goes after --: retrieve -- "-dog".
    """
    text = " ".join(query) if query else None
    if weights and not entries:
        raise click.BadParameter("weights fuse the modalities of entries: add --entries",
                                 param_hint="'--weights'")
    if dedup and entries:
        raise click.BadParameter("--dedup folds single hits; entries are not deduplicated",
                                 param_hint="'--dedup'")
    if int8 and server:
        raise click.BadParameter("the server encodes queries with its own towers", param_hint="'--int8'")
    if entries:
        with printing_query_warnings():
            found = _entries_here(index_dir, text, images, sounds, videos, int8,
                                  dict(k=k, grouping=entries, fusion=fusion, weights=weights,
                                       filter=filter_text, where=where, under=under,
                                       where_timeout=where_timeout))
        _print_entries(found, as_json)
        return
    search = dict(k=k, target=target, where=where, under=under, min_score=min_score,
                  dedup=dedup or None, filter=filter_text)
    if server:
        from ..serve.client import search_server

        hits = search_server(server, text, list(images), list(sounds), **search)
    else:
        search["where_timeout"] = where_timeout
        search["video"] = list(videos) or None
        with printing_query_warnings():
            hits = _search_here(index_dir, text, images, sounds, model, pretrained, device, int8, search)
    if as_json:
        click.echo(json.dumps([hit.to_dict() for hit in hits], ensure_ascii=False, indent=2))
    elif not hits:
        click.echo("no results", err=True)
    else:
        _print_hits(hits)


def _search_here(index_dir: str, text: str | None, images: tuple[str, ...], sounds: tuple[str, ...],
                 model: str | None, pretrained: str | None, device: str, int8: bool,
                 search: dict) -> list:
    from ..index import Index

    with Index.open(index_dir, model=model, pretrained=pretrained, device=device, int8=int8,
                    readonly=True, one_shot=True) as index:
        if index.store.is_empty():
            raise IndexEmptyError(
                f"index {index.path} holds no items yet; add some with: "
                f"retrieve index SOURCE... --index {index_dir}")
        return index.search(text, image=list(images) or None, audio=list(sounds) or None, **search)


def _entries_here(index_dir: str, text: str | None, images: tuple[str, ...], sounds: tuple[str, ...],
                  videos: tuple[str, ...], int8: bool, search: dict) -> list:
    from ..index import Index

    with Index.open(index_dir, int8=int8, readonly=True, one_shot=True) as index:
        return index.search_entries(text, image=list(images) or None, audio=list(sounds) or None,
                                    video=list(videos) or None, **search)


def _weights(value: str | None) -> dict[str, float] | None:
    """`image=2,text=1` as {"image": 2.0, "text": 1.0}; the engine checks names and values."""
    if value is None:
        return None
    weights = {}
    for part in value.split(","):
        name, equals, number = part.partition("=")
        try:
            weights[name.strip()] = float(number)
        except ValueError:
            equals = ""
        if not equals or not name.strip():
            raise click.BadParameter(f"{part.strip()!r} is not MODALITY=NUMBER; give weights as "
                                     "image=2,text=1", param_hint="'--weights'")
    return weights


def _print_entries(hits, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([hit.to_dict() for hit in hits], ensure_ascii=False, indent=2))
        return
    for rank, hit in enumerate(hits, 1):
        shares = ", ".join(f"{m} {share:.3f}" for m, share in hit.contributions.items())
        click.echo(f"{rank:>3}  {hit.score:.3f}  {hit.entry}  ({shares})")
        for modality, part in hit.parts.items():
            text = f"  {part.text}" if part.text else ""
            click.echo(f"       {modality:<5}  {part.score:.3f}  {part.uri}{text}")


def _print_hits(hits) -> None:
    width = shutil.get_terminal_size((120, 20)).columns
    rows = [(f"{rank:>3}", f"{hit.score:.3f}", hit.metadata.get("image", hit.uri),
             ("[generated] " if hit.generated else "")
             + (f"(+{len(hit.duplicates)} near-duplicate{'s' if len(hit.duplicates) > 1 else ''}) "
                if hit.duplicates else "") + (hit.text or ""))
            for rank, hit in enumerate(hits, 1)]
    place_width = min(max(len(row[2]) for row in rows), max(20, width // 2))
    for rank, score, place, text in rows:
        if len(place) > place_width:  # the file name and its nearest folders say most
            place = "…" + place[len(place) - place_width + 1:]
        line = f"{rank}  {score}  {place:<{place_width}}  {text}"
        click.echo(line if len(line) <= width else line[:width - 1] + "…")
