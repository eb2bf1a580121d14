"""Tests for `retrieval.media.corpus`: the source walk, item extraction and display paths.

The walk only looks at names and stat, so tiny fake files stand in for images.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrieval.core.paths import display_path, path_from_display
from retrieval.media.corpus import IMAGE_SUFFIXES, SourceFile, WalkOptions, read_items, walk_sources

# -- helpers ---------------------------------------------------------------------------------


def touch(path: Path, data: bytes | str = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def rel(result, root: Path) -> dict[str, str]:
    return {os.path.relpath(f.path, root): f.kind for f in result.files}


def by_name(result) -> dict[str, SourceFile]:
    return {os.path.basename(f.path): f for f in result.files}


def items_of(source: SourceFile):
    with open(source.path, "rb") as handle:
        return read_items(source, handle.read())


# -- suffixes and kinds ----------------------------------------------------------------------


def test_finds_every_image_suffix_and_text_suffixes_ignoring_others(tmp_path):
    images = [f"img{i}{suffix}" for i, suffix in enumerate(sorted(IMAGE_SUFFIXES))]
    assert {os.path.splitext(n)[1] for n in images} == {
        ".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    for name in images:
        touch(tmp_path / name)
    touch(tmp_path / "notes.txt", "hello\n")
    touch(tmp_path / "records.jsonl", '{"text": "hi"}\n')
    touch(tmp_path / "song.FLAC")
    touch(tmp_path / "clip.webm")
    for other in ["doc.pdf", "data.csv", "data.json", "raw.heic", "noext", "img.jpg.bak",
                  "archive.tar.gz", "x.jpgx"]:
        touch(tmp_path / other)

    result = walk_sources([tmp_path])

    expected = {name: "image" for name in images}
    expected.update({"notes.txt": "text", "records.jsonl": "text", "song.FLAC": "audio",
                     "clip.webm": "video"})
    assert rel(result, tmp_path) == expected
    assert result.skipped == []


def test_suffixes_are_case_insensitive(tmp_path):
    for name in ["A.JPG", "b.Jpeg", "c.PNG", "d.WebP", "e.TIFF", "f.TXT", "g.JSONL"]:
        touch(tmp_path / name, "line\n")
    touch(tmp_path / "h.PDF")

    kinds = rel(walk_sources([tmp_path]), tmp_path)

    assert kinds == {"A.JPG": "image", "b.Jpeg": "image", "c.PNG": "image", "d.WebP": "image",
                     "e.TIFF": "image", "f.TXT": "text", "g.JSONL": "text"}


def test_walk_recurses_and_records_root_size_and_mtime(tmp_path):
    deep = touch(tmp_path / "a" / "b" / "c" / "deep.png", b"12345")

    result = walk_sources([tmp_path])

    [source] = result.files
    assert source.path == str(deep)
    assert source.root == str(tmp_path)
    assert source.kind == "image"
    assert source.size == 5
    assert source.mtime_ns == deep.stat().st_mtime_ns


def test_files_are_sorted_and_unique_across_overlapping_sources(tmp_path):
    for name in ["z.jpg", "a.jpg", "m/b.png"]:
        touch(tmp_path / name)

    result = walk_sources([tmp_path, tmp_path / "m", tmp_path])

    paths = [f.path for f in result.files]
    assert paths == sorted(paths)
    assert len(paths) == len(set(paths)) == 3


# -- hidden and excluded folders -------------------------------------------------------------


def test_hidden_files_and_folders_skipped_unless_include_hidden(tmp_path):
    touch(tmp_path / "visible.jpg")
    touch(tmp_path / ".hidden.jpg")
    touch(tmp_path / ".git" / "inside.jpg")
    touch(tmp_path / "sub" / ".cache" / "deep.txt", "x\n")
    touch(tmp_path / "sub" / "ok.txt", "x\n")

    default = rel(walk_sources([tmp_path]), tmp_path)
    everything = rel(walk_sources([tmp_path], include_hidden=True), tmp_path)

    assert default == {"visible.jpg": "image", os.path.join("sub", "ok.txt"): "text"}
    assert everything == {
        "visible.jpg": "image", ".hidden.jpg": "image", os.path.join(".git", "inside.jpg"): "image",
        os.path.join("sub", ".cache", "deep.txt"): "text", os.path.join("sub", "ok.txt"): "text"}


def test_exclude_dirs_by_name_at_any_depth(tmp_path):
    touch(tmp_path / "keep" / "a.jpg")
    touch(tmp_path / "node_modules" / "b.jpg")
    touch(tmp_path / "keep" / "node_modules" / "c.jpg")
    touch(tmp_path / "keep" / "node_modules_not" / "d.jpg")

    kinds = rel(walk_sources([tmp_path], exclude_dirs=["node_modules"]), tmp_path)

    assert set(kinds) == {os.path.join("keep", "a.jpg"), os.path.join("keep", "node_modules_not", "d.jpg")}


def test_exclude_dirs_by_absolute_path_excludes_only_that_folder(tmp_path):
    touch(tmp_path / "a" / "cache" / "x.jpg")
    touch(tmp_path / "b" / "cache" / "y.jpg")

    kinds = rel(walk_sources([tmp_path], exclude_dirs=[str(tmp_path / "a" / "cache")]), tmp_path)

    assert set(kinds) == {os.path.join("b", "cache", "y.jpg")}


def test_exclude_dirs_by_relative_path_resolved_from_cwd(tmp_path, monkeypatch):
    touch(tmp_path / "data" / "skip" / "x.jpg")
    touch(tmp_path / "data" / "keep" / "y.jpg")
    monkeypatch.chdir(tmp_path)

    result = walk_sources(["data"], exclude_dirs=[os.path.join("data", "skip")])

    assert rel(result, tmp_path) == {os.path.join("data", "keep", "y.jpg"): "image"}
    assert result.files[0].root == str(tmp_path / "data")


# -- sidecars and caption files --------------------------------------------------------------


def test_txt_beside_image_of_same_stem_is_a_sidecar(tmp_path):
    touch(tmp_path / "cat.jpg")
    touch(tmp_path / "cat.txt", "a cat\n")
    touch(tmp_path / "Dog.PNG")
    touch(tmp_path / "Dog.TXT", "a dog\n")
    touch(tmp_path / "notes.txt", "free text\n")
    touch(tmp_path / "other" / "cat.txt", "same stem, other folder\n")
    touch(tmp_path / "bird.jsonl", '{"text": "jsonl is never a sidecar"}\n')
    touch(tmp_path / "bird.gif")

    kinds = rel(walk_sources([tmp_path]), tmp_path)

    assert kinds["cat.txt"] == "captions"
    assert kinds["Dog.TXT"] == "captions"
    assert kinds["notes.txt"] == "text"
    assert kinds[os.path.join("other", "cat.txt")] == "text"
    assert kinds["bird.jsonl"] == "text"
    assert kinds["cat.jpg"] == kinds["Dog.PNG"] == kinds["bird.gif"] == "image"


@pytest.mark.parametrize("name", ["captions.tsv", "captions.csv", "captions.jsonl", "captions.json"])
def test_captions_file_at_top_of_source_is_picked_up(tmp_path, name):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / name, "")

    result = walk_sources([tmp_path])

    captions = by_name(result)[name]
    assert captions.kind == "captions"
    assert captions.root == str(tmp_path)
    assert [f.kind for f in result.files].count("captions") == 1


def test_captions_tsv_below_the_top_is_not_picked_up(tmp_path):
    touch(tmp_path / "sub" / "captions.tsv", "a.jpg#0\tx\n")
    touch(tmp_path / "sub" / "a.jpg")

    assert rel(walk_sources([tmp_path]), tmp_path) == {os.path.join("sub", "a.jpg"): "image"}


def test_explicit_captions_file_argument(tmp_path):
    images = tmp_path / "images"
    touch(images / "a.jpg")
    caps = touch(tmp_path / "meta" / "flickr.token", "a.jpg#0\tx\n")
    walked = touch(images / "sub" / "extra.jsonl", '{"image": "a.jpg", "caption": "y"}\n')

    result = walk_sources([images], captions_files=[caps, str(walked)])

    files = by_name(result)
    assert files["flickr.token"].kind == "captions"
    assert files["flickr.token"].root == str(caps.parent)
    # a walked .jsonl named as a captions file is captions, not a text corpus
    assert files["extra.jsonl"].kind == "captions"
    assert len(result.files) == 3


def test_missing_source_raises_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        walk_sources([missing])


def test_missing_captions_file_raises_naming_it(tmp_path):
    touch(tmp_path / "a.jpg")
    with pytest.raises(FileNotFoundError, match="no_such_captions.tsv"):
        walk_sources([tmp_path], captions_files=[tmp_path / "no_such_captions.tsv"])


def test_captions_file_that_is_a_folder_raises(tmp_path):
    (tmp_path / "caps.tsv").mkdir()
    with pytest.raises(FileNotFoundError, match="caps.tsv"):
        walk_sources([], captions_files=[tmp_path / "caps.tsv"])


def test_single_file_sources(tmp_path):
    image = touch(tmp_path / "one" / "photo.JPG")
    corpus = touch(tmp_path / "two" / "lines.txt", "a\nb\n")

    result = walk_sources([str(image), corpus])

    files = by_name(result)
    assert set(files) == {"photo.JPG", "lines.txt"}
    assert files["photo.JPG"].kind == "image"
    assert files["photo.JPG"].root == str(image.parent)
    assert files["lines.txt"].kind == "text"
    assert files["lines.txt"].root == str(corpus.parent)


def test_single_hidden_file_source_is_used(tmp_path):
    hidden = touch(tmp_path / ".secret.png")
    assert [f.path for f in walk_sources([hidden]).files] == [str(hidden)]


# -- symlinks and unreadable folders ---------------------------------------------------------


def test_broken_symlink_reported_in_skipped(tmp_path):
    touch(tmp_path / "good.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "dangling.bin").symlink_to(tmp_path / "gone.bin")  # not a known suffix: ignored

    result = walk_sources([tmp_path])

    assert [os.path.basename(f.path) for f in result.files] == ["good.jpg"]
    assert len(result.skipped) == 1
    assert result.skipped[0].path == str(tmp_path / "dangling.jpg")
    assert "broken symlink" in result.skipped[0].reason


def test_broken_symlink_given_as_single_source_is_skipped_not_raised(tmp_path):
    link = tmp_path / "dangling.png"
    link.symlink_to(tmp_path / "gone.png")

    result = walk_sources([link])

    assert result.files == []
    assert [s.path for s in result.skipped] == [str(link)]
    assert "broken symlink" in result.skipped[0].reason


def test_symlink_to_file_is_followed(tmp_path):
    target = touch(tmp_path / "elsewhere" / "real.data", b"1234")
    touch(tmp_path / "src" / "plain.jpg")
    (tmp_path / "src" / "alias.jpg").symlink_to(target)

    files = by_name(walk_sources([tmp_path / "src"], options={
        str(tmp_path / "src"): WalkOptions(follow_external_links=True)}))

    assert files["alias.jpg"].kind == "image"
    assert files["alias.jpg"].size == 4
    # By default a link leading outside the sources is reported, not indexed.
    result = walk_sources([tmp_path / "src"])
    assert "alias.jpg" not in by_name(result)
    assert [(Path(s.path).name, "outside the sources" in s.reason) for s in result.skipped] == [
        ("alias.jpg", True)]


def test_symlink_loop_between_folders_does_not_hang(tmp_path):
    touch(tmp_path / "a" / "in_a.jpg")
    touch(tmp_path / "b" / "in_b.jpg")
    (tmp_path / "a" / "to_b").symlink_to(tmp_path / "b", target_is_directory=True)
    (tmp_path / "b" / "to_a").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "a" / "self").symlink_to(tmp_path, target_is_directory=True)

    outcome: dict = {}

    def run():
        outcome["result"] = walk_sources([tmp_path])

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "walk_sources hangs on a symlink loop"
    # each folder is walked once, and before any link to it: each file is found by its real path
    assert rel(outcome["result"], tmp_path) == {
        os.path.join("a", "in_a.jpg"): "image", os.path.join("b", "in_b.jpg"): "image"}


def test_symlinked_folders_in_a_source_are_followed(tmp_path):
    """They were once skipped without a word, while file symlinks were followed."""
    touch(tmp_path / "elsewhere" / "far.jpg")
    touch(tmp_path / "src" / ".store" / "kept.png")
    touch(tmp_path / "src" / "real" / "near.jpg")
    (tmp_path / "src" / "outside").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "src" / "shown").symlink_to(".store", target_is_directory=True)
    (tmp_path / "src" / "again").symlink_to("real", target_is_directory=True)  # walked once
    (tmp_path / "src" / "real" / "up").symlink_to("..", target_is_directory=True)  # a loop
    (tmp_path / "src" / "broken").symlink_to("nowhere", target_is_directory=True)

    result = walk_sources([tmp_path / "src"])

    assert rel(result, tmp_path / "src") == {
        os.path.join("shown", "kept.png"): "image", os.path.join("real", "near.jpg"): "image"}
    assert [Path(s.path).name for s in result.skipped] == ["outside"]  # leads outside the source
    followed = walk_sources([tmp_path / "src"], options={
        str(tmp_path / "src"): WalkOptions(follow_external_links=True)})
    assert os.path.join("outside", "far.jpg") in rel(followed, tmp_path / "src")


def test_a_linked_folder_that_holds_the_source_is_not_walked_twice(tmp_path):
    touch(tmp_path / "top.jpg")
    touch(tmp_path / "src" / "a.jpg")
    (tmp_path / "src" / "parent").symlink_to(tmp_path, target_is_directory=True)

    result = walk_sources([tmp_path / "src"], options={
        str(tmp_path / "src"): WalkOptions(follow_external_links=True)})

    assert rel(result, tmp_path / "src") == {
        "a.jpg": "image", os.path.join("parent", "top.jpg"): "image"}


def test_unreadable_folder_reported_in_skipped(tmp_path):
    touch(tmp_path / "ok.jpg")
    locked = tmp_path / "locked"
    touch(locked / "hidden_from_us.jpg")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not make the folder unreadable")
        result = walk_sources([tmp_path])
    finally:
        locked.chmod(stat.S_IRWXU)

    assert rel(result, tmp_path) == {"ok.jpg": "image"}
    assert [s.path for s in result.skipped] == [str(locked)]
    assert "cannot read folder" in result.skipped[0].reason


def test_unreadable_folder_reported_in_skipped_simulated(tmp_path, monkeypatch):
    """The same as above, but independent of running as root: scandir fails for one folder."""
    touch(tmp_path / "ok.jpg")
    locked = tmp_path / "locked"
    touch(locked / "hidden_from_us.jpg")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    result = walk_sources([tmp_path])

    assert rel(result, tmp_path) == {"ok.jpg": "image"}
    assert [s.path for s in result.skipped] == [str(locked)]
    assert "Permission denied" in result.skipped[0].reason


def test_fifo_with_text_suffix_is_not_listed(tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    touch(tmp_path / "real.txt", "x\n")

    result = walk_sources([tmp_path])

    assert [os.path.basename(f.path) for f in result.files] == ["real.txt"]


# -- file names ------------------------------------------------------------------------------


def make_bytes_name(folder: Path, name: bytes) -> bytes:
    path = os.fsencode(folder) + b"/" + name
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    except OSError as error:  # pragma: no cover - filesystems that insist on UTF-8 names
        pytest.skip(f"filesystem refuses non-UTF-8 names: {error}")
    os.write(fd, b"x")
    os.close(fd)
    return path


def test_non_utf8_file_name_is_found_and_keyed_as_valid_utf8(tmp_path):
    raw = make_bytes_name(tmp_path, b"caf\xe9.jpg")

    result = walk_sources([tmp_path])

    [source] = result.files
    assert os.fsencode(source.path) == raw  # the real path still opens the file
    assert os.path.exists(source.path)
    key = source.key
    key.encode("utf-8")  # storable as UTF-8 text
    assert key == str(tmp_path) + "/caf\\xe9.jpg"
    assert key == display_path(source.path)
    assert read_items(source, b"")[0].uri == key


def test_non_utf8_sidecar_names_its_image_in_valid_utf8(tmp_path):
    make_bytes_name(tmp_path, b"caf\xe9.png")
    sidecar = make_bytes_name(tmp_path, b"caf\xe9.txt")
    with open(sidecar, "wb") as handle:
        handle.write(b"an espresso\n")

    files = {f.kind: f for f in walk_sources([tmp_path]).files}

    assert set(files) == {"image", "captions"}
    [item] = items_of(files["captions"])
    assert item.parent_ref == "caf\\xe9.png"
    assert item.text == "an espresso"
    item.uri.encode("utf-8")
    assert item.uri.startswith(files["captions"].key + "#")


def test_unicode_names_kept_as_is(tmp_path):
    name = "façade 猫.jpg"
    touch(tmp_path / name)
    decomposed = "cafe\u0301.png"  # NFD stays NFD
    touch(tmp_path / decomposed)

    result = walk_sources([tmp_path])

    names = {os.path.basename(f.key) for f in result.files}
    assert names == {name, decomposed}
    for source in result.files:
        assert source.key == source.path


def test_display_path():
    assert display_path("/plain/ascii.jpg") == "/plain/ascii.jpg"
    assert display_path("/ü/猫.jpg") == "/ü/猫.jpg"
    escaped = display_path(os.fsdecode(b"/d/caf\xe9 \xff.jpg"))
    assert escaped == "/d/caf\\xe9 \\xff.jpg"
    escaped.encode("utf-8")
    # a backslash in a name is doubled, so no name can be spelled like another's escapes
    assert display_path("/d/a\\xffb.jpg") == "/d/a\\\\xffb.jpg"
    assert display_path(os.fsdecode(b"/d/a\\\xff.jpg")) == "/d/a\\\\\\xff.jpg"


NAME_BYTES = st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))


@settings(max_examples=300, deadline=None)
@given(st.lists(NAME_BYTES, min_size=1, max_size=3))
def test_display_paths_round_trip_and_never_collide(parts):
    """display_path is one-to-one and path_from_display undoes it, for any bytes a name holds."""
    raw = b"/" + b"/".join(parts)
    shown = display_path(os.fsdecode(raw))
    shown.encode("utf-8")  # storable as SQLite text
    assert os.fsencode(path_from_display(shown)) == raw
    twin = os.fsdecode(shown.encode("utf-8"))  # a name spelled like the shown text
    assert display_path(twin) != shown or twin == os.fsdecode(raw)


def test_path_from_display_keeps_a_backslash_that_escapes_nothing():
    """Indexes written before backslashes were doubled hold them single."""
    assert path_from_display("/d/a\\b.jpg") == "/d/a\\b.jpg"
    assert path_from_display("/d/a\\\\b.jpg") == "/d/a\\b.jpg"


# -- read_items ------------------------------------------------------------------------------


def walk_one(tmp_path, name, content) -> SourceFile:
    path = touch(tmp_path / name, content)
    [source] = [f for f in walk_sources([tmp_path]).files if f.path == str(path)]
    return source


def test_read_items_image_is_one_item_not_decoded(tmp_path):
    source = walk_one(tmp_path, "broken.png", b"definitely not a png")

    items = read_items(source, b"definitely not a png")

    assert len(items) == 1
    assert items[0].uri == source.key
    assert items[0].modality == "image"
    assert items[0].text is None and items[0].parent_ref is None


def test_read_items_txt_one_item_per_non_empty_line(tmp_path):
    content = "first line\n\n   \n  second, padded  \r\nthird\n"
    source = walk_one(tmp_path, "corpus.txt", content)

    items = read_items(source, content.encode())

    assert [(i.uri, i.text, i.modality) for i in items] == [
        (f"{source.key}#L1", "first line", "text"),
        (f"{source.key}#L4", "second, padded", "text"),
        (f"{source.key}#L5", "third", "text"),
    ]
    assert all(i.parent_ref is None for i in items)


def test_read_items_txt_invalid_utf8_does_not_raise(tmp_path):
    data = b"ok\n\xff\xfe bad bytes\n"
    source = walk_one(tmp_path, "corpus.txt", data)

    items = read_items(source, data)

    assert [i.uri for i in items] == [f"{source.key}#L1", f"{source.key}#L2"]
    assert items[0].text == "ok"


def test_read_items_jsonl_one_item_per_record(tmp_path):
    lines = [
        json.dumps({"id": "doc-a", "text": "  alpha  ", "lang": "en", "score": 3}),
        "",
        json.dumps({"text": "beta"}),
        json.dumps({"id": "doc-c", "text": "   "}),  # blank text: no item
        json.dumps({"id": 7, "text": "gamma", "tags": ["x", "y"]}),
    ]
    content = "\n".join(lines) + "\n"
    source = walk_one(tmp_path, "records.jsonl", content)

    items = read_items(source, content.encode())

    assert [(i.uri, i.text, i.meta) for i in items] == [
        (f"{source.key}#id=doc-a", "alpha", {"lang": "en", "score": 3}),
        (f"{source.key}#L3", "beta", {}),  # no id: the line number names it
        (f"{source.key}#id=7", "gamma", {"tags": ["x", "y"]}),
    ]
    assert all(i.modality == "text" and i.parent_ref is None for i in items)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "line 2 is not JSON"),
    ('["a list"]', "line 2 is not a JSON object"),
    ('{"id": 1, "body": "no text field"}', "line 2 has no string field 'text'"),
    ('{"text": 42}', "line 2 has no string field 'text'"),
])
def test_read_items_jsonl_bad_line_raises_naming_it(tmp_path, bad_line, message):
    content = '{"text": "fine"}\n' + bad_line + '\n{"text": "also fine"}\n'
    source = walk_one(tmp_path, "records.jsonl", content)

    with pytest.raises(ValueError, match=message):
        read_items(source, content.encode())


def test_read_items_sidecar_captions(tmp_path):
    touch(tmp_path / "dog.jpg")
    content = "a dog on grass\n\n  a brown dog  \n"
    source = walk_one(tmp_path, "dog.txt", content)
    assert source.kind == "captions"

    items = read_items(source, content.encode())

    assert [(i.text, i.parent_ref, i.modality) for i in items] == [
        ("a dog on grass", "dog.jpg", "text"), ("a brown dog", "dog.jpg", "text")]
    assert [i.uri for i in items] == [f"{source.key}#dog.jpg#0", f"{source.key}#dog.jpg#1"]


def test_sidecar_uris_stable_when_other_images_captions_change(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    touch(tmp_path / "a.txt", "a one\na two\n")
    touch(tmp_path / "b.txt", "b one\n")
    before = {f.key: items_of(f) for f in walk_sources([tmp_path]).files if f.kind == "captions"}

    touch(tmp_path / "b.txt", "b zero\n\nb one\nb two\n")
    after = {f.key: items_of(f) for f in walk_sources([tmp_path]).files if f.kind == "captions"}

    a_key = str(tmp_path / "a.txt")
    assert [(i.uri, i.text, i.parent_ref) for i in after[a_key]] == \
        [(i.uri, i.text, i.parent_ref) for i in before[a_key]]
    assert {i.parent_ref for i in after[str(tmp_path / "b.txt")]} == {"b.jpg"}


def test_captions_file_uris_stable_when_other_images_captions_change(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    before_text = "a.jpg#0\tA one\nb.jpg#0\tB one\na.jpg#1\tA two\nb.jpg#1\tB two\n"
    after_text = "b.jpg#0\tB new\nb.jpg#5\tB extra\na.jpg#0\tA one\n\nb.jpg#1\tB two\na.jpg#1\tA two\n"
    source = walk_one(tmp_path, "captions.tsv", before_text)
    assert source.kind == "captions"

    def a_items(text):
        return {(i.uri, i.text) for i in read_items(source, text.encode()) if i.parent_ref == "a.jpg"}

    assert a_items(before_text) == a_items(after_text) == {
        (f"{source.key}#a.jpg#0", "A one"), (f"{source.key}#a.jpg#1", "A two")}
    uris = [i.uri for i in read_items(source, after_text.encode())]
    assert len(uris) == len(set(uris))


def test_read_items_bad_captions_file_raises_value_error(tmp_path):
    content = "a.jpg#0 no tab here\n"
    source = walk_one(tmp_path, "captions.tsv", content)

    with pytest.raises(ValueError, match="line 1"):
        read_items(source, content.encode())


# -- awkward input ------------------------------------------------------------------------------------


def test_jsonl_uris_are_unique(tmp_path):
    content = '{"id": 2, "text": "a"}\n{"text": "b"}\n'
    source = walk_one(tmp_path, "records.jsonl", content)
    uris = [i.uri for i in read_items(source, content.encode())]
    assert uris == [f"{source.key}#id=2", f"{source.key}#L2"]


def test_jsonl_repeated_id_is_refused(tmp_path):
    content = '{"id": 2, "text": "a"}\n{"id": "2", "text": "c"}\n'
    source = walk_one(tmp_path, "records.jsonl", content)
    with pytest.raises(ValueError, match="line 2 repeats the id"):
        read_items(source, content.encode())


def test_txt_line_numbers_follow_newlines_only(tmp_path):
    content = "page one\x0cstill line one\nline two\n"
    source = walk_one(tmp_path, "corpus.txt", content)

    items = read_items(source, content.encode())

    assert [i.uri for i in items] == [f"{source.key}#L1", f"{source.key}#L2"]


def test_jsonl_record_with_raw_line_separator_parses(tmp_path):
    content = json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n"
    source = walk_one(tmp_path, "records.jsonl", content)

    items = read_items(source, content.encode())

    assert [i.text for i in items] == ["one\u2028two"]
