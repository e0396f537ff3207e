"""Toolbox: stop strings, dispatch, failure isolation, concurrent calls."""

import threading

import pytest

from atpo_jax.tools import SearchTool, Toolbox, ToolResult
from atpo_jax.tools.base import Passage, RetrievalError


class EchoTool:
    tag = "echo"

    def run(self, content):
        return ToolResult(ok=True, text=content.upper())


class BrokenTool:
    tag = "broken"

    def run(self, content):
        raise KeyError("bug")


class FixedRetriever:
    def __init__(self, rows=None, fail=False):
        self.rows, self.fail, self.queries = rows or [], fail, []

    def search(self, queries, topk):
        self.queries.extend(queries)
        if self.fail:
            raise RetrievalError("down")
        return [[Passage(r) for r in self.rows[:topk]] for _ in queries]


def test_stop_strings_and_tags():
    toolbox = Toolbox([SearchTool(FixedRetriever()), EchoTool()])
    assert toolbox.tags == ("search", "echo")
    assert toolbox.stop_strings == ("</search>", "</echo>")
    with pytest.raises(ValueError, match="two tools"):
        Toolbox([EchoTool(), EchoTool()])


def test_unknown_and_broken_tools_become_failures():
    toolbox = Toolbox([EchoTool(), BrokenTool()])
    assert toolbox.run("nope", "x") == ToolResult(
        ok=False, text="", status="unknown_tool", error="no tool registered for <nope>"
    )
    broken = toolbox.run("broken", "x")
    assert not broken.ok and broken.status == "error" and broken.error == "KeyError: 'bug'"


def test_search_tool_formats_and_strips_quotes():
    rows = [
        {"id": "1", "contents": "A"},
        {"id": "2", "contents": "A"},
        {"id": "3", "contents": "B"},
    ]
    retriever = FixedRetriever(rows)
    result = SearchTool(retriever, topk=3).run(' "Eiffel" tower ')
    assert result == ToolResult(ok=True, text="Page 1: A\nPage 2: B")
    assert retriever.queries == ["Eiffel tower"]
    assert SearchTool(FixedRetriever([])).run("x").text == "No search results found."
    failed = SearchTool(FixedRetriever(fail=True)).run("x")
    assert (failed.ok, failed.status, failed.error) == (False, "retrieval_error", "down")


def test_run_many_keeps_order_and_runs_concurrently():
    seen = set()
    barrier = threading.Barrier(4)

    class Meeting:
        tag = "meet"

        def run(self, content):
            barrier.wait(timeout=5)  # only passes if 4 calls run at the same time
            seen.add(threading.get_ident())
            return ToolResult(ok=True, text=content)

    toolbox = Toolbox([Meeting(), EchoTool()], max_workers=4)
    results = toolbox.run_many([("meet", str(i)) for i in range(4)])
    assert [r.text for r in results] == ["0", "1", "2", "3"]
    assert len(seen) == 4
    assert toolbox.run_many([]) == []
