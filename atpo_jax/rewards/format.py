"""The paper's response format check (ALGORITHM.md §3.1), applied during training only.

Rules, checked in this order (the first failure is reported):

1. ``<think>`` and ``</think>`` occur equally often, at least once.
2. exactly one ``<answer>`` and exactly one ``</answer>``.
3. every ``<search>`` is followed, in order, by ``</search>``, ``<result>``, ``</result>``; the scan resumes
   after that ``</result>``. The same for ``<python>``.
4. ``<answer>`` comes before ``</answer>`` and the text between them contains ``\\boxed{`` and a ``}``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FormatCheck:
    ok: bool
    reason: str


def _check_tool_blocks(text: str, tag: str) -> FormatCheck | None:
    pos = 0
    while True:
        start = text.find(f"<{tag}>", pos)
        if start < 0:
            return None
        end = text.find(f"</{tag}>", start)
        result = text.find("<result>", start)
        result_end = text.find("</result>", result) if result >= 0 else -1
        if -1 in (end, result, result_end):
            return FormatCheck(False, f"{tag}/result tags are incomplete")
        if not start < end < result < result_end:
            return FormatCheck(False, f"{tag}/result tags are in the wrong order")
        pos = result_end


def validate_format(text: str) -> FormatCheck:
    """Checks ``text`` (the decoded response, tool results included) against the rules above."""
    opened, closed = text.count("<think>"), text.count("</think>")
    if opened != closed:
        return FormatCheck(False, "<think> and </think> are not paired")
    if opened == 0:
        return FormatCheck(False, "no <think> block")
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return FormatCheck(False, "need exactly one <answer> and one </answer>")
    for tag in ("search", "python"):
        failure = _check_tool_blocks(text, tag)
        if failure is not None:
            return failure
    start, end = text.find("<answer>"), text.find("</answer>")
    if start > end:
        return FormatCheck(False, "</answer> comes before <answer>")
    inside = text[start:end]
    if "\\boxed{" not in inside or "}" not in inside:
        return FormatCheck(False, "the answer has no \\boxed{}")
    return FormatCheck(True, "format is correct")
