"""The rollout's turn rules as pure functions: (node state, what happened, settings) -> Decision.

ALGORITHM.md §1.3 with the fixes of DESIGN.md §9. The tree search applies a :class:`Decision` and
does nothing else on its own: it appends the decision's tokens, runs the tool it names, forces the
EOS it asks for and counts what it reports. A new rule (a new tool outcome, a different budget
policy) is a change here, tested without an engine.

Three moments decide a node's fate:

- :func:`after_generation`: the engine stopped (EOS, a stop string, the budget). A closing tool tag
  is parsed from the current generation piece (``tools.parsing.decide_turn``): a call, an empty call,
  or the call limit (``call_limit_rule``: a masked warning, then the turn continues, as the
  reference's tree; or a trained EOS that ends the chain, as its chain rollout).
- :func:`after_tool`: the tool answered. A result becomes the observation that starts a child node
  (cut to leave ``observation_margin`` tokens when it does not fit); a failure ends the chain or
  inserts the failure note ``Tool(<tag>) returned empty output.`` (``tool_failure``).

The reference's chain rollout (the GRPO/GSPO/AEPO baselines, ALGORITHM.md §5) is
``call_limit_rule='eos'``, ``tool_failure='error_text'`` and ``empty_call='leaf'`` (an empty call
there just ends the chain, no EOS); its tree rollout is the defaults.
- :func:`out_of_room`: before generating again, a node whose row used the whole response budget
  ends as a truncated leaf.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection

from atpo_jax.rollout.settings import (
    CallLimitRule,
    EmptyCallRule,
    RolloutSettings,
    ToolFailureRule,
)
from atpo_jax.settings import StrEnum
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.parsing import TurnAction, decide_turn
from atpo_jax.tools.passages import format_observation


def tool_failure_text(tag: str) -> str:
    """What the reference's chain rollout inserts after a failed call of the tool ``tag``
    (ALGORITHM.md §1.4; ``f"Tool({tag}) returned empty output."`` in its code)."""
    return f"Tool({tag}) returned empty output."


TOOL_FAILURE_TEXT = tool_failure_text("search")


class Outcome(StrEnum):
    LEAF = "leaf"  # the chain ends at this node
    CONTINUE = "continue"  # generate again in the same node (after a masked insertion)
    CALL = "call"  # run the tool the decision names
    CHILD = "child"  # a tool result: a child node starts with the observation tokens


class Finish(StrEnum):
    """Why a node's turn ended (``Node.finish``; traces and metrics keep these strings)."""

    TOOL = "tool"  # a successful tool call: the node has a child
    EOS = "eos"
    STOP = "stop"  # a stop string that is not a registered tool's closing tag
    LENGTH = "length"  # the row's response budget is used up
    TOOL_FAILURE = "tool_failure"
    EMPTY_CALL = "empty_call"
    NO_ROOM = "no_room"  # no room left for any of the tool's result
    CALL_LIMIT = "call_limit"  # a call past the limit ended the chain (call_limit_rule='eos')


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the search does with a node.

    Attributes:
      outcome: see :class:`Outcome`.
      finish: the node's finish reason (``LEAF``; ``TOOL`` for ``CHILD``), else None.
      tokens: inserted tokens (loss mask 0) for the engine to append to the node's sequence: the
        call-limit warning (``CONTINUE``, appended to this node) or the observation (``CHILD``,
        the start of the new child).
      force_eos: append one EOS token, trained (loss mask 1) and scored by the engine as if
        sampled (the reference's rule after an empty tool call, and its chain rollout's at the
        call limit).
      calls_made: the chain's tool-call counter after this decision.
      tag, query: the tool and its input (``CALL``).
      call_limit_hit, truncated: what the ``rollout/call_limit_hits`` and
        ``rollout/truncated_rows`` counters count.
    """

    outcome: Outcome
    calls_made: int
    finish: Finish | None = None
    tokens: tuple[int, ...] = ()
    force_eos: bool = False
    tag: str | None = None
    query: str | None = None
    call_limit_hit: bool = False
    truncated: bool = False


def leaf(finish: Finish, calls_made: int, **flags: bool) -> Decision:
    return Decision(Outcome.LEAF, calls_made, finish=finish, **flags)


def after_generation(
    *,
    finish_reason: str,
    stop_string: str | None,
    piece_text: str,
    calls_made: int,
    response_length: int,
    settings: RolloutSettings,
    tool_tags: Collection[str],
    encode: Callable[[str], list[int]],
) -> Decision:
    """The node's generation ended with the engine's ``finish_reason`` (``eos``, ``stop`` or
    ``length``); ``piece_text`` is the decoded text generated since the last insertion, and
    ``response_length`` the row's response tokens so far (this generation included)."""
    budget, empty_call = settings.max_response_len, settings.empty_call
    call_limit_rule = settings.call_limit_rule
    if finish_reason == "eos":
        return leaf(Finish.EOS, calls_made)
    if finish_reason != "stop":
        return leaf(Finish.LENGTH, calls_made, truncated=True)
    turn = decide_turn(
        piece_text,
        stop_string,
        tool_tags=tool_tags,
        calls_made=calls_made,
        call_limit=settings.call_limit,
    )
    if turn.action is TurnAction.CALL:
        return Decision(Outcome.CALL, turn.calls_made, tag=turn.tag, query=turn.query)
    if turn.action is TurnAction.EMPTY_CALL:
        room = response_length < budget
        return leaf(
            Finish.EMPTY_CALL, turn.calls_made, force_eos=empty_call == EmptyCallRule.EOS and room
        )
    if turn.action is TurnAction.CALL_LIMIT:
        if call_limit_rule == CallLimitRule.EOS:
            room = response_length < budget
            return leaf(Finish.CALL_LIMIT, turn.calls_made, force_eos=room, call_limit_hit=True)
        warning = tuple(encode(turn.insert_text))
        if len(warning) >= budget - response_length:
            return leaf(Finish.LENGTH, turn.calls_made, call_limit_hit=True)
        return Decision(Outcome.CONTINUE, turn.calls_made, tokens=warning, call_limit_hit=True)
    return leaf(Finish.STOP, turn.calls_made)


def after_tool(
    *,
    result: ToolResult,
    calls_made: int,
    response_length: int,
    settings: RolloutSettings,
    encode: Callable[[str], list[int]],
    tag: str = "search",
) -> Decision:
    """The tool ``tag`` called by the node answered ``result``; ``response_length`` as above.
    (``tag`` only names the tool in the failure note of ``tool_failure='error_text'``.)"""
    failure, margin = settings.tool_failure, settings.observation_margin
    if not result.ok and failure == ToolFailureRule.LEAF:
        return leaf(Finish.TOOL_FAILURE, calls_made)
    text = result.text if result.ok else tool_failure_text(tag)
    observation = encode(format_observation(text))
    room = settings.max_response_len - response_length
    if len(observation) > room:
        # As the reference: an observation that does not fit is cut to leave a margin for the
        # answer; with no room at all the chain ends here.
        observation = observation[: max(0, room - margin)]
    if not observation:
        return leaf(Finish.NO_ROOM, calls_made)
    return Decision(Outcome.CHILD, calls_made, finish=Finish.TOOL, tokens=tuple(observation))


def out_of_room(*, response_length: int, calls_made: int, settings: RolloutSettings) -> Decision:
    """Before the node generates: ``LEAF`` (truncated) when the row has no budget left, else
    ``CONTINUE``."""
    if response_length >= settings.max_response_len:
        return leaf(Finish.LENGTH, calls_made, truncated=True)
    return Decision(Outcome.CONTINUE, calls_made)
