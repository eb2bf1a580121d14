"""Tests for `retrieval.media.captions`: every caption format, its errors, and a fuzz property."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retrieval.media.captions import CAPTION_FILE_NAMES, CaptionFormatError, read_caption_pairs


def test_caption_format_error_is_a_value_error():
    assert issubclass(CaptionFormatError, ValueError)


def test_caption_file_names():
    assert set(CAPTION_FILE_NAMES) == {"captions.tsv", "captions.csv", "captions.jsonl", "captions.json"}


# -- Flickr token TSV ------------------------------------------------------------------------


def test_flickr_token_tsv():
    content = (
        "1000268201_693b08cb0e.jpg#0\tA child in a pink dress .\n"
        "1000268201_693b08cb0e.jpg#1\t  A girl going into a wooden building .  \n"
        "\n"
        "1001773457_577c3a7d70.jpg#12\tTwo dogs\tplaying\n"
        "no_suffix.png\tplain name\n"
        "odd#name.jpg#3\tonly the last #n goes\n"
    )

    pairs = read_caption_pairs("captions.tsv", content)

    assert pairs == [
        ("1000268201_693b08cb0e.jpg", "A child in a pink dress ."),
        ("1000268201_693b08cb0e.jpg", "A girl going into a wooden building ."),
        ("1001773457_577c3a7d70.jpg", "Two dogs\tplaying"),  # only the first tab splits
        ("no_suffix.png", "plain name"),
        ("odd#name.jpg", "only the last #n goes"),
    ]


@pytest.mark.parametrize("path", ["Flickr8k.token.txt", "results.token", "captions.TSV", "noext",
                                  "/some.dir/captions"])
def test_other_suffixes_read_as_token_tsv(path):
    assert read_caption_pairs(path, "a.jpg#0\tcap\r\nb.jpg#1\tother\r\n") == [
        ("a.jpg", "cap"), ("b.jpg", "other")]


def test_token_line_without_tab_raises_with_line_number():
    content = "a.jpg#0\tfine\n\n   \nb.jpg#0 a space is not a tab\nc.jpg#0\tfine\n"

    with pytest.raises(CaptionFormatError, match=r"line 4\b"):
        read_caption_pairs("captions.tsv", content)


def test_empty_or_blank_token_file_has_no_pairs():
    assert read_caption_pairs("captions.tsv", "") == []
    assert read_caption_pairs("captions.tsv", "\n  \n\t\n") == []


# -- CSV -------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_col", ["image", "file", "filename", "file_name", "path", "image_path",
                                       "IMAGE", "File_Name", " Path "])
@pytest.mark.parametrize("caption_col", ["caption", "text", "Caption", "TEXT"])
def test_csv_accepted_column_names(image_col, caption_col):
    content = (f"id,{image_col},{caption_col},extra\n"
               "1,a.jpg,  A dog  ,x\n"
               '2,b c.jpg,"A cat, sitting",y\n'
               '3,d.jpg,"two\nlines",z\n')

    pairs = read_caption_pairs("captions.csv", content)

    assert pairs == [("a.jpg", "A dog"), ("b c.jpg", "A cat, sitting"), ("d.jpg", "two\nlines")]


def test_csv_short_rows_give_empty_strings():
    assert read_caption_pairs("x.CSV", "image,caption\na.jpg\n") == [("a.jpg", "")]


def test_csv_empty_file_has_no_pairs():
    assert read_caption_pairs("captions.csv", "") == []


@pytest.mark.parametrize("header", ["image,description", "image,captions", "name,caption", "a,b"])
def test_csv_without_required_columns_raises_clear_message(header):
    content = f"{header}\na.jpg,something\n"

    with pytest.raises(CaptionFormatError) as error:
        read_caption_pairs("captions.csv", content)

    message = str(error.value)
    assert "header" in message
    assert "caption" in message and "image" in message


# -- JSONL -----------------------------------------------------------------------------------


def test_jsonl_records():
    content = "\n".join([
        json.dumps({"image": "a.jpg", "caption": "  A dog  "}),
        "",
        json.dumps({"file_name": "b.jpg", "text": "A cat", "extra": 1}),
        json.dumps({"Path": "c.png", "Caption": "Upper-case keys"}),
    ])

    assert read_caption_pairs("captions.jsonl", content) == [
        ("a.jpg", "A dog"), ("b.jpg", "A cat"), ("c.png", "Upper-case keys")]


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"line 3 is not JSON"),
    ('["a.jpg", "a list"]', r"line 3 is not a JSON object"),
    ('{"image": "a.jpg"}', r"line 3 needs an image field .* caption field"),
    ('{"caption": "no image"}', r"line 3 needs an image field"),
])
def test_jsonl_bad_line_raises_naming_it(bad, message):
    content = json.dumps({"image": "a.jpg", "caption": "ok"}) + "\n\n" + bad + "\n"

    with pytest.raises(CaptionFormatError, match=message):
        read_caption_pairs("captions.jsonl", content)


# -- COCO JSON -------------------------------------------------------------------------------


def coco(images, annotations) -> str:
    return json.dumps({"info": {}, "images": images, "annotations": annotations})


def test_coco_captions_json():
    content = coco(
        [{"id": 1, "file_name": "000001.jpg", "width": 4}, {"id": 2, "file_name": "000002.jpg"}],
        [{"image_id": 2, "id": 10, "caption": " Two "}, {"image_id": 1, "id": 11, "caption": "One"},
         {"image_id": 2, "id": 12, "caption": "Two again"}])

    assert read_caption_pairs("captions_train2017.json", content) == [
        ("000002.jpg", "Two"), ("000001.jpg", "One"), ("000002.jpg", "Two again")]


@pytest.mark.parametrize("content, missing", [
    (json.dumps({"annotations": []}), "images"),
    (json.dumps({"images": []}), "annotations"),
    (coco([{"id": 1}], []), "file_name"),
    (coco([{"file_name": "a.jpg"}], []), "id"),
    (coco([{"id": 1, "file_name": "a.jpg"}], [{"caption": "x"}]), "image_id"),
    (coco([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1}]), "caption"),
    (coco([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 2, "caption": "x"}]), "2"),
])
def test_coco_missing_keys_raise(content, missing):
    with pytest.raises(CaptionFormatError, match="not COCO captions JSON") as error:
        read_caption_pairs("captions.json", content)
    assert missing in str(error.value)


@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "null", '{"images": 3, "annotations": []}',
                                     '{"images": ["a.jpg"], "annotations": []}'])
def test_coco_wrong_shapes_raise(content):
    with pytest.raises(CaptionFormatError, match="not COCO captions JSON"):
        read_caption_pairs("captions.json", content)


def test_coco_not_json_raises():
    with pytest.raises(CaptionFormatError, match="not JSON"):
        read_caption_pairs("captions.json", '{"images": [\n oops')


# -- sidecar ---------------------------------------------------------------------------------


def test_sidecar_one_pair_per_line():
    content = "A dog on grass.\n  Another\tline, with a tab  \n\n#0 not a token\n"

    pairs = read_caption_pairs("/photos/dog.txt", content, sidecar_image="dog.jpg")

    assert {image for image, _ in pairs} == {"dog.jpg"}
    assert [caption for _, caption in pairs if caption] == [
        "A dog on grass.", "Another\tline, with a tab", "#0 not a token"]


def test_sidecar_mode_wins_over_the_suffix():
    content = '{"image": "x.jpg", "caption": "y"}\n'
    assert read_caption_pairs("dog.jsonl", content, sidecar_image="dog.jpg") == [
        ("dog.jpg", '{"image": "x.jpg", "caption": "y"}')]


# -- fuzz: parse or a format error, nothing else ---------------------------------------------

FRAGMENTS = ["\t", "#", "#0", ",", '"', "\n", "\r\n", "{", "}", "[", "]", ":", "null", "1",
             "image", "caption", "text", "file_name", "images", "annotations", "image_id", "id",
             "image,caption\n", "a.jpg#0\tcap\n", '{"image": "a.jpg", "caption": "c"}\n',
             '{"image": 1, "caption": [null]}\n', "\u2028", "\x85", "\x00", "\ufeff"]

fuzzy_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=30).map("".join),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["images", "annotations", "id", "file_name", "image_id", "caption", "image",
                         "text"]) | st.text(max_size=4), children, max_size=5),
    max_leaves=12,
)

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parses_or_format_error(path: str, content: str, sidecar_image: str | None = None) -> None:
    try:
        pairs = read_caption_pairs(path, content, sidecar_image)
    except (CaptionFormatError, ValueError):
        return
    assert isinstance(pairs, list)
    for pair in pairs:
        assert isinstance(pair, tuple) and len(pair) == 2
        assert isinstance(pair[1], str)


@FUZZ
@given(content=fuzzy_text, path=st.sampled_from(["captions.tsv", "x.token", "captions.jsonl",
                                                 "captions.json", "no_suffix"]))
def test_fuzz_any_text_parses_or_raises_format_error(path, content):
    parses_or_format_error(path, content)


@FUZZ
@given(content=fuzzy_text)
def test_fuzz_csv_parses_or_raises_format_error(content):
    parses_or_format_error("captions.csv", content)


@FUZZ
@given(content=fuzzy_text)
def test_fuzz_sidecar_never_raises(content):
    pairs = read_caption_pairs("a.txt", content, sidecar_image="a.jpg")
    lines = [line.strip() for line in content.removeprefix("\ufeff").split("\n")]
    assert [caption for _, caption in pairs] == [line for line in lines if line]
    assert all(image == "a.jpg" for image, _ in pairs)


@FUZZ
@given(value=json_values, path=st.sampled_from(["captions.json", "captions.jsonl"]))
def test_fuzz_json_shapes_parse_or_raise_format_error(path, value):
    parses_or_format_error(path, json.dumps(value))


@FUZZ
@given(records=st.lists(json_values, max_size=5))
def test_fuzz_jsonl_records_parse_or_raise_format_error(records):
    parses_or_format_error("captions.jsonl", "\n".join(json.dumps(r) for r in records))


# -- awkward input ------------------------------------------------------------------------------------


def test_csv_stray_carriage_return_raises_format_error():
    try:
        read_caption_pairs("captions.csv", "image,caption\na.jpg,one\rtwo\n")
    except (CaptionFormatError, ValueError):
        pass
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"{type(error).__module__}.{type(error).__name__}: {error}") from error


def test_csv_huge_field_raises_format_error():
    try:
        read_caption_pairs("captions.csv", "image,caption\na.jpg," + "x" * 200_000 + "\n")
    except (CaptionFormatError, ValueError):
        pass
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"{type(error).__module__}.{type(error).__name__}: {error}") from error


@pytest.mark.parametrize("path", ["captions.json", "captions.jsonl"])
def test_deeply_nested_json_raises_format_error(path):
    try:
        read_caption_pairs(path, "[" * 100_000)
    except (CaptionFormatError, ValueError):
        pass
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"{type(error).__name__}") from None


def test_csv_with_utf8_bom():
    assert read_caption_pairs("captions.csv", "\ufeffimage,caption\na.jpg,A dog\n") == [("a.jpg", "A dog")]


def test_csv_header_only_without_caption_column_raises():
    with pytest.raises(CaptionFormatError):
        read_caption_pairs("captions.csv", "image,description\n")


def test_jsonl_raw_line_separator_in_caption():
    content = json.dumps({"image": "a.jpg", "caption": "one\u2028two"}, ensure_ascii=False)
    assert read_caption_pairs("captions.jsonl", content) == [("a.jpg", "one\u2028two")]


@pytest.mark.parametrize("path, content", [
    ("captions.jsonl", '{"image": "a.jpg", "caption": null}'),
    ("captions.jsonl", '{"image": null, "caption": "x"}'),
    ("captions.json", coco([{"id": 1, "file_name": "a.jpg"}], [{"image_id": 1, "caption": None}])),
    ("captions.json", coco([{"id": 1, "file_name": None}], [{"image_id": 1, "caption": "x"}])),
])
def test_null_fields_are_not_turned_into_none_text(path, content):
    try:
        pairs = read_caption_pairs(path, content)
    except CaptionFormatError:
        return
    for image, caption in pairs:
        assert isinstance(image, str) and image != "None"
        assert caption != "None"


def test_token_name_with_hash_but_no_suffix():
    assert read_caption_pairs("captions.tsv", "photo#1.jpg\tcap\n") == [("photo#1.jpg", "cap")]
