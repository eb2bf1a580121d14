"""`retrieve duplicates`: groups of exact and near-duplicate images, and what to keep of each.
Nothing is moved or deleted; a JSON plan or a commented shell script is written on request."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys

import click

from ..core.errors import counted
from ..core.types import DUPLICATE_SIGNALS
from .common import index_option, json_option, reports_errors


@click.command("duplicates")
@index_option
@click.option("--threshold", type=click.FloatRange(-1, 1),
              help="Cosine at or above which two images' vectors make near-duplicates "
              "[default: 0.92, measured; see README].")
@click.option("--by", type=click.Choice(DUPLICATE_SIGNALS), default="vector", show_default=True,
              help="What finds near-duplicates: vectors, perceptual hashes (pHash), or either.")
@click.option("--max-distance", type=click.IntRange(0, 64),
              help="With --by phash/both: the most bits two pHashes may differ by [default: 6].")
@click.option("--under", type=click.Path(), help="Only images at or under this folder.")
@click.option("--filter", "filter_text", metavar="TERMS",
              help="Only images this filter keeps, e.g. 'under:2020 size>1MB meta.camera=Canon' "
              "(README: Filters).")
@click.option("--min-size", default=2, show_default=True, type=click.IntRange(2),
              help="Leave out groups of fewer files.")
@json_option
@click.option("--csv", "as_csv", is_flag=True,
              help="Print CSV: one row per file (group, keep, path, width, height, bytes, mtime, reason).")
@click.option("--plan", type=click.Path(dir_okay=False),
              help="Write a JSON plan: per group, the file to keep and those that could go.")
@click.option("--script", type=click.Path(dir_okay=False),
              help="Write a shell script removing all but one file per group, every line commented out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@reports_errors
def duplicates_command(index_dir: str, threshold: float | None, by: str, max_distance: int | None,
                       under: str | None, filter_text: str | None, min_size: int, as_json: bool,
                       as_csv: bool,
                       plan: str | None, script: str | None, quiet: bool) -> None:
    """List groups of duplicate images, largest first: exact copies (same content) and
    near-duplicates (resized, recompressed, cropped, edited or mirrored copies).

    Each group names the file to keep (largest resolution, then oldest) and why. Nothing is
    moved or deleted: --plan and --script write what could be done, for you to check.
    """
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    from ..index import Index

    with Index.open(index_dir, readonly=True) as index:
        found = index.duplicates(threshold=threshold, by=by, under=under, min_size=min_size,
                                 max_distance=max_distance, filter=filter_text,
                                 progress=not quiet and sys.stderr.isatty())
    if plan:
        _write(found.write_plan, plan, "--plan")
    if script:
        _write(found.write_script, script, "--script")
    if as_json:
        click.echo(json.dumps(found.to_dict(), ensure_ascii=False, indent=2))
    elif as_csv:
        click.echo(_csv(found), nl=False)
    else:
        _print_groups(found)
    if found.unmeasured:
        click.echo(f"note: {counted(found.unmeasured, 'image')} of this index have no recorded size, "
                   f"so resolution cannot choose what to keep; run `retrieve index --index {index_dir}` "
                   "to measure them (nothing is encoded again)", err=True)


def _write(write, path: str, option: str) -> None:
    try:
        write(path)
    except OSError as error:
        raise click.BadParameter(f"cannot write {path} ({error.strerror})",
                                 param_hint=f"'{option}'") from None


def _csv(found) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["group", "keep", "path", "width", "height", "bytes", "mtime", "exact", "reason"])
    for number, group in enumerate(found.groups, 1):
        for file in group.files:
            writer.writerow([number, int(file is group.keep), file.path, file.width or "",
                             file.height or "", file.size, f"{file.mtime:.0f}", int(group.exact),
                             group.reason if file is group.keep else ""])
    return out.getvalue()


def _print_groups(found) -> None:
    signal = {"vector": f"cosine >= {found.threshold:g}",
              "phash": f"pHash within {found.max_distance} bits",
              "both": f"cosine >= {found.threshold:g} or pHash within {found.max_distance} bits"}[found.by]
    files = sum(len(g.files) for g in found.groups)
    click.echo(f"{counted(len(found.groups), 'group')} of duplicates ({files} of "
               f"{counted(found.images, 'image')}; exact copies, and {signal}) "
               f"in {found.seconds:.1f} s")
    width = shutil.get_terminal_size((120, 20)).columns
    for number, group in enumerate(found.groups, 1):
        kind = "exact copies" if group.exact else "near-duplicates"
        click.echo(f"\ngroup {number}: {counted(len(group.files), 'file')}, {kind}")
        for file in group.files:
            mark = "keep" if file is group.keep else "    "
            line = f"  {mark}  {file.resolution:>11}  {file.path}"
            click.echo(line if len(line) <= width else line[:width - 1] + "…")
        click.echo(f"        why: {group.reason}")
