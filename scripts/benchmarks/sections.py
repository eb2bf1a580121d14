"""The sections, in the order a run prints them."""

from __future__ import annotations

from types import ModuleType

from . import (
    ann,
    audio,
    breakeven,
    images,
    int8,
    latency,
    models,
    noop,
    peers,
    product_search,
    ray_build,
    scale,
    serve,
    text,
    video,
)

SECTIONS: dict[str, ModuleType] = {module.NAME: module for module in (
    images, text, ann, latency, int8, audio, serve, video, noop, scale, ray_build, breakeven, product_search,
    peers, models)}


def opt_in(name: str) -> bool:
    """True for a section that runs only when named (--only, or its own flag)."""
    return getattr(SECTIONS[name], "OPT_IN", False)
