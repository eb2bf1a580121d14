"""h. Video: the indexing rate, in seconds of video per second, of a synthetic H.264 clip."""

from __future__ import annotations

import argparse

from .context import Context
from .data import write_media_library
from .measure import log, timed
from .report import table

NAME = "video"
TITLE = "h. Video"
SUMMARY = "video indexing rate (seconds of video per second) on a synthetic 640x360 H.264 clip"
NEEDS = {"model"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video-seconds", type=float, default=120.0,
                        help="length of the synthetic clip indexed [default: 120]")


def run(context: Context) -> tuple[dict, str]:
    """Index one synthetic clip: decoding, 1 frame/s through the image tower, segments committed."""
    args = context.args
    folder = context.workdir / "videos"
    write_media_library(folder, "video", 1, args.video_seconds, args.seed)
    with context.open_loaded_index("index-video") as index:
        log(f"video: indexing a {args.video_seconds:.0f} s clip")
        report, seconds = timed(lambda: index.add(folder))
    data = {"video_seconds": args.video_seconds, "segments": report.video_encoded, "index_s": seconds,
            "video_seconds_per_s": args.video_seconds / seconds}
    rows = [(f"`add`: one {args.video_seconds:.0f} s 640x360 30 fps H.264 + AAC clip "
             f"({report.video_encoded} segments of 4 s, 1 frame/s)",
             f"{seconds:.1f} s: **{data['video_seconds_per_s']:.1f} s of video per second**")]
    return data, "\n".join([
        "Frames go through the benchmark's CLIP image tower; this index has no audio tower, so "
        "segments are their pooled frames.", "", table(("measurement", "result"), rows)])
