"""Combined query parsing: terms, weights, negation, image and audio paths."""

from __future__ import annotations

import pytest
from support import write_image

from retrieval.core.errors import QueryWarning, UsageError
from retrieval.query.parse import QueryTerm, parse_query


def test_terms_weights_and_negation():
    assert parse_query("cat + 2:dog - grass") == [
        QueryTerm(1.0, text="cat"), QueryTerm(2.0, text="dog"), QueryTerm(-1.0, text="grass")]
    assert parse_query("0.5: red car -   blue") == [
        QueryTerm(0.5, text="red car"), QueryTerm(-1.0, text="blue")]
    assert parse_query(".25:x") == [QueryTerm(0.25, text="x")]


def test_signs_inside_words_are_text():
    assert parse_query("a t-shirt") == [QueryTerm(1.0, text="a t-shirt")]
    assert parse_query("c++ code") == [QueryTerm(1.0, text="c++ code")]
    assert parse_query("10:30 meeting") == [QueryTerm(10.0, text="30 meeting")]


def test_image_paths_are_image_terms(tmp_path):
    image = write_image(tmp_path / "q.png", (1, 2, 3))
    assert parse_query(f"{image} + 2:snow") == [
        QueryTerm(1.0, image=str(image)), QueryTerm(2.0, text="snow")]
    with pytest.warns(QueryWarning, match="missing.png"):
        assert parse_query(f"{tmp_path}/missing.png") == [
            QueryTerm(1.0, text=f"{tmp_path}/missing.png")]


def test_audio_paths_are_audio_terms(tmp_path):
    sound = tmp_path / "bark.flac"
    sound.write_bytes(b"fLaC")  # parsing looks at the name and existence only
    with pytest.warns(QueryWarning, match="gone.mp3"):
        terms = parse_query(f"a dog + 0.5:{sound} - {tmp_path}/gone.mp3")
    assert terms == [QueryTerm(1.0, text="a dog"), QueryTerm(0.5, audio=str(sound)),
                     QueryTerm(-1.0, text=f"{tmp_path}/gone.mp3")]
    assert [t.modality for t in terms] == ["text", "audio", "text"]


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_an_empty_query_is_a_usage_error(query):
    with pytest.raises(UsageError, match="empty"):
        parse_query(query)


def test_a_dangling_sign_stays_text():
    """Only ' + ' and ' - ' between two terms combine; a sign at either end is text."""
    assert parse_query("cat + ") == [QueryTerm(1.0, text="cat +")]
    assert parse_query("- dog") == [QueryTerm(1.0, text="- dog")]


@pytest.mark.parametrize("term", ["holiday/beach", "beach.jpg", "~/clips/surf.mp4", "./notes.txt"])
def test_a_term_that_looks_like_a_file_but_is_none_is_text_with_a_warning(term):
    """Such a term once became text without a word, so a typo in a path searched for its words."""
    with pytest.warns(QueryWarning, match="searched as text") as caught:
        assert parse_query(f"{term} + dog") == [QueryTerm(1.0, text=term), QueryTerm(1.0, text="dog")]
    assert len(caught) == 1 and term in str(caught[0].message)


@pytest.mark.parametrize("query", ["a dog in the park", "a t-shirt", "10:30 meeting", "1/2 cup of tea",
                                   "- dog"])
def test_plain_text_gives_no_warning(query, recwarn):
    parse_query(query)
    assert not [w for w in recwarn if issubclass(w.category, QueryWarning)]
