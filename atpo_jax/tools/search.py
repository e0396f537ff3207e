"""The ``search`` tool: query a retriever and format the hits for the agent (ALGORITHM.md §6.2)."""

from __future__ import annotations

import logging

from atpo_jax.tools.base import RetrievalError, Retriever, ToolResult
from atpo_jax.tools.passages import DEFAULT_MAX_CHARS, DEFAULT_MAX_RESULTS, format_passages

logger = logging.getLogger(__name__)


class SearchTool:
    """Runs one query against a :class:`~atpo_jax.tools.base.Retriever` and formats the result.

    Args:
      retriever: any retriever (embedded BM25, HTTP client, ...).
      topk: passages requested per query (reference: 3).
      max_results: at most this many ``Page i:`` lines (reference: 10).
      max_chars: per-passage character cut (reference: 1000).

    Like the reference client, double quotes are removed from the query before searching. A retrieval
    failure is returned as ``ToolResult(ok=False, status="retrieval_error")`` (and logged), never raised,
    because it happens in a rollout worker thread; retries and timeouts belong to the retriever.
    """

    tag = "search"

    def __init__(
        self,
        retriever: Retriever,
        *,
        topk: int = 3,
        max_results: int = DEFAULT_MAX_RESULTS,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        if topk < 1:
            raise ValueError(f"SearchTool topk must be >= 1, got {topk}")
        self.retriever = retriever
        self.topk = topk
        self.max_results = max_results
        self.max_chars = max_chars

    def run(self, content: str) -> ToolResult:
        query = content.replace('"', "").strip()
        try:
            hits = self.retriever.search([query], self.topk)[0]
        except RetrievalError as e:
            logger.warning("search for %r failed: %s", query, e)
            return ToolResult(ok=False, text="", status="retrieval_error", error=str(e))
        text = format_passages(hits, max_results=self.max_results, max_chars=self.max_chars)
        return ToolResult(ok=True, text=text)
