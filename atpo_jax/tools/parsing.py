"""Deciding what to do with a finished assistant turn: run a tool, end the chain, or warn and continue.

The policy is ALGORITHM.md §1.3, returned as a :class:`TurnDecision` that the rollout applies, so the rules
live in one tested place and the rollout only moves tokens:

* The turn ended on a registered stop string ``</tag>`` (a tool call):
  * calls so far < ``call_limit``: the call counts; the query is the text between the LAST ``<tag>`` and
    that closing tag, stripped. Non-empty -> :attr:`TurnAction.CALL`. Empty -> :attr:`TurnAction.EMPTY_CALL`
    (the reference appends one EOS token with mask 1 and makes the node a leaf).
  * limit reached: :attr:`TurnAction.CALL_LIMIT`; the tool is not run, :data:`CALL_LIMIT_WARNING` is
    appended with mask 0 and generation continues in the same node.
* Anything else (EOS, a stop token, a closing tag of a tool that is not registered):
  :attr:`TurnAction.FINISH`, the node is a leaf. (Length truncation is the rollout's business.)

Deliberate difference from the reference (DESIGN.md §9, ALGORITHM.md §8 item 10): the opening tag is searched
in the CURRENT turn only. The reference searches the decoded prompt + whole response, so a turn that writes
``</search>`` without ``<search>`` would re-issue an earlier query or the system prompt's example query; here it
is an empty call.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection

# Same meaning as the reference's call-limit sentence (ALGORITHM.md §1.3): starts with a space, says the
# tool budget is spent and asks for the final answer, ends with a blank line.
CALL_LIMIT_WARNING = (
    " The tool call limit has been reached, so no more tools will be run."
    " Now give your final answer.\n\n"
)
DEFAULT_CALL_LIMIT = 6


class TurnAction(str, enum.Enum):
    CALL = "call"
    EMPTY_CALL = "empty_call"
    CALL_LIMIT = "call_limit"
    FINISH = "finish"


@dataclasses.dataclass(frozen=True)
class TurnDecision:
    """What the rollout does after a turn.

    Attributes:
      action: see :class:`TurnAction`.
      tag: the tool tag for ``CALL``/``EMPTY_CALL``/``CALL_LIMIT``, else None.
      query: the stripped tool input for ``CALL`` (non-empty), ``""`` for ``EMPTY_CALL``, else None.
      calls_made: the node's tool-call counter after this turn (a call under the limit counts even when its
        content is empty, like the reference).
      insert_text: text to append with loss mask 0 before continuing (the warning for ``CALL_LIMIT``).
      append_eos: the reference appends one EOS token (mask 1) after an empty call.
      is_leaf: the node ends here.
    """

    action: TurnAction
    tag: str | None
    query: str | None
    calls_made: int
    insert_text: str | None = None
    append_eos: bool = False
    is_leaf: bool = False


def closing_tag(tag: str) -> str:
    return f"</{tag}>"


def extract_tool_input(turn_text: str, tag: str) -> str:
    """The stripped text between the last ``<tag>`` and the last ``</tag>`` of ``turn_text``; ``""`` if none.

    Only ``turn_text`` is searched, so pass the text generated in the current turn, not the whole response.
    """
    close = closing_tag(tag)
    end = turn_text.rfind(close)
    if end < 0:
        return ""
    start = turn_text.rfind(f"<{tag}>", 0, end)
    if start < 0:
        return ""
    return turn_text[start + len(tag) + 2 : end].strip()


def stop_tag(turn_text: str, tool_tags: Collection[str]) -> str | None:
    """The registered tag whose closing tag ends ``turn_text`` (ignoring trailing whitespace), else None.

    For engines that report only the generated text; when the engine reports the matched stop string, pass
    that to :func:`decide_turn` directly.
    """
    tail = turn_text.rstrip()
    for tag in tool_tags:
        if tail.endswith(closing_tag(tag)):
            return tag
    return None


def decide_turn(
    turn_text: str,
    stop_string: str | None,
    *,
    tool_tags: Collection[str],
    calls_made: int,
    call_limit: int = DEFAULT_CALL_LIMIT,
) -> TurnDecision:
    """Applies ALGORITHM.md §1.3 to one finished turn.

    Args:
      turn_text: the text generated in this turn (ends with ``stop_string`` when it is a tool call).
      stop_string: the stop string the engine matched (e.g. ``"</search>"``), or None for EOS/stop tokens.
      tool_tags: tags of the tools that are registered (``{"search"}``, plus ``"python"`` when enabled).
      calls_made: the node's tool-call counter before this turn.
      call_limit: maximum tool calls per chain (reference: 6).

    Example: ``decide_turn("<think>x</think> <search> Paris </search>", "</search>", tool_tags={"search"},
    calls_made=0)`` -> ``TurnDecision(CALL, tag="search", query="Paris", calls_made=1)``.
    """
    if call_limit < 0 or calls_made < 0:
        raise ValueError(f"call_limit and calls_made must be >= 0, got {call_limit}, {calls_made}")
    tag = None
    if stop_string is not None and stop_string.startswith("</") and stop_string.endswith(">"):
        tag = stop_string[2:-1]
    if tag is None or tag not in tool_tags:
        return TurnDecision(TurnAction.FINISH, None, None, calls_made, is_leaf=True)
    if calls_made >= call_limit:
        return TurnDecision(
            TurnAction.CALL_LIMIT, tag, None, calls_made, insert_text=CALL_LIMIT_WARNING
        )
    query = extract_tool_input(turn_text, tag)
    if not query:
        return TurnDecision(
            TurnAction.EMPTY_CALL, tag, "", calls_made + 1, append_eos=True, is_leaf=True
        )
    return TurnDecision(TurnAction.CALL, tag, query, calls_made + 1)
