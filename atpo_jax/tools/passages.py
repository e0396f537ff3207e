"""Search-result formatting and the retrieval wire format (ALGORITHM.md §6).

The agent sees search results exactly as the reference client prints them, because a checkpoint trained
against one layout should keep working with ours:

* ``format_passages``: strip each passage, drop empty ones and duplicates (first occurrence kept), keep at
  most ``max_results``, cut each to ``max_chars`` characters, and emit ``Page {i}: {passage}`` lines joined
  by newlines; no passage gives :data:`NO_RESULTS_TEXT` (which still counts as a successful search).
* ``format_observation``: the text inserted into the token stream after a tool call: a space, ``<result>``,
  a newline, the tool text, a newline, ``</result>`` (ALGORITHM.md §1.4).
* ``parse_retrieve_response``: reads a ``POST /retrieve`` response in either of the reference server's shapes
  (with scores: ``{"result": [[{"document": row, "score": s}, …], …]}``; without: ``{"result": [[row, …], …]}``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from atpo_jax.tools.base import Passage

NO_RESULTS_TEXT = "No search results found."
DEFAULT_MAX_RESULTS = 10
DEFAULT_MAX_CHARS = 1000


class MalformedResponseError(ValueError):
    """A retrieval response does not have the reference server's shape."""


def format_passages(
    passages: Iterable[Passage | str],
    *,
    max_results: int = DEFAULT_MAX_RESULTS,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> str:
    """Formats retrieved passages the way the reference search client does (ALGORITHM.md §6.2).

    Deduplication compares the stripped full text, before the character cut, like the reference.

    Example: passages ``["A", "B", "A"]`` -> ``"Page 1: A\\nPage 2: B"``; no passages ->
    ``"No search results found."``.
    """
    if max_results < 1 or max_chars < 1:
        raise ValueError(
            f"format_passages needs max_results >= 1 and max_chars >= 1, got {max_results} and {max_chars}"
        )
    seen: set[str] = set()
    kept: list[str] = []
    for passage in passages:
        text = (passage.contents if isinstance(passage, Passage) else str(passage)).strip()
        if not text or text in seen:
            continue
        seen.add(text)
        kept.append(text)
    if not kept:
        return NO_RESULTS_TEXT
    return "\n".join(
        f"Page {i}: {text[:max_chars]}" for i, text in enumerate(kept[:max_results], start=1)
    )


def format_observation(tool_text: str) -> str:
    """Wraps a tool's text as the observation inserted after the closing tool tag (mask 0)."""
    return f" <result>\n{tool_text}\n</result>"


def _passage_from_hit(hit: Any, where: str) -> Passage:
    if isinstance(hit, dict) and "document" in hit:
        document, score = hit["document"], hit.get("score")
        if score is not None and not isinstance(score, (int, float)):
            raise MalformedResponseError(f"{where}: 'score' must be a number, got {score!r}")
        score = None if score is None else float(score)
    else:
        document, score = hit, None
    if not isinstance(document, dict):
        raise MalformedResponseError(
            f"{where}: expected a corpus row (a JSON object), got {document!r}"
        )
    if not isinstance(document.get("contents"), str):
        raise MalformedResponseError(
            f"{where}: corpus row has no string 'contents' field: {document!r}"
        )
    return Passage(document=document, score=score)


def parse_retrieve_response(payload: Any, num_queries: int) -> list[list[Passage]]:
    """Parses a ``POST /retrieve`` JSON body into one passage list per query.

    Raises:
      MalformedResponseError: the body is not ``{"result": [...]}`` with ``num_queries`` lists of hits.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("result"), list):
        raise MalformedResponseError(
            f"expected a JSON object with a 'result' list, got {str(payload)[:200]!r}"
        )
    groups = payload["result"]
    if len(groups) != num_queries:
        raise MalformedResponseError(
            f"'result' has {len(groups)} entries for {num_queries} queries"
        )
    parsed: list[list[Passage]] = []
    for qi, group in enumerate(groups):
        if not isinstance(group, list):
            raise MalformedResponseError(f"result[{qi}] must be a list of hits, got {group!r}")
        parsed.append(
            [_passage_from_hit(hit, f"result[{qi}][{hi}]") for hi, hit in enumerate(group)]
        )
    return parsed


def render_retrieve_response(
    results: Sequence[Sequence[Passage]], *, return_scores: bool
) -> dict[str, Any]:
    """The reference server's response body for ``results`` (the inverse of the parser)."""
    if return_scores:
        return {"result": [[p.to_json() for p in group] for group in results]}
    return {"result": [[dict(p.document) for p in group] for group in results]}
