"""The `retrieve` command: a thin click layer over `retrieval.Index`.

`retrieve "a dog in the park"` searches (the default command); `retrieve index SRC...` builds.
Exit codes: 0 success, 1 runtime failure, 2 usage error.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import wraps

import click
from click_default_group import DefaultGroup

from ..core.errors import IndexEmptyError, IndexLockedError, QueryWarning, RetrievalError, counted
from ..core.types import MODALITIES
from ..media.audio import DEFAULT_MAX_AUDIO_SECONDS
from ..media.images import DEFAULT_MAX_MEGAPIXELS
from ..media.video import DEFAULT_MAX_VIDEO_SECONDS

MEMORY_INDEX_TYPES = ("auto", "flat", "hnsw", "ivf-sq", "ivf-pq")
INDEX_TYPES = (*MEMORY_INDEX_TYPES, "ivf-sq-disk", "ivf-pq-disk")  # as retrieval.index.INDEX_TYPES

DEFAULT_INDEX = "indexes/default"

index_option = click.option(
    "--index", "index_dir", envvar="RETRIEVAL_INDEX", default=DEFAULT_INDEX, show_default=True,
    type=click.Path(file_okay=False), help="Index directory (or set RETRIEVAL_INDEX).")
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, mps ...")
batch_option = click.option(
    "--batch-size", default=32, show_default=True, type=click.IntRange(1),
    help="Items encoded per forward pass.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
wait_option = click.option(
    "--wait", is_flag=True,
    help="If another process is writing the index, wait for it instead of stopping.")


def schedule_options(epochs: int, batch_size: int, learning_rate: float):
    """--epochs, --batch-size and --learning-rate, with a trainer's defaults."""
    def decorate(command):
        command = click.option("--learning-rate", default=learning_rate, show_default=True,
                               type=click.FloatRange(min=0, min_open=True))(command)
        command = click.option(
            "--batch-size", default=batch_size, show_default=True, type=click.IntRange(2),
            help="Pairs per step; the other pairs of a batch are each pair's negatives.")(command)
        return click.option("--epochs", default=epochs, show_default=True,
                            type=click.IntRange(1))(command)
    return decorate


def model_options(command):
    """--model and --pretrained, shared by every command that names a model."""
    command = click.option(
        "--pretrained", help="Pretrained tag (default laion2b_s34b_b79k for ViT-B-32) "
        "or a checkpoint file.")(command)
    return click.option(
        "--model", help="open_clip model name, local-dir:PATH or hf-hub:ORG/REPO "
        "[default for a new index: ViT-B-32].")(command)


def reports_errors(command):
    """Turn the engine's errors into one line on stderr and the right exit code."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except IndexLockedError as error:
            click.echo(f"error: index {error.path} is being written by {error.holder}; run again "
                       "when it is done, or add --wait to wait for it", err=True)
            sys.exit(error.exit_code)
        except RetrievalError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; what was committed is kept, run again to resume", err=True)
            sys.exit(130)
    return wrapper


class SearchFirstGroup(DefaultGroup):
    """The default-command group, where a leading `--` belongs to the search query:
    `retrieve -- "-dog"` searches for "-dog" (a bare group would swallow the `--`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args[:1] == ["--"]:
            args = [self.default_cmd_name, *args]
        return super().parse_args(ctx, args)


class SearchCommand(click.Command):
    """A command whose arguments are query words, and a word that starts with '-' but that no
    option could be ("- dog") is one of them too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _options_then_words(ctx, self.get_params(ctx), args))


def _options_then_words(ctx: click.Context, params: list[click.Parameter], args: list[str]
                        ) -> list[str]:
    """`args` reordered as options, `--`, then the query words in their order, so that click
    takes every query word as one. A word that could name an option but names none ("-dog",
    "--imgae") is refused, with a hint for a query that really starts with '-'."""
    takes_value = {name: not (param.is_flag or param.count)
                   for param in params if isinstance(param, click.Option)
                   for name in (*param.opts, *param.secondary_opts)}
    options: list[str] = []
    words: list[str] = []
    rest = iter(args)
    for arg in rest:
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg[:2]
        if arg == "--":
            words += rest
        elif arg in takes_value:
            value = next(rest, None) if takes_value[arg] else None
            if takes_value[arg] and value is None:
                return args  # click reports the missing value
            options += [arg] if value is None else [arg, value]
        elif takes_value.get(name):  # --index=DIR, -k5
            options.append(arg)
        elif arg.startswith("-") and len(arg) > 1 and not any(c.isspace() for c in arg):
            error = click.NoSuchOption(arg, possibilities=[n for n in takes_value if n[:2] == "--"],
                                       ctx=ctx)
            if not error.possibilities and not arg.startswith("--"):
                error.message = (f"No such option {arg!r}; a query that starts with '-' goes "
                                 f"after --, as in: retrieve -- {shlex.quote(arg)}")
            raise error
        else:
            words.append(arg)
    return [*options, "--", *words] if words else options


def wait_or_refuse(index_dir: str, wait: bool) -> None:
    """Before any slow start: refuse a write at once while another process writes the index,
    or, with --wait, say what this one waits for."""
    from ..storage.folder import index_writer

    holder = index_writer(index_dir)
    if holder is not None and not wait:
        raise IndexLockedError(index_dir, holder)
    if holder is not None:
        click.echo(f"waiting for {holder} to finish writing index {index_dir}", err=True)


@contextmanager
def printing_query_warnings() -> Iterator[None]:
    """Show the engine's warnings about a query (a term naming no file) as one line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QueryWarning)
        try:
            yield
        finally:
            for warning in caught:
                if issubclass(warning.category, QueryWarning):
                    click.echo(f"warning: {warning.message}", err=True)
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename,
                                         warning.lineno)


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
    """


@cli.command("search", cls=SearchCommand)
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
@click.option("--target", type=click.Choice(["auto", "image", "text", "audio", "video"]),
              default="auto", show_default=True,
              help="Modality to return; auto: images for text, texts for images, sounds for sounds, "
              "videos for videos (or the next kind the index holds).")
@click.option("--where", help="SQL filter over item_view (id, modality, uri, text, path, size, "
              "mtime, meta), e.g. \"path LIKE '%2024%'\".")
@click.option("--under", type=click.Path(), help="Only items whose file is under this folder.")
@click.option("--min-score", type=float, help="Drop results below this cosine similarity.")
@click.option("--entries", metavar="stem|folder|MANIFEST",
              help="Return entries instead of single items: files sharing a stem, a folder, or "
              "as a manifest (CSV/JSONL with entry and path fields) groups them.")
@click.option("--fusion", type=click.Choice(["rrf", "sum", "max", "mean", "weighted", "concat", "attention"]),
              help="How --entries fuses the modalities' evidence [default: the index's, else rrf] "
              "(attention: the gate retrieve train-fusion trained).")
@click.option("--weights", metavar="image=2,text=1", callback=lambda ctx, param, value: _weights(value),
              help="With --entries: each modality's weight in the fusion (weighted, concat, sum, "
              "max, rrf) [default: 1 each].")
@click.option("--server", envvar="RETRIEVAL_SERVER", metavar="URL",
              help="Ask a running `retrieve serve` (e.g. http://127.0.0.1:8000) instead of "
              "opening the index here: no model to load (or set RETRIEVAL_SERVER).")
@json_option
@model_options
@device_option
@reports_errors
def search_command(query: tuple[str, ...], images: tuple[str, ...], sounds: tuple[str, ...],
                   videos: tuple[str, ...], index_dir: str, k: int,
                   target: str, where: str | None, under: str | None, min_score: float | None,
                   entries: str | None, fusion: str | None, weights: dict[str, float] | None,
                   server: str | None, as_json: bool,
                   model: str | None, pretrained: str | None, device: str) -> None:
    """Search the index with text, images, sounds or a combined query like "cat + 2:dog - grass".

    The index's own model encodes the query; --model only checks that it is the one expected.
    A query that starts with '-' goes after --: retrieve -- "-dog".
    """
    text = " ".join(query) if query else None
    if weights and not entries:
        raise click.BadParameter("weights fuse the modalities of entries: add --entries",
                                 param_hint="'--weights'")
    if entries:
        with printing_query_warnings():
            found = _entries_here(index_dir, text, images, sounds, videos, k, entries, fusion, weights)
        _print_entries(found, as_json)
        return
    search = dict(k=k, target=target, where=where, under=under, min_score=min_score)
    if server:
        from ..serve.client import search_server

        hits = search_server(server, text, list(images), list(sounds), **search)
    else:
        search["video"] = list(videos) or None
        with printing_query_warnings():
            hits = _search_here(index_dir, text, images, sounds, model, pretrained, device, search)
    if as_json:
        click.echo(json.dumps([hit.to_dict() for hit in hits], ensure_ascii=False, indent=2))
    elif not hits:
        click.echo("no results", err=True)
    else:
        _print_hits(hits)


def _search_here(index_dir: str, text: str | None, images: tuple[str, ...], sounds: tuple[str, ...],
                 model: str | None, pretrained: str | None, device: str, search: dict) -> list:
    from ..index import Index

    with Index.open(index_dir, model=model, pretrained=pretrained, device=device,
                    readonly=True) as index:
        if index.store.is_empty():
            raise IndexEmptyError(
                f"index {index.path} holds no items yet; add some with: "
                f"retrieve index SOURCE... --index {index_dir}")
        return index.search(text, image=list(images) or None, audio=list(sounds) or None, **search)


def _entries_here(index_dir: str, text: str | None, images: tuple[str, ...], sounds: tuple[str, ...],
                  videos: tuple[str, ...], k: int, grouping: str, fusion: str | None,
                  weights: dict[str, float] | None) -> list:
    from ..index import Index

    with Index.open(index_dir, readonly=True) as index:
        return index.search_entries(text, image=list(images) or None, audio=list(sounds) or None,
                                    video=list(videos) or None, k=k, grouping=grouping, fusion=fusion,
                                    weights=weights)


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
    rows = [(f"{rank:>3}", f"{hit.score:.3f}", hit.metadata.get("image", hit.uri), hit.text or "")
            for rank, hit in enumerate(hits, 1)]
    place_width = min(max(len(row[2]) for row in rows), max(20, width // 2))
    for rank, score, place, text in rows:
        line = f"{rank}  {score}  {place:<{place_width}}  {text}"
        click.echo(line if len(line) <= width else line[:width - 1] + "…")


@cli.command("index")
@click.argument("sources", nargs=-1, type=click.Path())
@index_option
@click.option("--captions", multiple=True, type=click.Path(dir_okay=False),
              help="Captions file: Flickr token TSV, CSV, JSONL or COCO JSON (repeatable).")
@click.option("--exclude-dir", multiple=True,
              help="Folder name or path not to enter (repeatable).")
@click.option("--include-hidden", is_flag=True, help="Also index hidden files and folders.")
@click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_MAX_MEGAPIXELS, show_default=True,
              help="Skip images larger than this (guards against decompression bombs).")
@click.option("--max-audio-seconds", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_MAX_AUDIO_SECONDS, show_default=True,
              help="Skip sounds longer than this (each is decoded whole, in memory).")
@click.option("--max-video-seconds", type=click.FloatRange(min=0, min_open=True),
              default=DEFAULT_MAX_VIDEO_SECONDS, show_default=True, help="Skip longer videos.")
@click.option("--frame-rate", type=click.FloatRange(min=0, min_open=True),
              help="Video frames sampled per second [recorded by the index; default 1].")
@click.option("--scene-threshold", type=click.FloatRange(0, 1, min_open=True),
              help="Also sample a video frame at every cut this large (0-1) [default: none].")
@click.option("--temporal", type=click.Choice(["mean", "max"]),
              help="How a video segment's frames are pooled [recorded by the index; default mean].")
@click.option("--fusion", type=click.Choice(["rrf", "sum", "max", "mean", "weighted", "concat", "attention"]),
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
              help="Encode with 8-bit weights on the CPU: faster, vectors within ~1e-3.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: decode and encode images as a Ray Data job (GPUs where the cluster has them).")
@click.option("--address", help="With --engine ray: the cluster (auto, ray://HOST:PORT) "
              "[default: start Ray on this machine].")
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
                  address: str | None, quiet: bool, as_json: bool, wait: bool) -> None:
    """Build or update an index over folders and files, incrementally.

    Only new and changed files are encoded; moved files keep their vectors; files gone from
    SOURCES are forgotten. With no SOURCES, the folders and captions files indexed before are
    scanned again, each folder with the --exclude-dir and --include-hidden it was given.
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
                           include_hidden=include_hidden or None, max_megapixels=max_megapixels,
                           max_audio_seconds=max_audio_seconds, max_video_seconds=max_video_seconds,
                           progress=not quiet and sys.stderr.isatty(), engine=engine, address=address)
    if not quiet:
        from ..build.report import skipped_lines

        for line in skipped_lines(report.skipped):
            click.echo(f"warning: {line}", err=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        click.echo(report.summary())


@cli.command("remove")
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


@cli.command("convert")
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


@cli.command("info")
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


@cli.command("train-audio")
@click.argument("pairs", type=click.Path())
@index_option
@schedule_options(epochs=30, batch_size=32, learning_rate=2e-3)
@click.option("--held-out", default=0.1, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of pairs kept out of training to measure recall each epoch.")
@click.option("--width", default=32, show_default=True, type=click.IntRange(4),
              help="Channels of the tower's first conv block (later blocks double it).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-reindex", is_flag=True,
              help="Do not re-encode the index's audio with the new tower now.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@json_option
@wait_option
@reports_errors
def train_audio_command(pairs: str, index_dir: str, epochs: int, batch_size: int,
                        learning_rate: float, held_out: float, width: int, seed: int,
                        no_reindex: bool, device: str, quiet: bool, as_json: bool, wait: bool) -> None:
    """Train the index's audio tower on sounds paired with images or captions.

    PAIRS is a folder where each sound has an image or a .txt caption file of the same name
    beside it (dog.wav + dog.jpg, or dog.wav + dog.txt), or a CSV/JSONL file with an `audio`
    column and an `image` or `caption` column (paths relative to the file). The index's CLIP
    model stays frozen; the tower learns to put each sound next to its partner, so sounds can
    then be searched by text, image or sound, and find images and texts in turn.
    """
    wait_or_refuse(index_dir, wait)
    from ..index import Index
    from ..train.audio import AudioTrainingOptions

    options = AudioTrainingOptions(epochs=epochs, batch_size=batch_size,
                                   learning_rate=learning_rate, held_out=held_out, width=width,
                                   seed=seed, progress=not quiet and sys.stderr.isatty())
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    with Index.open(index_dir, create=True, device=device, wait=wait) as index:
        report = index.train_audio(pairs, options, reindex=not no_reindex, log=log)
    if not quiet:
        from ..build.report import skipped_lines

        for line in skipped_lines(report.skipped):
            click.echo(f"warning: {line}", err=True)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())


@cli.command("evaluate")
@click.argument("images", type=click.Path(file_okay=False))
@click.option("--captions", required=True, type=click.Path(dir_okay=False),
              help="Flickr token TSV, Karpathy or COCO JSON, CSV or JSONL captions of IMAGES.")
@click.option("--split", help="Only this split of a Karpathy JSON file (train, val, test ...).")
@model_options
@click.option("--index-type", type=click.Choice(MEMORY_INDEX_TYPES), default="auto", show_default=True,
              help="FAISS index measured beside exact search (auto: what an index would pick).")
@click.option("--depth", default=100, show_default=True, type=click.IntRange(10),
              help="Results fetched per query from the FAISS index.")
@device_option
@batch_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_option
@reports_errors
def evaluate_command(images: str, captions: str, split: str | None, model: str | None,
                     pretrained: str | None, index_type: str, depth: int, device: str,
                     batch_size: int, quiet: bool, as_json: bool) -> None:
    """Measure a model on captioned images: Recall@1/5/10, median and mean rank, both ways.

    Text -> image counts a caption right when its image comes back; image -> text counts an
    image right at the rank of the first of its captions. Measured with exact search and
    through a FAISS index of --index-type, so any loss from approximate search shows.
    """
    from ..encoders.spec import ModelSpec
    from ..train.evaluation import evaluate

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


@cli.command("evaluate-entries")
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


@cli.command("train-fusion")
@click.argument("queries", type=click.Path(dir_okay=False))
@index_option
@click.option("--entries", "grouping", metavar="stem|folder|MANIFEST", default="stem",
              show_default=True, help="How files group into entries (see search --entries).")
@schedule_options(epochs=30, batch_size=64, learning_rate=3e-3)
@click.option("--held-out", default=0.2, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of the queries kept out of training; R@1 on them is reported per epoch.")
@click.option("--seed", default=0, show_default=True, type=int)
@json_option
@wait_option
@reports_errors
def train_fusion_command(queries: str, index_dir: str, grouping: str, epochs: int, batch_size: int,
                         learning_rate: float, held_out: float, seed: int, as_json: bool,
                         wait: bool) -> None:
    """Train the attention gate that weighs each modality per query, for --fusion attention.

    QUERIES is the file evaluate-entries reads: queries and the entries that answer them.
    """
    wait_or_refuse(index_dir, wait)
    from ..index import Index
    from ..train.fusion import FusionTrainingOptions

    options = FusionTrainingOptions(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                    held_out=held_out, seed=seed)
    with Index.open(index_dir, wait=wait) as index, printing_query_warnings():
        report = index.train_fusion(queries, grouping, options)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    examples = (f"{counted(report['queries'], 'query', 'queries')} "
                f"({counted(report['examples'], 'query-entry pair')})")
    click.echo(trained_line("the fusion gate", examples, report, held_noun="pair"))


@cli.command("train-temporal")
@click.argument("pairs", type=click.Path())
@index_option
@click.option("--kind", type=click.Choice(["bilstm", "transformer"]), default="bilstm", show_default=True,
              help="A bidirectional LSTM or a small transformer over a segment's frame vectors.")
@schedule_options(epochs=30, batch_size=64, learning_rate=3e-3)
@click.option("--held-out", default=0.2, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of the segments kept out of training; R@1 on them is reported per epoch.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-reindex", is_flag=True, help="Do not re-encode the index's videos now.")
@json_option
@wait_option
@reports_errors
def train_temporal_command(pairs: str, index_dir: str, kind: str, epochs: int, batch_size: int,
                           learning_rate: float, held_out: float, seed: int, no_reindex: bool,
                           as_json: bool, wait: bool) -> None:
    """Train how video segments pool their frames: an encoder that reads frame order.

    PAIRS is a folder where each video has a .txt caption of the same name (clip.mp4 + clip.txt)
    or a CSV/JSONL file with video and caption fields. Every segment learns to land next to its
    video's caption; the index's videos are then encoded with it.
    """
    wait_or_refuse(index_dir, wait)
    from ..index import Index
    from ..train.fusion import FusionTrainingOptions

    options = FusionTrainingOptions(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                    held_out=held_out, seed=seed)
    with Index.open(index_dir, wait=wait) as index:
        report = index.train_temporal(pairs, kind, options, reindex=not no_reindex)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(trained_line(report["identity"], counted(report["examples"], "segment"), report))


def trained_line(subject: str, examples: str, report: dict, held_noun: str = "") -> str:
    """What a fusion or temporal training did, in one line; R@1 only where some were held out."""
    held = report["held_out"]
    kept = f", {counted(held, held_noun) if held_noun else held} held out," if held else ""
    recall = (f"held-out R@1 {report['epochs'][-1]['recall_at_1']:.3f}" if held
              else "nothing held out to measure")
    return (f"trained {subject} on {examples}{kept} for {counted(len(report['epochs']), 'epoch')} "
            f"in {report['seconds']:.1f} s; {recall}")


@cli.command("train")
@click.argument("images", type=click.Path(file_okay=False))
@click.option("--captions", required=True, type=click.Path(dir_okay=False),
              help="Flickr token TSV, Karpathy or COCO JSON, CSV or JSONL captions of IMAGES.")
@click.option("--split", help="Only this split of a Karpathy JSON file (e.g. train).")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help="Folder for the checkpoint, usable as --model local-dir:FOLDER.")
@model_options
@schedule_options(epochs=5, batch_size=64, learning_rate=1e-5)
@click.option("--warmup-steps", default=50, show_default=True, type=click.IntRange(0))
@click.option("--weight-decay", default=0.1, show_default=True, type=click.FloatRange(min=0))
@click.option("--train", "mode", type=click.Choice(["all", "projections", "adapters"]), default="all",
              show_default=True, help="What learns: every weight, only the two projections, or "
              "low-rank adapters merged into the weights when saved.")
@click.option("--freeze", multiple=True, type=click.Choice(["image", "text"]),
              help="Keep a tower as it is (repeatable).")
@click.option("--adapter-rank", default=4, show_default=True, type=click.IntRange(1))
@click.option("--held-out", default=0.1, show_default=True, type=click.FloatRange(0, 0.9),
              help="Share of the images kept out of training; R@K on them is printed each epoch.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resume", is_flag=True, help="Continue the run saved in --output.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@json_option
@reports_errors
def train_command(images: str, captions: str, split: str | None, output: str, model: str | None,
                  pretrained: str | None, epochs: int, batch_size: int, learning_rate: float,
                  warmup_steps: int, weight_decay: float, mode: str, freeze: tuple[str, ...],
                  adapter_rank: int, held_out: float, seed: int, resume: bool, device: str,
                  quiet: bool, as_json: bool) -> None:
    """Fine-tune an open_clip model on captioned images with the CLIP contrastive loss.

    The checkpoint is saved after every epoch in local-dir form: build and search with
    --model local-dir:OUTPUT, evaluate it with retrieve evaluate, continue it with --resume.
    """
    from ..encoders.spec import ModelSpec
    from ..media.pairs import read_captioned_images
    from ..train.clip import TrainingOptions, fine_tune

    options = TrainingOptions(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                              warmup_steps=warmup_steps, weight_decay=weight_decay, train=mode,
                              freeze=freeze, adapter_rank=adapter_rank, held_out=held_out, seed=seed,
                              device=device, progress=not quiet and sys.stderr.isatty())
    data = read_captioned_images(images, captions, split)
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    report = fine_tune(ModelSpec.parse(model, pretrained), data, output, options, resume, log)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())


@cli.command("serve")
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes the index to the network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-upload-mb", default=20.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Largest query upload accepted.")
@click.option("--shard-index", "shard_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Another index folder searched as a shard beside --index (repeatable).")
@click.option("--shard", "shard_urls", multiple=True, metavar="URL",
              help="A `retrieve serve` on another machine searched as a shard (repeatable).")
@device_option
@reports_errors
def serve_command(index_dir: str, host: str, port: int, max_upload_mb: float,
                  shard_dirs: tuple[str, ...], shard_urls: tuple[str, ...], device: str) -> None:
    """Serve the index: a JSON API (docs at /docs) and a search page at /.

    The model loads once, so queries take milliseconds; a build running beside the server is
    seen without a restart. Route CLI searches through it with --server URL. With shards, each
    search goes to --index and every shard, and their best hits are merged by score.
    """
    import uvicorn

    from ..serve.app import create_app

    app = create_app([index_dir, *shard_dirs], device=device, max_upload_mb=max_upload_mb,
                     shard_urls=shard_urls)
    shards = len(shard_dirs) + len(shard_urls)
    click.echo(f"serving {index_dir}{f' and {shards} shards' if shards else ''} at http://{host}:{port} "
               f"(API docs at /docs); Ctrl-C stops", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="retrieve")


if __name__ == "__main__":
    main()
