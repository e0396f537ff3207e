"""Shared tool types: retrieved passages, tool results, and the retriever/tool interfaces.

Every retriever (embedded BM25, HTTP client, test fakes) implements :class:`Retriever`; every tool the
agent can call (search, python) implements :class:`Tool`. The rollout only ever sees :class:`ToolResult`
values, so a failing service turns into data it can act on instead of an exception in a worker thread.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


class RetrievalError(RuntimeError):
    """A retriever could not answer (service down, timeout, malformed response, cache miss in replay)."""


@dataclasses.dataclass(frozen=True)
class Passage:
    """One retrieved corpus row and, when the retriever reports it, its score.

    ``document`` is the corpus row exactly as stored (wiki-18 rows have ``id`` and ``contents``, where
    ``contents`` is the title in double quotes, a newline, then the passage text). Keeping the whole row
    lets the retrieval server echo it back unchanged, as the reference server does.
    """

    document: Mapping[str, Any]
    score: float | None = None

    @property
    def contents(self) -> str:
        value = self.document.get("contents", "")
        return value if isinstance(value, str) else str(value)

    @property
    def id(self) -> str | None:
        value = self.document.get("id")
        return None if value is None else str(value)

    def to_json(self) -> dict[str, Any]:
        """The reference server's per-hit shape: ``{"document": row, "score": s}``."""
        return {"document": dict(self.document), "score": self.score}


@runtime_checkable
class Retriever(Protocol):
    """Batch search: ``search(queries, topk)[i]`` is the ranked passages for ``queries[i]``.

    Implementations must be safe to call from several threads at once (the rollout runs tool calls in a
    thread pool) and raise :class:`RetrievalError` when they cannot answer.
    """

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]: ...


@dataclasses.dataclass(frozen=True)
class ToolResult:
    """Outcome of one tool call, as data the rollout acts on.

    Attributes:
      ok: True when the tool produced an observation to insert (ALGORITHM.md §1.4: success is a non-empty
        result). False means the call failed (service down, sandbox could not start, tool disabled); the
        reference tree rollout then makes the calling node a leaf.
      text: the observation text (without the ``<result>`` wrapper, see
        :func:`atpo_jax.tools.passages.format_observation`). Empty when ``ok`` is False.
      status: a short machine-readable code (``"ok"``, ``"error"``, ``"timeout"``, ``"cpu_limit"``,
        ``"memory_limit"``, ``"output_limit"``, ``"blocked"``, ``"disabled"``, ``"unknown_tool"``,
        ``"retrieval_error"``) for metrics and logs.
      error: a human-readable reason when something went wrong, for logs.
    """

    ok: bool
    text: str
    status: str = "ok"
    error: str | None = None


@runtime_checkable
class Tool(Protocol):
    """A callable tool keyed by its trigger tag (``search`` for ``<search> … </search>``)."""

    tag: str

    def run(self, content: str) -> ToolResult: ...
