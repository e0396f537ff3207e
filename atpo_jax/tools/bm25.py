"""Embedded BM25 retriever over a JSONL corpus, built on the ``bm25s`` library.

The index is built once per (corpus bytes, BM25 parameters, bm25s version) and cached on disk under
``index_dir/<key>/``; later runs (and other processes on the same host) load it instead of re-indexing. The
cache directory is written under a temporary name and renamed into place, so a crash or a concurrent build
never leaves a half-written index that a later run would trust.

The cache is only a cache: when the default folder next to the corpus (``<corpus>.bm25s``) cannot be
written (a read-only dataset mount), the index is kept in memory with a warning and rebuilt by every
process that starts. A folder passed explicitly (``index_dir``, the retrieval server's
``--index-dir``) that cannot be written is an error naming it, since caching there was asked for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from atpo_jax.tools.base import Passage
from atpo_jax.tools.corpus import CorpusError, read_corpus

logger = logging.getLogger(__name__)

_IMPORT_LOCK = threading.Lock()


def import_bm25s() -> ModuleType:
    """Imports ``bm25s`` without letting it pull in JAX.

    ``bm25s.selection`` imports ``jax.lax`` at import time whenever JAX is installed and runs a small
    computation with it, which initialises an accelerator backend (and, on GPU, pre-allocates most of the
    device memory) in processes that only want BM25, such as the retrieval server. We always use the NumPy
    top-k, so when JAX is not already loaded we hide it for the duration of the import. In a process that
    already imported JAX (the trainer) nothing is hidden, which is harmless.
    """
    with _IMPORT_LOCK:
        if "bm25s" in sys.modules:
            return sys.modules["bm25s"]
        if "jax" in sys.modules:
            import bm25s
        else:
            sys.modules["jax"] = None  # type: ignore[assignment]  # `import jax...` raises ImportError
            try:
                import bm25s
            finally:
                del sys.modules["jax"]
        # bm25s sets its own logger to DEBUG, which absl's handler then prints on every index build.
        logging.getLogger("bm25s").setLevel(logging.WARNING)
        return bm25s


@dataclasses.dataclass(frozen=True)
class BM25Params:
    """BM25 scoring parameters (bm25s defaults, Lucene variant) and query/document tokenisation."""

    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stopwords: str | None = "en"


class LocalBM25Retriever:
    """BM25 search over a JSONL corpus (``id``, ``contents``), thread-safe, no service needed.

    Args:
      corpus_path: the JSONL corpus.
      index_dir: where cached indexes live; defaults to ``<corpus_path>.bm25s`` next to the corpus.
      params: BM25 parameters.

    Only documents that share at least one (non-stopword) token with the query are returned, so a query
    with no match gives an empty list (formatted as "No search results found."). Ties are broken by corpus
    order, which makes results reproducible.
    """

    def __init__(
        self,
        corpus_path: str | os.PathLike[str],
        *,
        index_dir: str | os.PathLike[str] | None = None,
        params: BM25Params = BM25Params(),
    ) -> None:
        self._bm25s = import_bm25s()
        self.corpus_path = os.fspath(corpus_path)
        self.params = params
        self.rows, corpus_sha = read_corpus(self.corpus_path)
        root = os.fspath(index_dir) if index_dir is not None else self.corpus_path + ".bm25s"
        self.index_path = os.path.join(root, self._cache_key(corpus_sha))
        self._model = self._load_or_build(root, explicit_dir=index_dir is not None)
        self._vocab: dict[str, int] = self._model.vocab_dict

    def _cache_key(self, corpus_sha: str) -> str:
        spec = {
            "corpus_sha256": corpus_sha,
            "params": dataclasses.asdict(self.params),
            "bm25s": getattr(self._bm25s, "__version__", "unknown"),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def _tokenize(self, texts: Sequence[str]) -> list[list[str]]:
        return self._bm25s.tokenize(
            list(texts),
            stopwords=self.params.stopwords,
            return_ids=False,
            show_progress=False,
        )

    def _load_or_build(self, root: str, *, explicit_dir: bool) -> Any:
        if os.path.isdir(self.index_path):
            return self._bm25s.BM25.load(self.index_path, load_corpus=False, show_progress=False)
        model = self._bm25s.BM25(k1=self.params.k1, b=self.params.b, method=self.params.method)
        model.index(self._corpus_tokens(), show_progress=False)
        try:
            self._save(model, root)
        except OSError as e:
            if explicit_dir:
                raise CorpusError(
                    f"BM25 index folder {root!r} cannot be written ({e.strerror or e}): pass a "
                    "writable one (the retrieval server's --index-dir) or fix its permissions"
                ) from e
            logger.warning(
                "BM25 index folder %r cannot be written (%s): the index of %s stays in memory and "
                "is rebuilt at every start; make the folder writable, or run the retrieval server "
                "with a writable --index-dir (and point tools.retriever_url at it)",
                root,
                e.strerror or e,
                self.corpus_path,
            )
        return model

    def _corpus_tokens(self) -> Any:
        """The passages tokenised for indexing; a corpus with no indexable word is a
        ``CorpusError`` (bm25s would fail on its empty vocabulary with a bare ``ValueError``)."""
        nothing = CorpusError(
            f"{self.corpus_path}: no passage has a word BM25 can index (all {len(self.rows)} are "
            f"empty or only stopwords, stopwords={self.params.stopwords!r}); check the corpus"
        )
        try:
            tokens = self._bm25s.tokenize(
                [row["contents"] for row in self.rows],
                stopwords=self.params.stopwords,
                show_progress=False,
            )
        except ValueError as e:  # max() of the empty vocabulary
            raise nothing from e
        if not tokens.vocab:
            raise nothing
        return tokens

    def _save(self, model: Any, root: str) -> None:
        os.makedirs(root, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".building-", dir=root)
        try:
            model.save(staging, show_progress=False)
            with open(os.path.join(staging, "atpo_index.json"), "w") as f:
                json.dump(
                    {
                        "corpus": os.path.abspath(self.corpus_path),
                        **dataclasses.asdict(self.params),
                    },
                    f,
                )
            try:
                os.rename(staging, self.index_path)
            except OSError:
                # Another process finished the same index first; both are identical, keep theirs.
                if not os.path.isdir(self.index_path):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @property
    def num_documents(self) -> int:
        return len(self.rows)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """Ranked passages for each query (at most ``topk``, best first, ties by corpus order)."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        results: list[list[Passage]] = []
        for tokens in self._tokenize(queries):
            ids = [self._vocab[t] for t in tokens if t in self._vocab]
            if not ids:
                results.append([])
                continue
            scores = np.asarray(self._model.get_scores_from_ids(ids))
            matched = np.flatnonzero(scores > 0)
            if len(matched) > topk:
                # Keep only candidates at least as good as the k-th best score (ties included), so the
                # exact sort below is over ~k documents instead of every document sharing a term.
                kth_best = np.partition(scores[matched], len(matched) - topk)[len(matched) - topk]
                matched = matched[scores[matched] >= kth_best]
            # lexsort sorts by the last key first: score descending, then document index ascending.
            order = matched[np.lexsort((matched, -scores[matched]))][:topk]
            results.append([Passage(document=self.rows[i], score=float(scores[i])) for i in order])
        return results
