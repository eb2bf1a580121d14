"""The one reader of CSV/JSONL/TSV rows: each format read the same way, and a bad row named by
its file and line, whichever reader (pairs, manifests, queries) asked."""

from __future__ import annotations

import pytest

from retrieval.core.errors import UsageError
from retrieval.media.pairs import read_video_pairs
from retrieval.media.tables import parse_rows, read_table
from retrieval.query.entries import read_entry_queries, resolve_grouping
from retrieval.train.audio import read_audio_pairs


def test_each_format_gives_rows_with_their_line_numbers():
    csv_rows = parse_rows('query,entry\n"two\nlines",a\n\nb,c\n', "csv")
    assert [(row.line, row.text("query"), row.text("entry")) for row in csv_rows] == [
        (3, "two\nlines", "a"), (5, "b", "c")]
    jsonl_rows = parse_rows('{"query": "x", "n": 3}\n\n{"query": " y "}\n', "jsonl")
    assert [(row.line, row.text("query"), row.text("n")) for row in jsonl_rows] == [
        (1, "x", "3"), (3, "y", "")]
    tsv_rows = parse_rows("a dog\tdog.jpg\tand\ta tab\nalone\n", "tsv", ("query", "entry"))
    assert [(row.line, row.fields) for row in tsv_rows] == [
        (1, {"query": "a dog", "entry": "dog.jpg\tand\ta tab"}), (2, {"query": "alone", "entry": ""})]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 2 is not JSON"),
    ('["a", "list"]', "line 2 is not a JSON object"),
])
def test_a_line_that_does_not_parse_is_named_with_its_file(tmp_path, line, problem):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"fine": 1}\n' + line + "\n")
    with pytest.raises(UsageError, match=f"^rows file {path}: {problem}"):
        read_table(path, "rows file")
    with pytest.raises(UsageError, match=f"^training pairs {path}: {problem}"):
        read_audio_pairs(path)


def test_a_row_missing_a_field_is_named_by_file_and_line(tmp_path):
    videos = tmp_path / "videos.csv"
    videos.write_text("video,caption\na.mp4,a dog\nb.mp4,\n")
    with pytest.raises(UsageError, match=f"^video pairs {videos}, line 3: needs video and caption"):
        read_video_pairs(videos)
    queries = tmp_path / "queries.tsv"
    queries.write_text("a dog\tdog\na cat\n")
    with pytest.raises(UsageError, match=f"^queries file {queries}, line 2: needs a query and an entry"):
        read_entry_queries(queries)
    manifest = tmp_path / "entries.csv"
    manifest.write_text("entry,path\nshoe,shoe.jpg\nshoe\n")
    with pytest.raises(UsageError, match=f"^entries manifest {manifest}, line 3: needs an entry and a path"):
        resolve_grouping(str(manifest))


def test_a_quoted_field_may_span_lines(tmp_path):
    """Queries and manifests once split the file into lines before the CSV reader saw it, which
    cut a quoted field in two."""
    queries = tmp_path / "queries.csv"
    queries.write_text('query,entry\n"a dog\non grass",dog\n')
    [(query, entries)] = read_entry_queries(queries)
    assert query == "a dog\non grass" and len(entries) == 1


def test_a_file_that_is_not_utf8_is_read_not_a_traceback(tmp_path):
    """A queries file with a stray Latin-1 byte once raised UnicodeDecodeError past the CLI."""
    queries = tmp_path / "queries.tsv"
    queries.write_bytes(b"caf\xe9\tcafe\n")
    [(query, _)] = read_entry_queries(queries)
    assert query == "caf\ufffd"
