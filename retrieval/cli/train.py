"""Commands that teach an index: `train` (fine-tune CLIP), `train-audio`, `train-fusion` and
`train-temporal`."""

from __future__ import annotations

import json
import sys

import click

from ..core.errors import counted
from ..core.types import TEMPORAL_ARCHITECTURES, TOWERS, TRAIN_MODES
from .common import (
    device_option,
    index_option,
    json_option,
    model_options,
    print_report,
    printing_query_warnings,
    progress_log,
    reports_errors,
    schedule_options,
    wait_option,
    wait_or_refuse,
)


@click.command("train-audio")
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
    with Index.open(index_dir, create=True, device=device, wait=wait) as index:
        report = index.train_audio(pairs, options, reindex=not no_reindex, log=progress_log(quiet))
    print_report(report, as_json, quiet)


@click.command("train-fusion")
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


@click.command("train-temporal")
@click.argument("pairs", type=click.Path())
@index_option
@click.option("--kind", type=click.Choice(TEMPORAL_ARCHITECTURES), default="bilstm", show_default=True,
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


@click.command("train")
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
@click.option("--train", "mode", type=click.Choice(TRAIN_MODES), default="all",
              show_default=True, help="What learns: every weight, only the two projections, or "
              "low-rank adapters merged into the weights when saved.")
@click.option("--freeze", multiple=True, type=click.Choice(TOWERS),
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
    report = fine_tune(ModelSpec.parse(model, pretrained), data, output, options, resume,
                       progress_log(quiet))
    print_report(report, as_json, quiet)
