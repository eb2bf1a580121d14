"""A build that stops itself at a named commit, so crash trials kill it at a known point.

`RETRIEVAL_STOP_AFTER=KIND:N` (KIND `text` or `caption`): once the build has committed its
N-th batch of that kind, the process sends itself SIGSTOP. A trial waits for the stop and
kills it there, instead of polling the database and racing the build to the end.
Unset (always, outside trials) it costs one dictionary lookup per batch.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

STOP_ENV = "RETRIEVAL_STOP_AFTER"

_committed: Counter[str] = Counter()


def batch_committed(kind: str) -> None:
    """Count one committed batch of `kind`; stop this process if it is the one asked for."""
    wanted = os.environ.get(STOP_ENV)
    if not wanted or not hasattr(signal, "SIGSTOP"):
        return
    wanted_kind, _, count = wanted.partition(":")
    if wanted_kind != kind:
        return
    _committed[kind] += 1
    if _committed[kind] == int(count):
        os.kill(os.getpid(), signal.SIGSTOP)
