"""Search-result formatting and the /retrieve wire format (ALGORITHM.md §6, golden behaviour §9.14)."""

import json

import pytest

from atpo_jax.tools import (
    NO_RESULTS_TEXT,
    MalformedResponseError,
    Passage,
    format_observation,
    format_passages,
    parse_retrieve_response,
    render_retrieve_response,
)

# Captured from the reference server's response code (rag_server/retrieval_server.py): corpus rows are
# wiki-18 records, with scores each hit is {"document": row, "score": float}.
REFERENCE_WITH_SCORES = """{"result": [[
  {"document": {"id": "3964", "contents": "\\"Paris\\"\\nParis is the capital of France."}, "score": 0.8712},
  {"document": {"id": "17", "contents": "\\"France\\"\\nFrance is a country in Europe."}, "score": 0.8123}
 ], [
  {"document": {"id": "5", "contents": "\\"Rome\\"\\nRome is the capital of Italy."}, "score": 0.79}
 ]]}"""
REFERENCE_WITHOUT_SCORES = """{"result": [[
  {"id": "3964", "contents": "\\"Paris\\"\\nParis is the capital of France."},
  {"id": "17", "contents": "\\"France\\"\\nFrance is a country in Europe."}
 ], [
  {"id": "5", "contents": "\\"Rome\\"\\nRome is the capital of Italy."}
 ]]}"""


def test_golden_three_passages_one_duplicate():
    # §9.14: three retrieved passages, one a duplicate -> two pages; the duplicate is compared stripped.
    hits = [
        Passage({"id": "1", "contents": '"A"\nAlpha text.'}),
        Passage({"id": "2", "contents": '  "A"\nAlpha text.\n'}),
        Passage({"id": "3", "contents": '"B"\nBeta text.'}),
    ]
    assert format_passages(hits) == 'Page 1: "A"\nAlpha text.\nPage 2: "B"\nBeta text.'


def test_each_passage_cut_to_max_chars_after_dedupe():
    long_a = "x" * 1500
    long_b = "x" * 1000 + "y"  # same first 1000 chars as long_a, but a different passage
    text = format_passages([long_a, long_b])
    lines = text.split("\n")
    assert lines == ["Page 1: " + "x" * 1000, "Page 2: " + "x" * 1000]


def test_max_results_and_empty_passages():
    passages = ["", "   ", *[f"p{i}" for i in range(12)]]
    text = format_passages(passages)
    assert text.split("\n") == [f"Page {i + 1}: p{i}" for i in range(10)]
    assert format_passages(["a", "b", "c"], max_results=2, max_chars=1) == "Page 1: a\nPage 2: b"


def test_no_results_text():
    assert format_passages([]) == "No search results found."
    assert format_passages(["", "  \n"]) == NO_RESULTS_TEXT


def test_bad_limits_rejected():
    with pytest.raises(ValueError, match="max_results"):
        format_passages(["a"], max_results=0)


def test_observation_wrapper_is_exact():
    assert format_observation("Page 1: x") == " <result>\nPage 1: x\n</result>"


def test_parse_reference_response_with_scores():
    parsed = parse_retrieve_response(json.loads(REFERENCE_WITH_SCORES), 2)
    assert [[p.id for p in group] for group in parsed] == [["3964", "17"], ["5"]]
    assert [[p.score for p in group] for group in parsed] == [[0.8712, 0.8123], [0.79]]
    assert parsed[0][0].contents == '"Paris"\nParis is the capital of France.'
    assert format_passages(parsed[0]) == (
        'Page 1: "Paris"\nParis is the capital of France.\n'
        'Page 2: "France"\nFrance is a country in Europe.'
    )


def test_parse_reference_response_without_scores():
    parsed = parse_retrieve_response(json.loads(REFERENCE_WITHOUT_SCORES), 2)
    assert [[p.id for p in group] for group in parsed] == [["3964", "17"], ["5"]]
    assert all(p.score is None for group in parsed for p in group)
    assert parsed[1][0].contents == '"Rome"\nRome is the capital of Italy.'


def test_render_is_the_inverse_of_parse():
    for body, scores in ((REFERENCE_WITH_SCORES, True), (REFERENCE_WITHOUT_SCORES, False)):
        payload = json.loads(body)
        parsed = parse_retrieve_response(payload, 2)
        assert render_retrieve_response(parsed, return_scores=scores) == payload


@pytest.mark.parametrize(
    "payload, match",
    [
        ([], "'result' list"),
        ({"results": []}, "'result' list"),
        ({"result": [[]]}, "1 entries for 2 queries"),
        ({"result": [{}, []]}, r"result\[0\] must be a list"),
        ({"result": [[{"id": "1"}], []]}, "no string 'contents'"),
        ({"result": [["text"], []]}, "expected a corpus row"),
        ({"result": [[{"document": {"contents": "x"}, "score": "high"}], []]}, "'score' must be"),
    ],
)
def test_malformed_responses_are_rejected(payload, match):
    with pytest.raises(MalformedResponseError, match=match):
        parse_retrieve_response(payload, 2)
