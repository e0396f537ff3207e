"""The agent's tools (the ``tools`` section of a run's config) and the toolbox they build."""

from __future__ import annotations

import dataclasses
import logging
import math
import os

from atpo_jax.settings import ConfigError, StrEnum, check, coerce_choices, parse_plugin_spec
from atpo_jax.tools.bm25 import LocalBM25Retriever
from atpo_jax.tools.corpus import CorpusError
from atpo_jax.tools.dense import DenseRetriever
from atpo_jax.tools.dense_index import IndexMismatchError
from atpo_jax.tools.http_retriever import HttpRetriever, RetryPolicy
from atpo_jax.tools.noisy import NoisyRetriever
from atpo_jax.tools.python_sandbox import (
    Isolation,
    PythonSandboxConfig,
    PythonTool,
    SandboxUnavailableError,
)
from atpo_jax.tools.registry import BUILTIN_TOOLS, make_tool
from atpo_jax.tools.search import SearchTool
from atpo_jax.tools.toolbox import Toolbox

log = logging.getLogger(__name__)


class RetrievalMethod(StrEnum):
    """How the in-process search tool retrieves (``tools.method``)."""

    BM25 = "bm25"  # the embedded BM25 index over tools.corpus
    DENSE = "dense"  # an e5 + FAISS index built by python -m atpo_jax.tools.build_index


@dataclasses.dataclass(frozen=True)
class ToolSettings:
    """Search (a local BM25 index or an HTTP retrieval service) and the optional python tool.

    Attributes:
      corpus: JSONL corpus (``id``, ``contents``) for the local BM25 retriever; default for the
        synthetic world: its own corpus.
      retriever_url: a Search-R1/ATPO ``/retrieve`` service (e.g. ``http://127.0.0.1:8000/retrieve``);
        takes precedence over ``corpus``.
      topk: passages returned per search (the reference: 3).
      max_passage_chars: each passage is cut to this many characters.
      timeout_s: HTTP read timeout per attempt.
      retries: HTTP attempts per request (>= 1), with exponential backoff between them.
      cache_path: an on-disk record/replay cache of HTTP answers ("" = none).
      instances: the tools of the run, each a registered name (``search``, ``python``, or one
        given to ``tools.registry.register_tool``) or a dotted path to a factory with optional
        JSON keyword arguments (``'my_pkg.tools:Calculator{"precision": 4}'``;
        ``atpo_jax.tools.registry``). ``search`` and ``python`` are configured by the settings
        below. Each tool's closing tag ``</tag>`` is a stop string of the rollout.
      python: enable the sandboxed python tool (``<python>...</python>``): the same as listing
        ``python`` in ``instances``. The reference has it on (its ``</python>`` stop string
        and the reward's +0.1 for answers that used both tools: ``reward.python_bonus``).
      python_isolation: how the python tool contains model code: ``auto`` (bwrap if it can give
        every guarantee, else unshare; refuses to start where neither works), ``bwrap``, ``unshare``,
        or ``unsafe`` (resource limits and an audit hook only, not a security boundary; must be
        chosen explicitly). docs/security.md.
      method: the in-process retriever when there is no ``retriever_url``: ``bm25`` (over
        ``corpus``) or ``dense`` (e5 + FAISS over ``index``; the paper's retriever).
      index: ``method=dense``: the index folder built by ``python -m atpo_jax.tools.build_index``;
        its corpus is ``corpus`` (default: the synthetic world's, else the index's own) and must
        be the one it was built from.
      encoder: ``method=dense``: the e5 encoder checkpoint directory (default: the one recorded in
        the index; either way it must be the encoder the index was built with).
    """

    corpus: str = ""
    retriever_url: str = ""
    topk: int = 3
    max_passage_chars: int = 1000
    timeout_s: float = 30.0
    retries: int = 4
    cache_path: str = ""
    instances: tuple[str, ...] = ("search",)
    python: bool = False
    python_isolation: Isolation = Isolation.AUTO
    method: RetrievalMethod = RetrievalMethod.BM25
    index: str = ""
    encoder: str = ""

    def __post_init__(self) -> None:
        coerce_choices(self, "tools")
        self._check_method()
        targets = [parse_plugin_spec(s, "tools.instances") for s in self.instances]
        names = [t.target for t in targets]
        check(
            len(set(names)) == len(names),
            f"tools.instances={self.instances!r} lists a tool twice",
        )
        for spec in targets:
            check(
                spec.target not in BUILTIN_TOOLS or not spec.params,
                f"tools.instances: {spec.target!r} takes no arguments (it is configured by "
                f"the tools.* settings), got {dict(spec.params)}",
            )
        check(self.topk >= 1, f"tools.topk={self.topk} must be >= 1")
        check(
            self.max_passage_chars >= 1,
            f"tools.max_passage_chars={self.max_passage_chars} must be >= 1",
        )
        check(
            math.isfinite(self.timeout_s) and self.timeout_s > 0 and self.retries >= 1,
            f"tools.timeout_s={self.timeout_s} / tools.retries={self.retries}: the timeout must "
            "be a finite number > 0 and tools.retries counts attempts, >= 1",
        )

    def _check_method(self) -> None:
        if self.method is RetrievalMethod.BM25:
            check(
                not (self.index or self.encoder),
                f"tools.index={self.index!r} / tools.encoder={self.encoder!r} are for the dense "
                "retriever: add --config.tools.method=dense (or clear them)",
            )
            return
        check(
            not self.retriever_url,
            f"tools.method=dense runs the dense retriever in this process, but "
            f"tools.retriever_url={self.retriever_url!r} points at a service: set one of them "
            "(a dense service: python -m atpo_jax.tools.retrieval_server --method dense)",
        )
        check(
            bool(self.index),
            "tools.method=dense needs tools.index: a folder built by python -m "
            "atpo_jax.tools.build_index --encoder DIR --corpus corpus.jsonl --out INDEX_DIR",
        )

    @property
    def call_deadline_s(self) -> float:
        """How long the rollout waits for one tool call: every attempt plus one for backoff."""
        return max(self.timeout_s * (self.retries + 1), 1.0)


def build_toolbox(
    settings: ToolSettings,
    *,
    default_corpus: str | None,
    max_workers: int,
    retrieval_noise: tuple[float, int] = (0.0, 0),
) -> Toolbox:
    """The tools of ``settings.instances`` (plus python with ``settings.python``): search (HTTP
    service, else the dense index or local BM25 over ``settings.corpus or default_corpus``),
    the python tool, and any registered or dotted-path tool. Raises ``ConfigError`` naming the
    setting for a bad URL, corpus, index, encoder, tool or duplicate tag.

    ``retrieval_noise`` is ``(miss rate, seed)`` of the data's world (the synthetic ``noisy`` and
    ``mixed`` worlds record theirs in their manifest): with a rate > 0 the search tool's retriever,
    whichever it is, is wrapped in a :class:`~atpo_jax.tools.noisy.NoisyRetriever`, so training
    and evaluation search the world as it was built to be searched. A rate of 0 (every other
    world, and ``data.source=files``) leaves the retriever as it is."""
    specs = [parse_plugin_spec(s, "tools.instances") for s in settings.instances]
    if settings.python and all(spec.target != "python" for spec in specs):
        specs.append(parse_plugin_spec("python", "tools.python"))
    tools = []
    for spec in specs:
        if spec.target == "search":
            tools.append(_search_tool(settings, default_corpus, retrieval_noise))
        elif spec.target == "python":
            tools.append(_python_tool(settings))
        else:
            tools.append(make_tool(spec, "tools.instances"))
    if settings.python_isolation is not Isolation.AUTO and all(
        spec.target != "python" for spec in specs
    ):
        log.warning(
            "tools.python_isolation=%s has no effect: the python tool is off (tools.python=false)",
            settings.python_isolation,
        )
    try:
        return Toolbox(tools, max_workers=max_workers)
    except ValueError as e:  # two tools with one tag
        raise ConfigError(f"tools.instances={settings.instances!r}: {e}") from e


def _search_tool(
    settings: ToolSettings, default_corpus: str | None, retrieval_noise: tuple[float, int]
) -> SearchTool:
    """The search tool over the configured retriever (with the world's retrieval noise, if any)."""
    if settings.retriever_url:
        retry = RetryPolicy(
            read_timeout_s=settings.timeout_s,
            connect_timeout_s=min(5.0, settings.timeout_s),
            max_attempts=settings.retries,
        )
        try:
            retriever = HttpRetriever(
                settings.retriever_url, retry=retry, cache_path=settings.cache_path or None
            )
        except ValueError as e:
            raise ConfigError(f"tools.retriever_url={settings.retriever_url!r}: {e}") from e
    elif settings.method is RetrievalMethod.DENSE:
        retriever = _dense_retriever(settings, default_corpus)
    else:
        corpus = settings.corpus or default_corpus
        if not corpus:
            raise ConfigError(
                "no retriever: set tools.retriever_url (a Search-R1 /retrieve service) or "
                "tools.corpus (a JSONL corpus with id/contents for the local BM25 index)"
            )
        if not os.path.exists(corpus):
            raise ConfigError(f"tools.corpus={corpus!r} does not exist: point it at a JSONL corpus")
        try:
            retriever = LocalBM25Retriever(corpus)
        except CorpusError as e:
            raise ConfigError(f"tools.corpus={corpus!r}: {e}") from e
    miss_rate, seed = retrieval_noise
    if miss_rate > 0:
        retriever = NoisyRetriever(retriever, miss_rate=miss_rate, seed=seed)
        log.info("search: the world's retrieval noise, miss rate %g (seed %d)", miss_rate, seed)
    return SearchTool(retriever, topk=settings.topk, max_chars=settings.max_passage_chars)


def _dense_retriever(settings: ToolSettings, default_corpus: str | None) -> DenseRetriever:
    """The e5 + FAISS retriever of ``tools.index`` (its corpus and encoder checked against the
    index's manifest), or a ``ConfigError`` naming the setting that does not fit."""
    corpus = settings.corpus or default_corpus or None
    if corpus and not os.path.exists(corpus):
        raise ConfigError(f"tools.corpus={corpus!r} does not exist: point it at a JSONL corpus")
    if settings.encoder and not os.path.isdir(settings.encoder):
        raise ConfigError(
            f"tools.encoder={settings.encoder!r} is not a directory: point it at the encoder "
            "checkpoint the index was built with (or leave it empty to use the index's own)"
        )
    try:
        return DenseRetriever(settings.index, encoder=settings.encoder or None, corpus=corpus)
    except IndexMismatchError as e:
        raise ConfigError(f"tools.index={settings.index!r}: {e}") from e
    except CorpusError as e:
        raise ConfigError(f"tools.corpus={corpus!r}: {e}") from e
    except (ValueError, OSError, ImportError) as e:  # the encoder checkpoint, or faiss missing
        encoder = repr(settings.encoder) if settings.encoder else "'' (the index's encoder)"
        raise ConfigError(f"tools.encoder={encoder}: {e}") from e


def _python_tool(settings: ToolSettings) -> PythonTool:
    """The python tool at ``tools.python_isolation``; refuses (``ConfigError``) where that level is
    unavailable, so a run never silently executes model code without the isolation it asked for."""
    try:
        return PythonTool(PythonSandboxConfig(enabled=True, isolation=settings.python_isolation))
    except SandboxUnavailableError as e:
        raise ConfigError(f"tools.python_isolation={str(settings.python_isolation)!r}: {e}") from e


def check_retriever(toolbox: Toolbox, settings: ToolSettings) -> None:
    """Fails fast (one clear message) when an HTTP search service cannot answer a probe query."""
    if not settings.retriever_url or "search" not in toolbox.tags:
        return
    result = toolbox.run("search", "probe")
    if not result.ok:
        raise ConfigError(
            f"the retriever (tools.retriever_url={settings.retriever_url!r}) did not answer a "
            f"probe query: {result.status}: {result.error}. Start the service or fix the setting."
        )
