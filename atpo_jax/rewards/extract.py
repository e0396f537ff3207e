"""Pulling the final answer out of a response: the first ``<answer>…</answer>``, then its last ``\\boxed{…}``.

Brace matching follows the MATH-dataset helper the reference uses: from the last ``\\boxed`` (or, failing
that, the last ``\\fbox``) count braces until the first one closes. A ``\\boxed `` followed by a space takes
the text after the last such marker up to the next ``$`` (the reference's path for ``\\boxed 42``).

Difference from the reference: it finds a ``\\fbox{…}`` but then rejects it (its unwrapper only accepts
``\\boxed{``), so an ``\\fbox`` answer scores as "no box" there. Here the ``\\fbox`` content is used, as the
name "fallback" intends. No model in practice writes ``\\fbox`` inside ``<answer>``, so rewards agree.
"""

from __future__ import annotations

import re

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer_block(response: str) -> str | None:
    """Text between the first ``<answer>`` and the next ``</answer>`` (not stripped), or None."""
    match = _ANSWER_BLOCK.search(response.strip())
    return match.group(1) if match else None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` (brace-matched), ``\\boxed …`` or ``\\fbox{…}`` in ``text``.

    Returns None when there is no box or its braces never close.
    """
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    prefix = "\\boxed{"
    if start < 0:
        start = text.rfind("\\fbox")
        prefix = "\\fbox{"
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                boxed = text[start : i + 1]
                # "\boxedx{…}" or "\fboxy{…}" is not a box (the reference's unwrapper rejects it too).
                return boxed[len(prefix) : -1] if boxed.startswith(prefix) else None
    return None


def extract_answer(response: str) -> str | None:
    """The final answer: last box inside the first answer block, or None when either is missing."""
    block = extract_answer_block(response)
    return None if block is None else last_boxed(block)
