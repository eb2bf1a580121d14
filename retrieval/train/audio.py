"""Train our audio tower into the index's CLIP space from audio paired with images or captions.

The CLIP model stays frozen: each pair's image or caption is embedded once, and the tower
learns, with a symmetric InfoNCE loss and a learned temperature, to put each sound next to
its partner's vector. Pairs whose partners share a vector (many sounds with one caption) are
all positives for each other, so the loss never pushes apart what belongs together.

Pairs come from a folder (an audio file with an image or a `.txt` caption file of the same
stem beside it) or from a CSV/JSONL file with an `audio` column and an `image` or `caption`
column, paths relative to the pairs file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.errors import UsageError, counted
from ..core.paths import existing_file
from ..core.vectors import unit_mean
from ..encoders.audio_tower import AudioTower, AudioTowerConfig, padded_batch
from ..media.audio import AudioDecodeError, load_audio
from ..media.corpus import AUDIO_SUFFIXES, IMAGE_SUFFIXES, Skipped
from ..media.images import ImageDecodeError, load_image
from ..media.tables import Row, read_table, row_error, split_lines
from .loop import EpochReport, fit, split_examples, symmetric_info_nce

CAPTION_COLUMNS = ("caption", "text")


@dataclass(frozen=True)
class AudioPair:
    """A sound and what it should land next to: an image file or one or more captions."""

    audio: Path
    image: Path | None = None
    captions: tuple[str, ...] = ()


@dataclass
class AudioTrainingOptions:
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 2e-3
    held_out: float = 0.1
    width: int = 32            # channels of the first conv block; later blocks double it
    n_mels: int = 64
    clip_seconds: float = 5.0  # longer sounds are cropped to this, at random while training
    seed: int = 0
    progress: bool = False


@dataclass
class AudioTrainingReport:
    pairs: int = 0
    held_out: int = 0
    epochs: list[EpochReport] = field(default_factory=list)  # held-out R@1, R@5: sound -> its partner
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    identity: str = ""

    def summary(self) -> str:
        last = self.epochs[-1] if self.epochs else None
        recall = (f"held-out recall@1 {last.held_out['R@1']:.3f}, @5 {last.held_out['R@5']:.3f}"
                  if last and self.held_out else "no held-out pairs")
        return (f"trained on {counted(self.pairs - self.held_out, 'pair')} for "
                f"{counted(len(self.epochs), 'epoch')} in {self.seconds:.1f} s; {recall}; "
                f"{len(self.skipped)} skipped")

    def to_dict(self) -> dict:
        return asdict(self)


# -- reading pairs -----------------------------------------------------------------------------

def read_audio_pairs(source: str | Path) -> list[AudioPair]:
    """Pairs from a folder layout or a CSV/JSONL pairs file."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _pairs_in_folder(path)
    if not path.is_file():
        raise UsageError(f"training pairs {source}: no such file or folder")
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise UsageError(f"training pairs {source}: give a folder, a .csv or a .jsonl file")
    pairs = [_pair_of(row, path) for row in read_table(path, "training pairs")]
    if not pairs:
        raise UsageError(f"training pairs {source}: no pairs in it")
    return pairs


def _pairs_in_folder(folder: Path) -> list[AudioPair]:
    pairs = []
    for directory, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        by_stem: dict[str, list[str]] = {}
        for name in names:
            by_stem.setdefault(os.path.splitext(name)[0], []).append(name)
        for name in sorted(names):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in AUDIO_SUFFIXES and not name.startswith("."):
                pair = _folder_pair(Path(directory), name, by_stem[stem])
                if pair is not None:
                    pairs.append(pair)
    if not pairs:
        raise UsageError(
            f"training pairs {folder}: no audio file has an image or a .txt caption file of the "
            "same name beside it (e.g. dog.wav with dog.jpg or dog.txt)")
    return pairs


def _folder_pair(directory: Path, audio: str, siblings: list[str]) -> AudioPair | None:
    images = [n for n in siblings if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    if images:
        return AudioPair(directory / audio, image=directory / sorted(images)[0])
    texts = [n for n in siblings if os.path.splitext(n)[1].lower() == ".txt"]
    if texts:
        lines = split_lines((directory / texts[0]).read_text(encoding="utf-8-sig", errors="replace"))
        captions = tuple(line.strip() for line in lines if line.strip())
        return AudioPair(directory / audio, captions=captions) if captions else None
    return None


def _pair_of(row: Row, pairs_file: Path) -> AudioPair:
    audio, image, caption = row.text("audio"), row.text("image"), row.text(*CAPTION_COLUMNS)
    if not audio:
        raise row_error("training pairs", pairs_file, row,
                        "no 'audio' column; columns are audio and image or caption")
    if image:
        return AudioPair(pairs_file.parent / audio, image=pairs_file.parent / image)
    if caption:
        return AudioPair(pairs_file.parent / audio, captions=(caption,))
    raise row_error("training pairs", pairs_file, row, "needs an 'image' or a 'caption' beside 'audio'")


# -- training ----------------------------------------------------------------------------------

@dataclass
class _Example:
    wave: np.ndarray
    target: np.ndarray  # unit CLIP vector of the partner
    group: int          # examples with equal targets share a group


def train_audio_tower(clip_encoder, pairs: list[AudioPair], options: AudioTrainingOptions,
                      log: Callable[[str], None] = lambda line: None
                      ) -> tuple[AudioTower, AudioTrainingReport]:
    """Train a new tower on `pairs` against the frozen `clip_encoder` (a ClipEncoder)."""
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    config = AudioTowerConfig(embed_dim=clip_encoder.dim, n_mels=options.n_mels,
                              channels=(options.width, 2 * options.width, 4 * options.width))
    report = AudioTrainingReport()
    examples = _examples(clip_encoder, pairs, config.sample_rate, options, report)
    if len(examples) < 2:
        raise UsageError(f"training needs at least 2 usable pairs, found {len(examples)}")
    train, test = split_examples(len(examples), options.held_out, options.seed)
    report.pairs, report.held_out = len(examples), len(test)

    tower = AudioTower(config)
    crop = int(options.clip_seconds * config.sample_rate)
    generator = np.random.default_rng(options.seed)  # shuffles, and crops long sounds at random

    def loss_of(batch: np.ndarray, scale: torch.Tensor) -> torch.Tensor:
        chosen = [examples[i] for i in batch]
        audio = _embed(tower, [_crop(e.wave, crop, generator) for e in chosen])
        targets = torch.from_numpy(np.stack([e.target for e in chosen]))
        groups = torch.tensor([e.group for e in chosen])
        return symmetric_info_nce(scale * audio @ targets.T, (groups[:, None] == groups[None, :]).float())

    def recall_of() -> dict:
        recall_1, recall_5 = held_out_recall(tower, [examples[i] for i in test], crop)
        return {"R@1": recall_1, "R@5": recall_5}

    fitted = fit(tower, loss_of, recall_of, train, len(test), options, "audio tower",
                 generator=generator, log=log)
    report.epochs = fitted.epochs
    report.seconds = time.perf_counter() - started
    return tower.eval(), report


def _examples(clip_encoder, pairs: list[AudioPair], sample_rate: int,
              options: AudioTrainingOptions, report: AudioTrainingReport) -> list[_Example]:
    """Decode each pair's sound and embed its partner; unusable pairs are skipped and counted."""
    waves, partners = [], []
    for pair in tqdm(pairs, unit="pair", desc="reading pairs", disable=not options.progress):
        try:
            waves.append(load_audio(pair.audio, sample_rate))
            partners.append(_partner(pair))
        except (AudioDecodeError, ImageDecodeError, UsageError) as error:
            report.skipped.append(Skipped(str(pair.audio), str(error)))
            if len(waves) > len(partners):
                waves.pop()
    targets = _partner_vectors(clip_encoder, partners)
    groups: dict[bytes, int] = {}
    return [_Example(wave, target, groups.setdefault(target.tobytes(), len(groups)))
            for wave, target in zip(waves, targets)]


def _partner(pair: AudioPair):
    if pair.image is None:
        return pair.captions
    path = existing_file(str(pair.image))
    if path is None:
        raise UsageError(f"image {pair.image}: no such file")
    return load_image(path)


def _partner_vectors(clip_encoder, partners: list) -> list[np.ndarray]:
    """Unit CLIP vectors: an image's own, or the normalised mean of a sound's captions."""
    images = [p for p in partners if not isinstance(p, tuple)]
    image_vectors = iter(clip_encoder.encode_images(images)) if images else iter(())
    texts = sorted({c for p in partners if isinstance(p, tuple) for c in p})
    text_vectors = dict(zip(texts, clip_encoder.encode_texts(texts))) if texts else {}
    vectors = []
    for partner in partners:
        if isinstance(partner, tuple):
            vectors.append(unit_mean([text_vectors[c] for c in partner]))
        else:
            vectors.append(next(image_vectors))
    return vectors


def _crop(wave: np.ndarray, length: int, generator: np.random.Generator | None) -> np.ndarray:
    """At most `length` samples: a random stretch while training, the start when measuring."""
    if len(wave) <= length:
        return wave
    start = int(generator.integers(len(wave) - length + 1)) if generator is not None else 0
    return wave[start:start + length]


def _embed(tower: AudioTower, waves: list[np.ndarray]) -> torch.Tensor:
    batch, lengths = padded_batch(waves, tower.min_samples)
    return F.normalize(tower(batch, lengths), dim=-1)


@torch.no_grad()
def held_out_recall(tower: AudioTower, examples: list[_Example], crop: int) -> tuple[float, float]:
    """Recall@1 and @5 of sound -> partner among the held-out partners (equal ones merged)."""
    if not examples:
        return 0.0, 0.0
    audio = _embed(tower, [_crop(e.wave, crop, None) for e in examples])
    groups = sorted({e.group for e in examples})
    targets = torch.from_numpy(np.stack([next(e.target for e in examples if e.group == g)
                                         for g in groups]))
    truth = torch.tensor([groups.index(e.group) for e in examples])
    ranking = (audio @ targets.T).argsort(dim=1, descending=True)
    rank = (ranking == truth[:, None]).float().argmax(dim=1)
    return float((rank < 1).float().mean()), float((rank < 5).float().mean())

