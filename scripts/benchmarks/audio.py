"""f. Audio: the audio tower trained on synthetic captioned sounds, then sound files indexed
and searched with it."""

from __future__ import annotations

import argparse

from .context import Context
from .data import write_media_library, write_sound_pairs
from .engine import AudioTrainingOptions
from .measure import K, log, percentiles, time_each, timed
from .report import table

NAME = "audio"
TITLE = "f. Audio"
SUMMARY = "audio tower training (time, held-out recall) and audio indexing rate on synthetic sounds"
NEEDS = {"model"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audio-pairs", type=int, default=192,
                        help="captioned sounds the audio tower trains on [default: 192]")
    parser.add_argument("--audio-epochs", type=int, default=20, help="audio tower epochs [default: 20]")
    parser.add_argument("--audio-clips", type=int, default=200, help="5 s clips indexed [default: 200]")
    parser.add_argument("--audio-long-seconds", type=float, default=600.0,
                        help="length of the long recording indexed [default: 600]")


def run(context: Context) -> tuple[dict, str]:
    args, workdir = context.args, context.workdir
    pairs, short, long = workdir / "sound-pairs", workdir / "sounds-short", workdir / "sounds-long"
    write_sound_pairs(pairs, args.audio_pairs, 2.0, args.seed)
    clip_files = write_media_library(short, "sound", args.audio_clips, 5.0, args.seed + 1)
    write_media_library(long, "sound", 1, args.audio_long_seconds, args.seed + 2)
    options = AudioTrainingOptions(epochs=args.audio_epochs, seed=args.seed)
    with context.open_loaded_index("index-audio") as index:
        log(f"audio: training the tower on {args.audio_pairs} pairs for {args.audio_epochs} epochs")
        report, train_s = timed(lambda: index.train_audio(pairs, options))
        log(f"audio: indexing {args.audio_clips} clips of 5 s")
        clips, clips_s = timed(lambda: index.add(short))
        log(f"audio: indexing one {args.audio_long_seconds:.0f} s recording")
        recording, long_s = timed(lambda: index.add(long))
        query = clip_files[0]
        _, millis = time_each(lambda _: index.search(audio=query, target="audio", k=K),
                              list(range(args.api_runs)))
        latency = percentiles(millis)
    last = report.epochs[-1]
    data = {"pairs": report.pairs, "held_out": report.held_out, "epochs": len(report.epochs),
            "train_s": train_s, "train_loop_s": report.seconds,
            "recall_at_1": last.recall_at_1, "recall_at_5": last.held_out["R@5"],
            "clips": args.audio_clips, "clips_s": clips_s, "clips_per_s": args.audio_clips / clips_s,
            "long_seconds": args.audio_long_seconds, "long_windows": recording.audio_encoded,
            "long_s": long_s, "audio_seconds_per_s": args.audio_long_seconds / long_s,
            "query_ms": latency}
    rows = [
        (f"`train_audio`: {report.pairs} pairs of 2 s ({report.held_out} held out), "
         f"{len(report.epochs)} epochs", f"{train_s:.1f} s ({report.seconds / len(report.epochs):.2f} s "
         f"per epoch); held-out recall@1 {last.recall_at_1:.3f}, @5 {last.held_out['R@5']:.3f}"),
        (f"`add`: {args.audio_clips} flac clips of 5 s (decode, encode, commit)",
         f"{clips_s:.2f} s: {data['clips_per_s']:.1f} clips/s"),
        (f"`add`: one {args.audio_long_seconds:.0f} s flac recording ({recording.audio_encoded} windows)",
         f"{long_s:.2f} s: {data['audio_seconds_per_s']:.0f} s of audio per second"),
        ("warm `index.search(audio=clip, target='audio')`, decoding and encoding the clip",
         f"p50 {latency['p50_ms']:.1f} ms, p95 {latency['p95_ms']:.1f} ms"),
    ]
    return data, "\n".join([
        f"Synthetic sounds in 12 classes (4 pitches x 3 patterns) at 16 kHz; tower of width "
        f"{options.width}, {options.n_mels} mels; captions encoded by the benchmark's CLIP model.", "",
        table(("measurement", "result"), rows)])
