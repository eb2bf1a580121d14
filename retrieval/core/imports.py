"""Keeping optional imports of third-party packages out of a process that does not need them,
and their cost out of the end of one that did."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def without_module(name: str) -> Iterator[None]:
    """While inside, `import name` fails as if the module were not installed (unless it is
    imported already): a package that imports it only when present does without it."""
    held_back = name not in sys.modules
    if held_back:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        if held_back:
            del sys.modules[name]


def exit_quickly() -> None:
    """For a process about to end: everything it holds is moved out of the garbage collector's
    reach, so the interpreter's last collections do not walk it. With torch and open_clip
    loaded they took 1.3 s of a 5.6 s process; the objects are freed all the same."""
    gc.freeze()
