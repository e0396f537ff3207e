"""Retrievers, the retrieval server, the python sandbox and tool-call parsing (no JAX needed).

Typical use in a rollout::

    from atpo_jax import tools

    retriever = tools.LocalBM25Retriever("corpus.jsonl")  # or tools.DenseRetriever(index_dir), HttpRetriever(url)
    toolbox = tools.Toolbox([tools.SearchTool(retriever, topk=3)])
    decision = tools.decide_turn(turn_text, stop_string, tool_tags=toolbox.tags, calls_made=n)
    if decision.action is tools.TurnAction.CALL:
        result = toolbox.run(decision.tag, decision.query)
        observation = tools.format_observation(result.text) if result.ok else None

The retrieval server (FastAPI) lives in :mod:`atpo_jax.tools.retrieval_server` and is not imported here.
"""

from atpo_jax.tools.base import Passage, RetrievalError, Retriever, Tool, ToolResult
from atpo_jax.tools.bm25 import BM25Params, LocalBM25Retriever
from atpo_jax.tools.cache import RetrievalCache
from atpo_jax.tools.corpus import CorpusError, read_corpus, write_corpus
from atpo_jax.tools.dense import DenseRetriever
from atpo_jax.tools.http_retriever import HttpRetriever, RetryPolicy
from atpo_jax.tools.noisy import NoisyRetriever
from atpo_jax.tools.parsing import (
    CALL_LIMIT_WARNING,
    DEFAULT_CALL_LIMIT,
    TurnAction,
    TurnDecision,
    decide_turn,
    extract_tool_input,
    stop_tag,
)
from atpo_jax.tools.passages import (
    NO_RESULTS_TEXT,
    MalformedResponseError,
    format_observation,
    format_passages,
    parse_retrieve_response,
    render_retrieve_response,
)
from atpo_jax.tools.python_sandbox import PythonSandboxConfig, PythonTool
from atpo_jax.tools.registry import register_tool, registered_tools
from atpo_jax.tools.search import SearchTool
from atpo_jax.tools.toolbox import Toolbox

__all__ = [
    "BM25Params",
    "CALL_LIMIT_WARNING",
    "CorpusError",
    "DEFAULT_CALL_LIMIT",
    "DenseRetriever",
    "HttpRetriever",
    "NoisyRetriever",
    "LocalBM25Retriever",
    "MalformedResponseError",
    "NO_RESULTS_TEXT",
    "Passage",
    "PythonSandboxConfig",
    "PythonTool",
    "RetrievalCache",
    "RetrievalError",
    "Retriever",
    "RetryPolicy",
    "SearchTool",
    "Tool",
    "ToolResult",
    "Toolbox",
    "TurnAction",
    "TurnDecision",
    "decide_turn",
    "extract_tool_input",
    "format_observation",
    "format_passages",
    "parse_retrieve_response",
    "read_corpus",
    "register_tool",
    "registered_tools",
    "render_retrieve_response",
    "stop_tag",
    "write_corpus",
]
