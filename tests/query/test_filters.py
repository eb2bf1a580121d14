"""The filter language (CLI --filter, API filter=) and the raw SQL `where`, which may read
item_view only, for a limited time."""

from __future__ import annotations

import os
import sqlite3
import threading

import pytest
from click.testing import CliRunner

from retrieval import Index
from retrieval.cli import cli
from retrieval.core.errors import UsageError
from retrieval.query.filters import FilterError, parse_filter


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, tiny_model):
    """Six images in beach/ and city/ (img0 with two captions, img3 one), notes; a few sizes,
    mtimes and a metadata field set by hand."""
    from support import write_image

    root = tmp_path_factory.mktemp("filtered") / "photos"
    for number in range(6):
        folder = root / ("beach" if number < 3 else "city")
        write_image(folder / f"img{number}.jpg", (40 * number, 200 - 30 * number, 90),
                    size=(48 + 60 * number, 40))
        os.utime(folder / f"img{number}.jpg", (0, 1_700_000_000 + number * 86_400))
    (root / "beach" / "img0.txt").write_text("a red picture\nthe First image\n")
    (root / "captions.tsv").write_text("img3.jpg#0\ta yellow picture\n")
    (root / "notes.txt").write_text("a note about cats\n\na note about dogs\n")
    index_dir = root.parent / "index"
    with Index.open(index_dir, model=tiny_model, create=True) as index:
        index.add(root)
    with sqlite3.connect(index_dir / "meta.sqlite") as conn:
        conn.execute("""UPDATE items SET meta = '{"camera": "Canon", "iso": 400}'
                        WHERE uri LIKE '%img1.jpg'""")
        conn.execute("""UPDATE items SET meta = '{"camera": "Nikon", "iso": "1600"}'
                        WHERE uri LIKE '%img4.jpg'""")
    return root, index_dir


def names(index_dir, **query) -> set[str]:
    with Index.open(index_dir, readonly=True) as index:
        return {os.path.basename(hit.path) for hit in index.search("picture", k=50, **query)}


@pytest.mark.parametrize("text, expected", [
    ("under:beach", {"img0.jpg", "img1.jpg", "img2.jpg"}),
    ("-under:beach", {"img3.jpg", "img4.jpg", "img5.jpg"}),
    ('path:"*/city/img[34].jpg"', {"img3.jpg", "img4.jpg"}),
    ("path:img5.jpg", {"img5.jpg"}),
    ("text:first", {"img0.jpg"}),
    ('text:"YELLOW picture"', {"img3.jpg"}),
    ("-text:picture", {"img1.jpg", "img2.jpg", "img4.jpg", "img5.jpg"}),
    ("mtime=2023-11-15", {"img1.jpg"}),  # 1_700_086_400 is 2023-11-15 22:13 UTC: the whole day
    ("mtime>2023-11-15 mtime<=2023-11-17", {"img2.jpg", "img3.jpg"}),
    ("mtime>=2023-11-16T22:13:20Z", {"img2.jpg", "img3.jpg", "img4.jpg", "img5.jpg"}),
    ("meta.camera=Canon", {"img1.jpg"}),
    ("meta.iso>=1000", {"img4.jpg"}),  # a number stored as text still compares as a number
    ("meta.camera!=Canon MODALITY:image", {"img4.jpg"}),  # a missing field is neither = nor !=
])
def test_filters_choose_the_items_they_name(filtered, text, expected):
    assert names(filtered[1], filter=text) == expected


def test_size_filters_count_bytes_in_powers_of_1000(filtered):
    root, index_dir = filtered
    sizes = {p.name: p.stat().st_size for p in root.rglob("*.jpg")}
    middle = sorted(sizes.values())[3]
    assert names(index_dir, filter=f"size>={middle}B") == {n for n, s in sizes.items() if s >= middle}
    assert names(index_dir, filter=f"size<{middle / 1000}KB") == {n for n, s in sizes.items() if s < middle}
    assert names(index_dir, filter="size>1GB") == set()


def test_modality_filter_and_several_modalities(filtered):
    with Index.open(filtered[1], readonly=True) as index:
        hits = index.search("cats", target="text", k=50, filter="modality:image,text -text:picture")
    assert {hit.text for hit in hits} == {"a note about cats", "a note about dogs", "the First image"}


@pytest.mark.parametrize("text, culprit, says", [
    ("size>>3", "size>>3", "expected a number with an optional unit"),
    ("size>3TB", "size>3TB", "(B, KB, MB, GB)"),
    ("modality:sound", "modality:sound", "image, text, audio, video"),
    ("colour:red", "colour:red", "fields are modality, path, under, size, mtime, text, meta.KEY"),
    ("mtime>yesterday", "mtime>yesterday", "ISO date"),
    ('text:"open', 'text:"open', "double quote is not closed"),
    ("meta.a'b=1", "meta.a'b=1", "metadata key"),
    ("text:", "text:", "value is missing"),
])
def test_a_bad_filter_names_its_bad_term(text, culprit, says):
    with pytest.raises(FilterError) as error:
        parse_filter(text)
    assert f"filter term {culprit!r}" in str(error.value) or culprit in str(error.value)
    assert says in str(error.value)
    assert isinstance(error.value, UsageError)


def test_the_cli_filters_and_exits_2_on_a_bad_filter(filtered):
    runner = CliRunner()
    result = runner.invoke(cli, ["search", "picture", "--index", str(filtered[1]), "--json",
                                 "--filter", "under:city -text:yellow"])
    assert result.exit_code == 0, result.output
    assert {os.path.basename(hit["path"]) for hit in __import__("json").loads(result.stdout)} == {
        "img4.jpg", "img5.jpg"}
    result = runner.invoke(cli, ["search", "picture", "--index", str(filtered[1]), "--filter", "size>>3"])
    assert result.exit_code == 2
    assert "filter term 'size>>3'" in result.stderr and "Traceback" not in result.output


# -- raw SQL -------------------------------------------------------------------------------------

def test_raw_where_cannot_escape_the_modality_or_read_other_tables(filtered):
    index_dir = filtered[1]
    with Index.open(index_dir, readonly=True) as index:
        with pytest.raises(UsageError, match="syntax error"):
            index.search("picture", k=50, target="image", where="1) OR (1")
        with pytest.raises(UsageError, match=r"^`where` '1; SELECT 1': only one SQL expression is "
                                             r"allowed \(no ';'\); columns are "):
            index.search("picture", where="1; SELECT 1")
        hits = index.search("picture", k=50, target="image", where="0 UNION SELECT id FROM item_view")
        assert len(hits) == 6 and {hit.modality for hit in hits} == {"image"}
        for sneaky in ("id IN (SELECT item_id FROM vectors)", "(SELECT max(root) FROM files) > ''",
                       "id IN (SELECT value FROM info)"):
            with pytest.raises(UsageError, match="may only read item_view"):
                index.search("picture", where=sneaky)
        with pytest.raises(UsageError, match="no such column"):
            index.search("picture", where="colour = 'red'")
        assert {os.path.basename(h.path) for h in index.search("picture", k=50, where="path LIKE '%img2%'")} \
            == {"img2.jpg"}


def test_raw_where_runs_out_of_time_or_room_and_says_so(filtered):
    """A filter that would never end, or would build a 200 MB blob per row, is stopped; the
    index stays usable from another thread meanwhile."""
    index_dir = filtered[1]
    forever = "id IN (WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n)"
    with Index.open(index_dir, readonly=True) as index:
        with pytest.raises(UsageError, match="time limit of 0.2 s"):
            index.search("picture", where=forever, where_timeout=0.2)
        with pytest.raises(UsageError, match="too big"):
            index.search("picture", where="length(randomblob(200000000)) > 0")
        found = []
        other = threading.Thread(target=lambda: found.append(index.search("picture", k=2)))
        other.start()
        with pytest.raises(UsageError, match="time limit"):
            index.search("picture", where=forever, where_timeout=1)
        other.join()
        assert len(found[0]) == 2


def test_the_cli_where_timeout(filtered):
    result = CliRunner().invoke(cli, [
        "search", "picture", "--index", str(filtered[1]), "--where-timeout", "0.1", "--where",
        "id IN (WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT x FROM n)"])
    assert result.exit_code == 2
    assert "time limit of 0.1 s" in result.stderr
