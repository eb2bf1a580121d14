"""Walk sources, recognise each file's modality, and turn files into the items they hold.

A file is one of five kinds:
- `image`: one image item;
- `audio`: one audio item per window of a few seconds (cut by the builder once decoded);
- `video`: one item per segment of a few seconds: its frames and soundtrack fused;
- `text`: a text corpus, one text item per non-empty line (.txt) or per record (.jsonl);
- `captions`: text items linked to images: a sidecar `<image stem>.txt`, or a captions
  file (Flickr token TSV, CSV, JSONL, COCO JSON) named on the command line or found as
  `captions.{tsv,csv,jsonl,json}` at the top of a source folder.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..core.paths import absolute_path, display_path, is_under
from .captions import CAPTION_FILE_NAMES, read_caption_pairs
from .tables import FormatError, parse_rows, split_lines

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".ogg", ".oga", ".mp3"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".webm", ".mov"})
TEXT_SUFFIXES = frozenset({".txt", ".jsonl"})


@dataclass(frozen=True)
class SourceFile:
    """A file found under a source, with what the incremental check compares."""

    path: str
    root: str
    kind: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        """The path as stored and shown: always valid UTF-8 (see `display_path`)."""
        return display_path(self.path)


@dataclass(frozen=True)
class ItemSpec:
    """One item a file holds, before it is embedded.

    `uri` is unique across the index; `parent_ref` names the image a caption belongs to,
    as written in the captions source (resolved to an item id by the index).
    """

    uri: str
    modality: str
    text: str | None = None
    parent_ref: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Skipped:
    """A path the build could not use, and why."""

    path: str
    reason: str


@dataclass
class WalkResult:
    files: list[SourceFile]
    skipped: list[Skipped]


@dataclass(frozen=True)
class WalkOptions:
    """How a source folder is walked. An index records them per source, so that a bare
    rebuild walks each source as it was walked when named."""

    exclude_dirs: tuple[str, ...] = ()  # folder names, or absolute folder paths
    include_hidden: bool = False
    follow_external_links: bool = False  # enter links that lead outside every source

    @classmethod
    def of(cls, exclude_dirs: Iterable[str] = (), include_hidden: bool = False,
           follow_external_links: bool = False) -> WalkOptions:
        """Options with the paths among `exclude_dirs` made absolute (names stay names)."""
        excluded = {str(absolute_path(d)) if os.sep in d else d for d in exclude_dirs}
        return cls(tuple(sorted(excluded)), include_hidden, follow_external_links)


def walk_sources(sources: Iterable[str | Path], exclude_dirs: Iterable[str] = (),
                 captions_files: Iterable[str | Path] = (), include_hidden: bool = False,
                 options: Mapping[str, WalkOptions] | None = None) -> WalkResult:
    """List every indexable file under `sources` (folders or single files).

    Hidden entries and folders named in `exclude_dirs` (by name or by path) are not entered;
    `options`, keyed by a source's absolute path, sets them for that source instead.
    Symlinks to files and to folders are followed while they lead to a place inside one of the
    sources (unless a source's options say `follow_external_links`: then anywhere); a link
    leading outside is skipped and reported. A folder reached a second time (a loop, or two
    links to one folder) is walked once, under the first path that reached it.
    """
    sources = list(sources)
    default = WalkOptions.of(exclude_dirs, include_hidden)
    real_sources = [real for real in map(_real_path, sources) if real]
    found: dict[str, SourceFile] = {}
    skipped: list[Skipped] = []
    for source in sources:
        root = absolute_path(source)
        if _is(root, Path.is_dir):
            walk_options = (options or {}).get(str(root), default)
            paths = _walk_folder(root, walk_options, skipped, real_sources)
            auto_captions = [root / name for name in CAPTION_FILE_NAMES if (root / name).is_file()]
        elif _is(root, Path.exists) or _is(root, Path.is_symlink):
            paths, auto_captions = [root], []
            root = root.parent
        else:
            raise FileNotFoundError(f"source {source}: no such file or folder")
        for path in paths:
            _add(found, skipped, path, root, _kind_of(path))
        for path in auto_captions:
            _add(found, skipped, path, root, "captions")
    for captions in captions_files:
        path = absolute_path(captions)
        if not _is(path, Path.is_file):
            raise FileNotFoundError(f"captions file {captions}: no such file")
        _add(found, skipped, path, path.parent, "captions")
    _mark_sidecars(found)
    return WalkResult(sorted(found.values(), key=lambda f: f.path), skipped)


def _is(path: Path, test) -> bool:
    """A Path test that is False for names no file system could hold (NUL, over-long)."""
    try:
        return test(path)
    except (OSError, ValueError):
        return False


def _walk_folder(root: Path, options: WalkOptions, skipped: list[Skipped],
                 real_sources: list[str] = ()) -> Iterator[Path]:
    """The files under `root`. Symlinked folders are entered after the real tree, so a file
    keeps its real path when a link also leads to it; a folder already walked (a loop, a
    second link) is not walked again."""
    def on_error(error: OSError) -> None:
        skipped.append(Skipped(display_path(str(error.filename)),
                               f"cannot read folder ({error.strerror})"))

    walked = {_folder_identity(str(root))}
    links: deque[str] = deque()  # symlinked folders found, entered once the real tree is done
    tops = [str(root)]
    while tops:
        for folder, dirs, names in os.walk(tops.pop(), onerror=on_error):
            entered = []
            for name in sorted(dirs):
                path = os.path.join(folder, name)
                if not _enter(folder, name, options):
                    continue
                if os.path.islink(path):
                    if _follow_link(path, options, real_sources, skipped):
                        links.append(path)
                elif _first_visit(path, walked):
                    entered.append(name)
            dirs[:] = entered
            for name in sorted(names):
                if options.include_hidden or not name.startswith("."):
                    path = os.path.join(folder, name)
                    if _kind_of(Path(name)) and (not os.path.islink(path) or
                                                 _follow_link(path, options, real_sources, skipped)):
                        yield Path(path)
        while links and not tops:
            link = links.popleft()
            if _first_visit(link, walked):
                tops.append(link)


def _real_path(source: str | Path) -> str | None:
    """A source with every link resolved; None for names no file system holds (the walk
    reports those itself)."""
    try:
        return os.path.realpath(absolute_path(source))
    except (OSError, ValueError):  # a NUL, a lone surrogate, an empty name
        return None


def _follow_link(link: str, options: WalkOptions, real_sources: list[str],
                 skipped: list[Skipped]) -> bool:
    """Whether a symlink found in a source is followed: when it leads inside one of the
    sources, or anywhere with `follow_external_links`. One leading outside is reported."""
    if options.follow_external_links or not real_sources:
        return True
    if is_under(os.path.realpath(link), real_sources):
        return True
    skipped.append(Skipped(display_path(link), "a link leading outside the sources (index its "
                                                "target as a source, or use --follow-external-links)"))
    return False


def open_indexed_file(path: str, roots: Iterable[str], size: int, mtime_ns: int,
                      anywhere: bool = False) -> tuple[Path, int] | None:
    """An indexed file opened for reading, as (path, descriptor), only if it is still the file
    the index recorded: its real path under one of `roots` (also resolved; any place when
    `anywhere`), opened without following a last link, and the opened file's size and mtime
    the recorded ones. Checked on the open descriptor, so a link swapped in between fails.
    None otherwise."""
    real_roots = [os.path.realpath(root) for root in roots]
    try:
        descriptor = os.open(os.path.realpath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(descriptor)
        opened = os.readlink(f"/proc/self/fd/{descriptor}") if os.path.exists("/proc/self/fd") else \
            os.path.realpath(path)
        if (stat.S_ISREG(info.st_mode) and info.st_size == size and info.st_mtime_ns == mtime_ns
                and (anywhere or is_under(opened, real_roots))):
            return Path(path), descriptor
    except OSError:
        pass
    os.close(descriptor)
    return None


def _folder_identity(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _first_visit(path: str, walked: set) -> bool:
    """True the first time a folder (by device and inode) is reached; records it."""
    identity = _folder_identity(path)
    if identity is None or identity in walked:
        return identity is None  # unreadable: os.walk reports it when it tries to list it
    walked.add(identity)
    return True


def _enter(folder: str, name: str, options: WalkOptions) -> bool:
    if name.startswith(".") and not options.include_hidden:
        return False
    return name not in options.exclude_dirs and os.path.join(folder, name) not in options.exclude_dirs


def _kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    return None


def _add(found: dict[str, SourceFile], skipped: list[Skipped], path: Path, root: Path,
         kind: str | None) -> None:
    if kind is None:
        return
    try:
        info = path.stat()
    except OSError as error:
        reason = "broken symlink" if path.is_symlink() else f"cannot stat ({error.strerror})"
        skipped.append(Skipped(display_path(str(path)), reason))
        return
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
        skipped.append(Skipped(display_path(str(path)), "not a regular file"))
        return
    found[str(path)] = SourceFile(str(path), display_path(str(root)), kind, info.st_size,
                                  info.st_mtime_ns)


def _mark_sidecars(found: dict[str, SourceFile]) -> None:
    """A .txt beside an image of the same stem holds that image's captions, not a corpus."""
    image_stems = {os.path.splitext(p)[0] for p, f in found.items() if f.kind == "image"}
    for path, source in list(found.items()):
        if source.kind == "text" and path.lower().endswith(".txt"):
            if os.path.splitext(path)[0] in image_stems:
                found[path] = SourceFile(path, source.root, "captions", source.size, source.mtime_ns)


def read_items(source: SourceFile, data: bytes) -> list[ItemSpec]:
    """The items a file holds, from its bytes (already read for hashing)."""
    if source.kind == "image":
        return [ItemSpec(uri=source.key, modality="image")]
    text = data.decode("utf-8-sig", errors="replace")  # -sig: editors' byte-order marks
    if source.kind == "captions":
        image = _sidecar_image(source.path)
        pairs = read_caption_pairs(source.path, text, os.path.basename(image) if image else None)
        return _caption_items(source.key, pairs)
    if source.path.lower().endswith(".jsonl"):
        return _jsonl_texts(source.key, text)
    return [ItemSpec(uri=f"{source.key}#L{number}", modality="text", text=line.strip())
            for number, line in enumerate(split_lines(text), 1) if line.strip()]


def _caption_items(uri: str, pairs: list[tuple[str, str]]) -> list[ItemSpec]:
    seen: Counter[str] = Counter()
    items = []
    for name, caption in pairs:
        image = display_path(name)  # compared with stored paths when captions are linked
        if caption:
            # Numbering per image keeps a caption's uri when other lines of the file change.
            items.append(ItemSpec(uri=f"{uri}#{image}#{seen[image]}", modality="text",
                                  text=caption, parent_ref=image))
            seen[image] += 1
    return items


def _sidecar_image(path: str) -> str | None:
    if not path.lower().endswith(".txt"):
        return None
    stem = os.path.splitext(path)[0]
    for candidate in os.listdir(os.path.dirname(path)):
        full = os.path.join(os.path.dirname(path), candidate)
        if os.path.splitext(full)[0] == stem and _kind_of(Path(candidate)) == "image":
            return full
    return None


def _jsonl_texts(path: str, content: str) -> list[ItemSpec]:
    """Records with a `text` field; an `id` field names the item, other fields become metadata."""
    items = []
    uris: set[str] = set()
    for row in parse_rows(content, "jsonl"):
        record = dict(row.fields)
        if not isinstance(record.get("text"), str):
            raise FormatError(f"line {row.line} has no string field 'text'")
        uri = f"{path}#id={record.pop('id')}" if "id" in record else f"{path}#L{row.line}"
        if uri in uris:
            raise FormatError(f"line {row.line} repeats the id of an earlier record")
        uris.add(uri)
        text = record.pop("text").strip()
        if text:
            items.append(ItemSpec(uri=uri, modality="text", text=text, meta=record))
    return items


def file_digest(data: bytes) -> str:
    """The content hash that detects renames and real changes."""
    return hashlib.sha256(data).hexdigest()


def text_digest(text: str) -> str:
    """The content hash of one text item, so equal texts share one embedding."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
