"""Errors the engine raises on purpose: each carries one line a person can act on. And
`counted`, which every message that counts things shares.

A message names a parameter of the call that failed as the library spells it, in backticks
(`where`, `max_audio_seconds`, `audio_model` clap:NAME); the CLI shows each as the flag that sets
it (--where, --max-audio-seconds, --audio-model=clap:NAME). Backticks hold nothing else that is
one lower-case word."""

from __future__ import annotations


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`1 file`, `2 files`: a count with its noun in the right number."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


class RetrievalError(Exception):
    """Base class: a failure with a one-line explanation and a process exit code."""

    exit_code = 1


class UsageError(RetrievalError):
    """The caller asked for something malformed (bad argument, bad query)."""

    exit_code = 2


class OverCapError(ValueError):
    """A decoded image, sound or video over a size or length cap; `parameter` names the
    parameter that sets the cap (`max_megapixels`, `max_audio_seconds`, `max_video_seconds`)."""

    parameter = ""


class QueryTooLargeError(UsageError):
    """A query's image, sound or video is over a cap; `parameter` names the parameter setting it."""

    def __init__(self, message: str, parameter: str) -> None:
        super().__init__(message)
        self.parameter = parameter


class ModelLoadError(RetrievalError):
    """A model's configuration or weights cannot be had."""


class NoAudioEncoderError(ModelLoadError):
    """A sound (or a video's soundtrack) to search with, on an index that has no audio encoder:
    a request no retry mends (the server answers 422)."""


class IndexNotFoundError(RetrievalError):
    """No index exists at the given directory."""


class IndexEmptyError(RetrievalError):
    """The index exists but holds nothing to search."""


class IndexFormatError(RetrievalError):
    """The index directory is unreadable, of another format version, or damaged beyond repair."""


class ModelMismatchError(RetrievalError):
    """The index was built with a different model than the one requested."""


class IndexLockedError(RetrievalError):
    """Another process is writing to the index: `holder` says which, as the lock file tells."""

    def __init__(self, path: object, holder: str) -> None:
        super().__init__(f"index {path} is being written by {holder}; run again when it is done, "
                         "or open the index with wait=True to wait for it")
        self.path = path
        self.holder = holder


class IndexWriteError(RetrievalError):
    """The index folder refuses writes: disk full, read-only, or no permission."""


class QueryWarning(UserWarning):
    """A query that is searched, but perhaps not as meant (a term naming no file is text)."""
