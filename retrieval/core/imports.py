"""Keeping optional imports of third-party packages out of a process that does not need them."""

from __future__ import annotations

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
