"""Everything the benchmark measures on: the photo folder (the Flickr8k test split when it is
there), synthetic pictures, captions, clustered vectors, sounds and a video clip.

Synthetic data is seeded, so two runs measure the same work.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

from .engine import CAPTION_FILE_NAMES, read_items, walk_sources
from .measure import REPO


def shared_data(name: str) -> Path:
    """A data set in the project's shared/ folder, which lies beside the checkout, or beside
    the main clone when this checkout is one of its git worktrees."""
    beside = REPO.parent / "shared" / "data" / name
    common = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--path-format=absolute",
                             "--git-common-dir"], capture_output=True, text=True).stdout.strip()
    main_clone = Path(common).parent.parent / "shared" / "data" / name if common else beside
    return beside if beside.is_dir() or not main_clone.is_dir() else main_clone


DEFAULT_DATA = shared_data("flickr8k-test")
QUERY = "a dog in the park"

ANN_DIM = 512
ANN_TOPICS = 50  # centres lie around topics, so neighbours past a point's own cluster are related
ANN_CENTRES = 1000
ANN_NOISE = 1.0  # expected norm of the noise added to a unit centre: cos(point, centre) ~ 0.7
SCALE_BLOCK = 4096  # synthetic vectors are made in blocks, each from a seed of its own
SCALE_POINTS_PER_CENTRE = 100

SOUND_RATE = 16000
PITCHES = (220.0, 440.0, 880.0, 1760.0)
PATTERNS = ("steady", "pulsing", "rising")


# -- pictures and the photo folder -------------------------------------------------------------


def synthetic_image(rng: np.random.Generator, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """A smooth random picture with sensor-like noise: decodes about as fast as a photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.float32)
    noisy = smooth + rng.normal(0, 8, smooth.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_synthetic_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        synthetic_image(rng).save(folder / f"synthetic_{number:05d}.jpg", quality=90)


@dataclass
class Corpus:
    """The folder the build indexes, its image files in walk order, and its texts."""

    folder: Path
    images: list[Path]
    texts: list[str]
    origin: str


def image_source(args: argparse.Namespace) -> Path | None:
    """The photo folder asked for (--images), else the Flickr8k test split if present."""
    return args.images or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)


def prepare_corpus(args: argparse.Namespace, workdir: Path) -> Corpus:
    """The image folder (default: the Flickr8k test split), limited or synthetic as asked."""
    source = image_source(args)
    if source is None:
        count = min(args.synthetic, args.limit or args.synthetic)
        folder = workdir / "synthetic"
        write_synthetic_images(folder / "images", count, args.seed)
        origin = f"{count} synthetic 500x375 JPEGs"
    elif args.limit:
        folder = limited_view(Path(source), args.limit, workdir / "view")
        origin = f"first {args.limit} images of {source} (copied), with their captions"
    else:
        folder, origin = Path(source), str(source)
    walk = walk_sources([folder])
    images = [Path(f.path) for f in walk.files if f.kind == "image"]
    if not images:
        raise SystemExit(f"no images under {folder}")
    texts = [item.text for f in walk.files if f.kind != "image"
             for item in read_items(f, Path(f.path).read_bytes()) if item.text]
    return Corpus(folder, images, texts, origin)


def image_files(source: Path) -> list[Path]:
    """The image files under `source`, in the engine's walk order."""
    return [Path(f.path) for f in walk_sources([source]).files if f.kind == "image"]


def limited_view(source: Path, limit: int, view: Path, captions: bool = True) -> Path:
    """A folder of copies of the first `limit` images of `source` (same relative paths; copies,
    for the engine does not follow a link leading out of the folder it indexes) and,
    with `captions`, a captions.tsv holding those images' captions from `source`'s top-level
    captions files."""
    source = source.expanduser().absolute()
    walk = walk_sources([source])
    images = [Path(f.path) for f in walk.files if f.kind == "image"][:limit]
    for image in images:
        copy = view / image.relative_to(source)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, copy)
    if not captions:
        return view
    kept = {image.name for image in images}
    captions_files = [f for f in walk.files if f.kind == "captions" and Path(f.path).parent == source
                      and Path(f.path).name in CAPTION_FILE_NAMES]
    lines, seen = [], dict.fromkeys(kept, 0)
    for captions_file in captions_files:
        for item in read_items(captions_file, Path(captions_file.path).read_bytes()):
            name = Path(item.parent_ref or "").name
            if name in kept and item.text:
                lines.append(f"{item.parent_ref}#{seen[name]}\t{item.text}")
                seen[name] += 1
    if lines:
        (view / "captions.tsv").write_text("\n".join(lines) + "\n")
    return view


def generated_captions(count: int, seed: int) -> list[str]:
    """Caption-like sentences of ~10 words, for when the corpus has no captions."""
    rng = np.random.default_rng(seed)
    subjects = ["A black dog", "Two children", "A man in a red shirt", "A woman", "A brown horse",
                "Three people", "A little girl", "A cyclist"]
    actions = ["runs across", "is sitting on", "jumps over", "walks along", "plays in", "stands near"]
    places = ["a grassy park .", "the sandy beach .", "a busy city street .", "a snowy hill .",
              "the shallow water .", "a wooden bench ."]
    return [" ".join((rng.choice(subjects), rng.choice(actions), rng.choice(places)))
            for _ in range(count)]


# -- vectors -----------------------------------------------------------------------------------


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def clustered_points(rng: np.random.Generator, centres: np.ndarray, count: int,
                     chunk: int = 100_000) -> np.ndarray:
    """Unit vectors scattered around random centres, made a chunk at a time to bound memory."""
    dim = centres.shape[1]
    points = np.empty((count, dim), np.float32)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        noise = rng.standard_normal((size, dim), dtype=np.float32) * (ANN_NOISE / np.sqrt(dim))
        points[start:start + size] = unit_rows(centres[rng.integers(len(centres), size=size)] + noise)
    return points


def ann_dataset(count: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` clustered unit vectors and held-out queries drawn around the same centres.

    The centres themselves cluster around topics: with centres alone, a point's neighbours
    beyond its own cluster (~10 points at N=10k) would be unrelated points whose order is noise.
    """
    rng = np.random.default_rng(seed)
    topics = unit_rows(rng.standard_normal((ANN_TOPICS, ANN_DIM), dtype=np.float32))
    centres = clustered_points(rng, topics, ANN_CENTRES)
    return clustered_points(rng, centres, count), clustered_points(rng, centres, queries)


@dataclass(frozen=True)
class SyntheticVectors:
    """`count` clustered unit vectors (ids = row numbers) made on demand, block by block, so any
    process reading a range of ids gets the same vectors and none are held in memory."""

    count: int
    seed: int
    dim: int = ANN_DIM

    def ids(self) -> np.ndarray:
        return np.arange(self.count, dtype=np.int64)

    def read(self, low: int, high: int) -> tuple[np.ndarray, np.ndarray]:
        high = min(high, self.count)
        first, last = low // SCALE_BLOCK, (high - 1) // SCALE_BLOCK
        rows = np.concatenate([self.block(b) for b in range(first, last + 1)])
        offset = first * SCALE_BLOCK
        return np.arange(low, high, dtype=np.int64), rows[low - offset:high - offset]

    def block(self, number: int) -> np.ndarray:
        size = min(SCALE_BLOCK, self.count - number * SCALE_BLOCK)
        return clustered_points(np.random.default_rng([self.seed, number]), self.centres(), size)

    def queries(self, count: int) -> np.ndarray:
        """Held-out queries around the same centres."""
        return clustered_points(np.random.default_rng([self.seed, self.count, 1]), self.centres(), count)

    def centres(self) -> np.ndarray:
        return scale_centres(self.count, self.seed, self.dim)


@functools.lru_cache(maxsize=1)
def scale_centres(count: int, seed: int, dim: int) -> np.ndarray:
    """About SCALE_POINTS_PER_CENTRE points a centre, the centres around ANN_TOPICS topics."""
    rng = np.random.default_rng([seed, count])
    topics = unit_rows(rng.standard_normal((ANN_TOPICS, dim), dtype=np.float32))
    return clustered_points(rng, topics, max(1, count // SCALE_POINTS_PER_CENTRE))


# -- sounds and video --------------------------------------------------------------------------


def synthetic_sound(rng: np.random.Generator, pitch: float, pattern: str, seconds: float) -> np.ndarray:
    """A tone of one of twelve classes (4 pitches x 3 patterns), with jitter and a little noise."""
    t = np.arange(int(seconds * SOUND_RATE)) / SOUND_RATE
    frequency = pitch * rng.uniform(0.97, 1.03)
    sweep = t + t**2 / (2 * seconds) if pattern == "rising" else t  # rising: up an octave
    wave = np.sin(2 * np.pi * frequency * sweep + rng.uniform(0, 2 * np.pi))
    if pattern == "pulsing":
        wave *= (t * rng.uniform(4, 6)) % 1 < 0.5
    wave = rng.uniform(0.3, 0.8) * wave + rng.normal(0, 0.01, len(t))
    return wave.astype(np.float32)


def write_sound_pairs(folder: Path, count: int, seconds: float, seed: int) -> None:
    """`count` sounds, each with a `.txt` caption naming its class: training pairs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for number in range(count):
        pitch, pattern = PITCHES[number % len(PITCHES)], PATTERNS[number // len(PITCHES) % len(PATTERNS)]
        soundfile.write(folder / f"{number:05d}.wav", synthetic_sound(rng, pitch, pattern, seconds),
                        SOUND_RATE)
        (folder / f"{number:05d}.txt").write_text(f"a {pattern} tone at {pitch:.0f} hertz\n")


MEDIA_KINDS = ("sound", "video")


def write_media_library(folder: Path, kind: str, count: int, seconds: float, seed: int) -> list[Path]:
    """A new `folder` of `count` seeded synthetic files of `kind`, each `seconds` long: flac
    tones of the twelve sound classes, or H.264 + AAC clips (see `write_synthetic_video`)."""
    if kind not in MEDIA_KINDS:
        raise ValueError(f"kind {kind!r} is not one of {', '.join(MEDIA_KINDS)}")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    files = []
    for number in range(count):
        if kind == "sound":
            files.append(folder / f"{number:05d}.flac")
            wave = synthetic_sound(rng, PITCHES[number % 4], PATTERNS[number % 3], seconds)
            soundfile.write(files[-1], wave, SOUND_RATE)
        else:
            files.append(folder / f"{number:05d}.mp4")
            write_synthetic_video(files[-1], seconds, rng)
    return files


def write_synthetic_video(path: Path, seconds: float, rng: np.random.Generator) -> None:
    """A 640x360 30 fps H.264 clip of drifting coloured boxes, with an AAC tone that changes pitch."""
    fps, rate = 30, 44100
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = 640, 360, "yuv420p"
        audio = container.add_stream("aac", rate=rate)
        audio.layout = "mono"
        boxes = rng.integers(0, 255, (8, 3))
        for index in range(int(seconds * fps)):
            picture = np.full((360, 640, 3), 40, np.uint8)
            for number, colour in enumerate(boxes):
                left = int(index * (number + 1)) % 560
                picture[40 * number:40 * number + 36, left:left + 80] = colour
            container.mux(video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(video.encode(None))
        t = np.arange(int(seconds * rate)) / rate
        tone = (0.3 * np.sin(2 * np.pi * (220 + 220 * (t // 10 % 3)) * t)).astype(np.float32)
        for start in range(0, len(tone), 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + 1024], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


def near_copy_vectors(count: int, dim: int, seed: int, planted_share: float = 0.01
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Random unit vectors whose last `planted_share` are near copies (cosine ~0.97) of others:
    the vectors, and for each planted copy (in order) the row it copies."""
    rng = np.random.default_rng(seed)
    vectors = unit_rows(rng.standard_normal((count, dim), dtype=np.float32))
    planted = int(count * planted_share)
    sources = rng.choice(count - planted, planted, replace=False)
    noise = unit_rows(rng.standard_normal((planted, dim), dtype=np.float32))
    vectors[count - planted:] = vectors[sources] + 0.25 * noise
    return vectors, sources
