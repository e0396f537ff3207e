"""The set of tools an agent may call, keyed by trigger tag, with a concurrent runner for the rollout."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Sequence

from atpo_jax.tools.base import Tool, ToolResult
from atpo_jax.tools.parsing import closing_tag

logger = logging.getLogger(__name__)


class Toolbox:
    """Registered tools by tag; the rollout's stop strings are their closing tags.

    ``run`` never raises: an unknown tag or a tool that crashes becomes ``ToolResult(ok=False)``, so one bad
    call cannot take down a rollout worker.
    """

    def __init__(self, tools: Sequence[Tool], *, max_workers: int = 32) -> None:
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.tag in self._tools:
                raise ValueError(f"two tools registered for the tag {tool.tag!r}")
            self._tools[tool.tag] = tool
        if max_workers < 1:
            raise ValueError(f"Toolbox max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self._tools)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Closing tags that end a generation (reference: ``</search>``, ``</python>``)."""
        return tuple(closing_tag(tag) for tag in self._tools)

    def run(self, tag: str, content: str) -> ToolResult:
        tool = self._tools.get(tag)
        if tool is None:
            return ToolResult(
                ok=False, text="", status="unknown_tool", error=f"no tool registered for <{tag}>"
            )
        try:
            return tool.run(content)
        except Exception as e:  # a tool bug must not kill the rollout thread pool
            logger.exception("tool %r raised on input %r", tag, content[:200])
            return ToolResult(ok=False, text="", status="error", error=f"{type(e).__name__}: {e}")

    def run_many(self, calls: Sequence[tuple[str, str]]) -> list[ToolResult]:
        """Runs ``(tag, content)`` calls concurrently (up to ``max_workers``); results in input order.

        Concurrent searches against an :class:`~atpo_jax.tools.http_retriever.HttpRetriever` are coalesced
        into batched requests by the client.
        """
        if not calls:
            return []
        workers = min(self.max_workers, len(calls))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tool") as pool:
            return list(pool.map(lambda call: self.run(*call), calls))
