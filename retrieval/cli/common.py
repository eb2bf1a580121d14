"""What every command shares: the common options, error reporting (one line and an exit code),
the query-first argument parsing and the write-lock check."""

from __future__ import annotations

import json
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Protocol

import click
from click_default_group import DefaultGroup

from ..core.errors import IndexLockedError, QueryWarning, RetrievalError
from ..core.types import (
    CAPTION_METHODS,
    DEFAULT_MAX_AUDIO_SECONDS,
    DEFAULT_MAX_MEGAPIXELS,
    DEFAULT_MAX_VIDEO_SECONDS,
)
from ..encoders.spec import DEFAULT_MODEL, DEFAULT_PRETRAINED, MODEL_PRESETS

DEFAULT_INDEX = "indexes/default"
# Parameters whose flag is not the parameter's name with dashes (see `with_flags`).
FLAGS = {"architecture": "--kind"}
_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)`")


def with_flags(message: str) -> str:
    """A library message as the CLI says it: each parameter it names in backticks (`where`,
    `max_audio_seconds`) becomes the flag that sets it (--where, --max-audio-seconds)."""
    return _PARAMETER.sub(lambda name: FLAGS.get(name[1], "--" + name[1].replace("_", "-")), message)


def warn(line: str) -> None:
    """One warning line on stderr, in the CLI's words."""
    click.echo(one_line(f"warning: {with_flags(line)}"), err=True)



class Report(Protocol):
    """What a build or a training hands back: a one-line summary and a JSON-ready dict."""

    def summary(self) -> str: ...
    def to_dict(self) -> dict: ...


def print_report(report: Report, as_json: bool, quiet: bool = False) -> None:
    """The end of a build or training: a warning per file it skipped (unless `quiet`; a
    fine-tuning report has no `skipped`), then the report as one line or, with --json, as JSON."""
    from ..build.report import skipped_lines

    if not quiet:
        for line in skipped_lines(getattr(report, "skipped", [])):
            warn(line)
    click.echo(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) if as_json
               else report.summary())


def progress_log(quiet: bool) -> Callable[[str], None]:
    """Where a trainer's per-epoch lines go: stderr, or nowhere with --quiet."""
    if quiet:
        return lambda line: None
    return lambda line: click.echo(line, err=True)


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


def media_cap_options(image: str, audio: str, video: str):
    """--max-megapixels, --max-audio-seconds and --max-video-seconds (the engine's defaults),
    each with what the command does with media over it."""
    def decorate(command):
        for name, default, help in reversed((("--max-megapixels", DEFAULT_MAX_MEGAPIXELS, image),
                                             ("--max-audio-seconds", DEFAULT_MAX_AUDIO_SECONDS, audio),
                                             ("--max-video-seconds", DEFAULT_MAX_VIDEO_SECONDS, video))):
            command = click.option(name, type=click.FloatRange(min=0, min_open=True), default=default,
                                   show_default=True, help=help)(command)
        return command
    return decorate


def model_options(command):
    """--model and --pretrained, shared by every command that names a model."""
    presets = "; ".join(f"{name} = {preset.model} {preset.pretrained}"
                        for name, preset in MODEL_PRESETS.items())
    command = click.option(
        "--pretrained", help=f"Pretrained tag (default {DEFAULT_PRETRAINED} for {DEFAULT_MODEL}) "
        "or a checkpoint file.")(command)
    return click.option(
        "--model", help=f"A preset ({presets}), an open_clip model name, local-dir:PATH or "
        f"hf-hub:ORG/REPO [default for a new index: {DEFAULT_MODEL}].")(command)


def caption_writer_options(command):
    """Which CoCa model writes captions, and how (`--caption-model`, `--caption-method` ...)."""
    options = [
        click.option("--caption-model", help="CoCa model writing captions: open_clip name (with "
                     "--caption-pretrained), local-dir:PATH or hf-hub:ORG/REPO [default: the index's "
                     "model if a CoCa, else coca_ViT-B-32]."),
        click.option("--caption-pretrained", help="Its pretrained tag or checkpoint file "
                     "[default for coca_ViT-B-32: mscoco_finetuned_laion2b_s13b_b90k]."),
        click.option("--caption-method", type=click.Choice(CAPTION_METHODS),
                     help="Beam search or top-p sampling [default beam]."),
        click.option("--caption-max-length", type=click.IntRange(1),
                     help="Most tokens per caption [default 20]."),
        click.option("--caption-beam-width", type=click.IntRange(1), help="Beams per image [default 3]."),
        click.option("--caption-top-p", type=click.FloatRange(0, 1, min_open=True),
                     help="Top-p sampling's probability mass [default 0.9]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# Characters that end a line for `str.splitlines` or move the cursor: a name holding one (a file
# called "a\rb.jpg", say) must not split an error into two lines or hide part of it.
_LINE_BREAKERS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7f, 0x85)}
_LINE_BREAKERS.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(message: str) -> str:
    """`message` as one printable line: control characters and line separators escaped."""
    return message.translate(_LINE_BREAKERS)


def reports_errors(command):
    """Turn the engine's errors into one line on stderr and the right exit code."""
    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except IndexLockedError as error:
            click.echo(one_line(f"error: index {error.path} is being written by {error.holder}; run "
                                "again when it is done, or add --wait to wait for it"), err=True)
            sys.exit(error.exit_code)
        except RetrievalError as error:
            click.echo(one_line(f"error: {with_flags(str(error))}"), err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; what was committed is kept, run again to resume", err=True)
            sys.exit(130)
    return wrapper


_OUT_OF_RANGE = re.compile(r"^(.*) is not in the range .*$", re.DOTALL)


def usage_line(error: click.UsageError) -> str:
    """Click's usage error as one line, like the engine's own: what is wrong, with which flag,
    and where to read more (`error: -k must be at least 1, not 0 (see retrieve search --help)`)."""
    message = " ".join(error.format_message().split()).rstrip(".").replace(". (", " (")
    message = message[:1].lower() + message[1:]  # "No such option" -> "no such option"
    param = getattr(error, "param", None)
    if (isinstance(error, click.BadParameter) and not isinstance(error, click.MissingParameter)
            and isinstance(param, click.Parameter)):
        flag = "/".join(param.opts) if isinstance(param, click.Option) else param.human_readable_name
        message = re.sub(r"^invalid value for '[^:]*': ", "", message)
        out_of_range = _OUT_OF_RANGE.match(message)
        if out_of_range and isinstance(param.type, (click.IntRange, click.FloatRange)):
            message = f"must be {_range_words(param.type)}, not {out_of_range[1]}"
        message = f"{flag} {message}" if message.startswith("must ") else f"{flag}: {message}"
    see = f" (see {error.ctx.command_path} --help)" if error.ctx is not None else ""
    return one_line(f"error: {message}{see}")


def _range_words(bounds: click.IntRange | click.FloatRange) -> str:
    """`IntRange(1)` as "at least 1", `FloatRange(0, 1, min_open=True)` as "more than 0 and at most 1"."""
    words = []
    if bounds.min is not None:
        words.append(f"{'more than' if bounds.min_open else 'at least'} {bounds.min:g}")
    if bounds.max is not None:
        words.append(f"{'less than' if bounds.max_open else 'at most'} {bounds.max:g}")
    return " and ".join(words)


class OneLineUsageError(click.UsageError):
    """A click usage error shown as one line (see `usage_line`), exit code 2."""

    def __init__(self, error: click.UsageError) -> None:
        super().__init__(usage_line(error), error.ctx)

    def show(self, file=None) -> None:
        click.echo(self.message, err=True)


class SearchFirstGroup(DefaultGroup):
    """The root group: `retrieve`'s default command is search, a leading `--` belongs to the
    search query (`retrieve -- "-dog"` searches for "-dog"; a bare group would swallow the `--`),
    and every usage error, click's included, is one line."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args[:1] == ["--"]:
            args = [self.default_cmd_name, *args]
        return super().parse_args(ctx, args)

    def make_context(self, *args, **kwargs) -> click.Context:
        with _one_line_usage():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context):
        with _one_line_usage():
            return super().invoke(ctx)


@contextmanager
def _one_line_usage() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a bare `retrieve index` shows its help
    except OneLineUsageError:
        raise
    except click.UsageError as error:
        raise OneLineUsageError(error) from None


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
    """Show the engine's warnings about a query (a term naming no file) as one line each, once
    the query has run: a query that fails shows its one error line alone."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QueryWarning)
        ran = False
        try:
            yield
            ran = True
        finally:
            for warning in caught:
                if issubclass(warning.category, QueryWarning):
                    if ran:
                        warn(str(warning.message))
                else:
                    warnings.showwarning(warning.message, warning.category, warning.filename,
                                         warning.lineno)
