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

import csv
import io
import json
import math
import os
import random
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
from ..encoders.audio_tower import AudioTower, AudioTowerConfig, padded_batch
from ..media.audio import AudioDecodeError, load_audio
from ..media.captions import split_lines
from ..media.corpus import AUDIO_SUFFIXES, IMAGE_SUFFIXES, Skipped
from ..media.images import ImageDecodeError, load_image
from .loop import optimise, symmetric_info_nce

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
class EpochReport:
    epoch: int
    loss: float
    recall_at_1: float  # held-out sounds whose nearest held-out partner is their own
    recall_at_5: float


@dataclass
class AudioTrainingReport:
    pairs: int = 0
    held_out: int = 0
    epochs: list[EpochReport] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    identity: str = ""

    def summary(self) -> str:
        last = self.epochs[-1] if self.epochs else None
        recall = (f"held-out recall@1 {last.recall_at_1:.3f}, @5 {last.recall_at_5:.3f}"
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
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    rows = _csv_rows(text) if path.suffix.lower() == ".csv" else _jsonl_rows(text, source)
    pairs = [_pair_of(row, number, path) for number, row in enumerate(rows, 1)]
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


def _csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _jsonl_rows(text: str, source: str | Path) -> list[dict]:
    rows = []
    for number, line in enumerate(split_lines(text), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise UsageError(f"training pairs {source}, line {number}: not JSON ({error})") from None
    return rows


def _pair_of(row: dict, number: int, pairs_file: Path) -> AudioPair:
    where = f"training pairs {pairs_file}, row {number}"
    if not isinstance(row, dict) or not row.get("audio"):
        raise UsageError(f"{where}: no 'audio' column; columns are audio and image or caption")
    audio = pairs_file.parent / str(row["audio"])
    caption = next((row[c] for c in CAPTION_COLUMNS if isinstance(row.get(c), str) and row[c].strip()),
                   None)
    if row.get("image"):
        return AudioPair(audio, image=pairs_file.parent / str(row["image"]))
    if caption:
        return AudioPair(audio, captions=(caption.strip(),))
    raise UsageError(f"{where}: needs an 'image' or a 'caption' beside 'audio'")


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
    random.Random(options.seed).shuffle(examples)
    held = min(len(examples) - 1, round(len(examples) * options.held_out)) if options.held_out else 0
    train, test = examples[held:], examples[:held]
    report.pairs, report.held_out = len(examples), held

    tower = AudioTower(config)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    optimizer = torch.optim.AdamW([*tower.parameters(), logit_scale], lr=options.learning_rate,
                                  weight_decay=1e-4)
    steps = options.epochs * math.ceil(len(train) / options.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, options.learning_rate, total_steps=steps,
                                                   pct_start=0.1)
    crop = int(options.clip_seconds * config.sample_rate)
    generator = np.random.default_rng(options.seed)
    for epoch in tqdm(range(1, options.epochs + 1), unit="epoch", desc="audio tower",
                      disable=not options.progress):
        tower.train()
        losses = [_step(tower, logit_scale, optimizer, schedule, batch, crop, generator)
                  for batch in _batches(train, options.batch_size, generator)]
        tower.eval()
        recall_1, recall_5 = held_out_recall(tower, test, crop)
        report.epochs.append(EpochReport(epoch, float(np.mean(losses)), recall_1, recall_5))
        log(f"epoch {epoch}: loss {np.mean(losses):.3f}, held-out recall@1 {recall_1:.3f}, "
            f"@5 {recall_5:.3f}")
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
            mean = np.mean([text_vectors[c] for c in partner], axis=0)
            vectors.append((mean / np.linalg.norm(mean)).astype(np.float32))
        else:
            vectors.append(next(image_vectors))
    return vectors


def _batches(examples: list[_Example], size: int, generator: np.random.Generator):
    order = generator.permutation(len(examples))
    for start in range(0, len(order), size):
        chosen = [examples[i] for i in order[start:start + size]]
        if len(chosen) > 1:  # one example has no negatives to learn from
            yield chosen


def _crop(wave: np.ndarray, length: int, generator: np.random.Generator | None) -> np.ndarray:
    """At most `length` samples: a random stretch while training, the start when measuring."""
    if len(wave) <= length:
        return wave
    start = int(generator.integers(len(wave) - length + 1)) if generator is not None else 0
    return wave[start:start + length]


def _embed(tower: AudioTower, waves: list[np.ndarray]) -> torch.Tensor:
    batch, lengths = padded_batch(waves, tower.min_samples)
    return F.normalize(tower(batch, lengths), dim=-1)


def _step(tower: AudioTower, logit_scale: torch.nn.Parameter, optimizer, schedule,
          batch: list[_Example], crop: int, generator: np.random.Generator) -> float:
    audio = _embed(tower, [_crop(e.wave, crop, generator) for e in batch])
    targets = torch.from_numpy(np.stack([e.target for e in batch]))
    groups = torch.tensor([e.group for e in batch])
    positives = (groups[:, None] == groups[None, :]).float()
    logits = logit_scale.exp() * audio @ targets.T
    return optimise(symmetric_info_nce(logits, positives), optimizer, schedule, logit_scale)


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

