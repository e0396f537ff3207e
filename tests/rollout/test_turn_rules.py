"""The turn rules as pure functions: each case of ALGORITHM.md §1.3 gives the expected Decision."""

from __future__ import annotations

import pytest

from atpo_jax.rollout import turn_rules as R
from atpo_jax.rollout.settings import RolloutSettings
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.parsing import CALL_LIMIT_WARNING
from atpo_jax.tools.passages import format_observation

SETTINGS = RolloutSettings(max_response_len=100, call_limit=2, observation_margin=10)
TAGS = ("search",)


def encode(text: str) -> list[int]:
    """One token per character (codes), so lengths are easy to reason about."""
    return [ord(c) for c in text]


def after_generation(finish="stop", stop="</search>", text="<search> q </search>", **kw):
    args = dict(
        finish_reason=finish,
        stop_string=stop,
        piece_text=text,
        calls_made=0,
        response_length=30,
        settings=SETTINGS,
        tool_tags=TAGS,
        encode=encode,
    )
    args.update(kw)
    return R.after_generation(**args)


def test_a_closing_tag_with_content_is_a_call():
    d = after_generation()
    assert d == R.Decision(R.Outcome.CALL, calls_made=1, tag="search", query="q")


def test_eos_stop_and_length_end_the_chain():
    assert after_generation(finish="eos") == R.leaf(R.Finish.EOS, 0)
    # Truncation by the budget is counted; an unregistered stop string is a plain stop.
    assert after_generation(finish="length") == R.leaf(R.Finish.LENGTH, 0, truncated=True)
    assert after_generation(stop="</python>", text="<python>1</python>") == R.leaf(R.Finish.STOP, 0)


def test_an_empty_call_forces_a_trained_eos_when_there_is_room():
    d = after_generation(text="<search>  </search>")
    assert d.outcome == R.Outcome.LEAF and d.finish == R.Finish.EMPTY_CALL
    assert d.force_eos and d.calls_made == 1  # the call counts, like the reference
    full = after_generation(text="<search></search>", response_length=100)
    assert not full.force_eos  # no room for the EOS: just a leaf
    leaf_rule = RolloutSettings(max_response_len=100, empty_call="leaf")
    assert not after_generation(text="<search></search>", settings=leaf_rule).force_eos


def test_the_call_limit_inserts_the_warning_or_ends_without_room():
    settings = RolloutSettings(max_response_len=500, call_limit=2)
    d = after_generation(calls_made=2, settings=settings)
    assert d.outcome == R.Outcome.CONTINUE and d.call_limit_hit and not d.truncated
    assert d.tokens == tuple(encode(CALL_LIMIT_WARNING)) and d.calls_made == 2
    room = len(CALL_LIMIT_WARNING)  # the warning needs strictly more room than its length
    d = after_generation(calls_made=2, response_length=500 - room - 1, settings=settings)
    assert d.outcome == R.Outcome.CONTINUE
    d = after_generation(calls_made=2, response_length=500 - room, settings=settings)
    assert d == R.leaf(R.Finish.LENGTH, 2, call_limit_hit=True)


def test_the_chain_rollouts_call_limit_ends_the_chain_with_a_trained_eos():
    # The reference's chain rollout (GRPO/AEPO baselines): the 7th call (limit 6) is not run; one
    # EOS (mask 1) is appended and the chain ends, no warning.
    settings = RolloutSettings(max_response_len=500, call_limit=6, call_limit_rule="eos")
    d = after_generation(calls_made=6, settings=settings)
    assert d == R.Decision(
        R.Outcome.LEAF, 6, finish=R.Finish.CALL_LIMIT, force_eos=True, call_limit_hit=True
    )
    assert d.tokens == ()
    # Under the limit it is still a call; at the budget there is no room for the EOS.
    assert after_generation(calls_made=5, settings=settings).outcome == R.Outcome.CALL
    full = after_generation(calls_made=6, response_length=500, settings=settings)
    assert full == R.leaf(R.Finish.CALL_LIMIT, 6, call_limit_hit=True)


def test_a_tool_result_starts_a_child_and_is_cut_to_leave_the_margin():
    result = ToolResult(ok=True, text="doc " * 20, status="ok")
    observation = encode(format_observation(result.text))
    assert len(observation) == 100
    d = R.after_tool(
        result=result, calls_made=1, response_length=0, settings=SETTINGS, encode=encode
    )
    assert d == R.Decision(R.Outcome.CHILD, 1, finish=R.Finish.TOOL, tokens=tuple(observation))
    # 60 tokens of room for a longer observation: cut to 60 - margin 10 = 50.
    d = R.after_tool(
        result=result, calls_made=1, response_length=40, settings=SETTINGS, encode=encode
    )
    assert len(observation) > 60 and d.tokens == tuple(observation[:50])
    d = R.after_tool(
        result=result, calls_made=1, response_length=95, settings=SETTINGS, encode=encode
    )
    assert d == R.leaf(R.Finish.NO_ROOM, 1)


@pytest.mark.parametrize("rule", ["leaf", "error_text"])
def test_a_failed_tool_ends_the_chain_or_inserts_the_failure_note(rule):
    settings = RolloutSettings(max_response_len=100, tool_failure=rule)
    failed = ToolResult(ok=False, text="", status="error", error="down")
    d = R.after_tool(
        result=failed, calls_made=1, response_length=0, settings=settings, encode=encode
    )
    if rule == "leaf":
        assert d == R.leaf(R.Finish.TOOL_FAILURE, 1)
    else:
        note = encode(format_observation("Tool(search) returned empty output."))
        assert d == R.Decision(R.Outcome.CHILD, 1, finish=R.Finish.TOOL, tokens=tuple(note))
        assert R.TOOL_FAILURE_TEXT == "Tool(search) returned empty output."
        # The note names the tool that failed, as the reference's f"Tool({tag}) ...".
        d = R.after_tool(
            result=failed,
            calls_made=1,
            response_length=0,
            settings=settings,
            encode=encode,
            tag="python",
        )
        assert d.tokens == tuple(
            encode(" <result>\nTool(python) returned empty output.\n</result>")
        )


def test_out_of_room():
    assert R.out_of_room(response_length=100, calls_made=3, settings=SETTINGS) == R.leaf(
        R.Finish.LENGTH, 3, truncated=True
    )
    assert R.out_of_room(response_length=99, calls_made=3, settings=SETTINGS).outcome == (
        R.Outcome.CONTINUE
    )


def test_finish_reasons_keep_their_strings():
    assert [f.value for f in R.Finish] == [
        "tool", "eos", "stop", "length", "tool_failure", "empty_call", "no_room", "call_limit",
    ]  # fmt: skip
    assert R.Finish.EOS == "eos" and f"{R.Finish.NO_ROOM}" == "no_room"
