"""What a build did: counts of files and vectors, the files it skipped and why, in one line or
as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..core.errors import counted
from ..media.corpus import Skipped

# Why sounds wait: the index's reason, not the files', so it is said once (see `skipped_lines`).
NO_AUDIO_ENCODER = "no audio encoder yet"


@dataclass
class BuildReport:
    """What a build did, counted in files; `encoded` and `reused` count vectors."""

    new: int = 0
    changed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    skipped: list[Skipped] = field(default_factory=list)  # warned about in this run
    skipped_unchanged: int = 0  # skipped before and unchanged since: not read, not warned about
    images_encoded: int = 0
    texts_encoded: int = 0
    audio_encoded: int = 0  # audio windows; a file has one per few seconds
    video_encoded: int = 0  # video segments; a file has one per few seconds
    vectors_reused: int = 0
    captions_written: int = 0  # by a caption model, for images (see build.captions)
    captions_reused: int = 0  # a caption already written for the same content by the same model
    caption_seconds: float = 0.0  # of `seconds`, spent writing captions
    images_measured: int = 0  # indexed before their size and hashes were recorded: measured now
    seconds: float = 0.0

    @property
    def items_per_second(self) -> float:
        encoded = self.images_encoded + self.texts_encoded + self.audio_encoded + self.video_encoded
        return encoded / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        skipped = f"{len(self.skipped) + self.skipped_unchanged} skipped"
        if self.skipped_unchanged:
            skipped += f" ({self.skipped_unchanged} unchanged since their warning)"
        return (f"{self.new} new, {self.changed} changed, {self.unchanged} unchanged, "
                f"{self.moved} moved, {self.removed} removed, {skipped}; "
                f"encoded {counted(self.images_encoded, 'image')}, {counted(self.texts_encoded, 'text')}, "
                f"{counted(self.audio_encoded, 'audio window')} and "
                f"{counted(self.video_encoded, 'video segment')}, "
                f"reused {counted(self.vectors_reused, 'vector')}"
                + (f", measured {counted(self.images_measured, 'image')} for duplicate finding"
                   if self.images_measured else "")
                + f"{self._captions()} in {self.seconds:.1f} s ({self.items_per_second:.1f} items/s)")

    def _captions(self) -> str:
        if not self.captions_written:
            return ""
        rate = self.captions_written / self.caption_seconds if self.caption_seconds else 0.0
        return f"; wrote {counted(self.captions_written, 'caption')} ({rate:.1f} images/s)"

    def to_dict(self) -> dict:
        data = asdict(self)
        data["items_per_second"] = self.items_per_second
        return data


def skipped_lines(skipped: list[Skipped]) -> list[str]:
    """A warning per skipped file, but one for all the sounds waiting for an audio encoder."""
    lines, waiting = [], []
    for one in skipped:
        if one.reason.startswith(NO_AUDIO_ENCODER):
            waiting.append(one)
        else:
            lines.append(f"skipped {one.path}: {one.reason}")
    if waiting:
        lines.append(f"skipped {counted(len(waiting), 'sound')}: {waiting[0].reason}")
    return lines
