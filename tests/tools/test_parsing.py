"""Turn decisions (ALGORITHM.md §1.3; golden behaviour §9.15) and current-turn-only parsing (DESIGN.md §9)."""

import pytest

from atpo_jax.tools import (
    CALL_LIMIT_WARNING,
    TurnAction,
    decide_turn,
    extract_tool_input,
    stop_tag,
)

TAGS = ("search",)


def test_tool_call_extracts_stripped_query_and_counts_it():
    d = decide_turn(
        "<think> need it </think> <search>  capital of France \n</search>",
        "</search>",
        tool_tags=TAGS,
        calls_made=2,
    )
    assert d.action is TurnAction.CALL
    assert (d.tag, d.query, d.calls_made) == ("search", "capital of France", 3)
    assert not d.is_leaf and d.insert_text is None and not d.append_eos


def test_last_opening_tag_in_the_turn_wins():
    turn = "<think>a</think> <search> first <search> second </search>"
    assert decide_turn(turn, "</search>", tool_tags=TAGS, calls_made=0).query == "second"


def test_opening_tag_only_searched_in_the_current_turn():
    # The reference would reach back into earlier text (ALGORITHM.md §8 item 10); we see only this turn.
    turn = " <think> go on </think> Paris </search>"
    d = decide_turn(turn, "</search>", tool_tags=TAGS, calls_made=1)
    assert d.action is TurnAction.EMPTY_CALL
    assert (d.query, d.calls_made, d.append_eos, d.is_leaf) == ("", 2, True, True)


def test_empty_call_appends_eos_and_ends_the_chain():
    d = decide_turn(
        "<think>x</think><search>   </search>", "</search>", tool_tags=TAGS, calls_made=0
    )
    assert d.action is TurnAction.EMPTY_CALL
    assert d.append_eos and d.is_leaf and d.calls_made == 1


def test_seventh_call_is_not_executed_and_warns():
    # §9.15: with call_limit 6 the 7th call gets a mask-0 warning and generation continues in the node.
    d = decide_turn("<search> q </search>", "</search>", tool_tags=TAGS, calls_made=6, call_limit=6)
    assert d.action is TurnAction.CALL_LIMIT
    assert d.insert_text == CALL_LIMIT_WARNING
    assert d.calls_made == 6 and not d.is_leaf and d.query is None
    d6 = decide_turn(
        "<search> q </search>", "</search>", tool_tags=TAGS, calls_made=5, call_limit=6
    )
    assert d6.action is TurnAction.CALL and d6.calls_made == 6


def test_warning_sentence_shape():
    assert CALL_LIMIT_WARNING.startswith(" ")
    assert CALL_LIMIT_WARNING.endswith("\n\n")
    assert "limit" in CALL_LIMIT_WARNING and "final answer" in CALL_LIMIT_WARNING


@pytest.mark.parametrize("stop", [None, "<|im_end|>", "</python>", "</answer>"])
def test_eos_or_unregistered_tag_finishes_the_chain(stop):
    d = decide_turn("<think>x</think> <python> 1+1 </python>", stop, tool_tags=TAGS, calls_made=3)
    assert d.action is TurnAction.FINISH
    assert d.is_leaf and d.calls_made == 3 and d.tag is None and not d.append_eos


def test_python_tag_when_registered():
    d = decide_turn(
        "<python>print(1)</python>", "</python>", tool_tags=("search", "python"), calls_made=0
    )
    assert (d.action, d.tag, d.query) == (TurnAction.CALL, "python", "print(1)")


def test_negative_counts_rejected():
    with pytest.raises(ValueError, match="calls_made"):
        decide_turn("x", None, tool_tags=TAGS, calls_made=-1)


def test_extract_tool_input_and_stop_tag():
    assert extract_tool_input("<search>a</search> <search> b </search>", "search") == "b"
    assert extract_tool_input("no tags here", "search") == ""
    assert extract_tool_input("<search> open only", "search") == ""
    assert stop_tag("<search> x </search>  \n", ("python", "search")) == "search"
    assert stop_tag("<answer> x </answer>", ("search",)) is None
