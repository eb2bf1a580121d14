"""The sections, in the order a run prints them."""

from __future__ import annotations

from types import ModuleType

from . import (
    ann,
    audio,
    breakeven,
    captions,
    duplicates,
    images,
    int8,
    latency,
    memory,
    models,
    noop,
    peers,
    product_search,
    ray_build,
    scale,
    serve,
    server,
    text,
    video,
)

SECTIONS: dict[str, ModuleType] = {module.NAME: module for module in (
    images, text, ann, latency, int8, audio, serve, video, noop, scale, ray_build, breakeven, product_search,
    peers, models, server, duplicates, captions, memory)}


def opt_in(name: str) -> bool:
    """True for a section that runs only when named (--only, or its own flag)."""
    return getattr(SECTIONS[name], "OPT_IN", False)
