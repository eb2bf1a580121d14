"""Run decoding in threads ahead of the encoder, in order, with bounded memory."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


def default_workers() -> int:
    """PIL decoding releases the GIL, so threads up to the core count keep the encoder fed."""
    return max(1, min(8, os.cpu_count() or 1))


def prefetch_map(function: Callable[[In], Out], items: Iterable[In], workers: int,
                 ahead: int) -> Iterator[Out]:
    """`map(function, items)` on a thread pool, keeping at most `ahead` results in flight."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
