"""Dense retrieval: an e5 bi-encoder and a FAISS index over a JSONL corpus (the paper's retriever).

    retriever = DenseRetriever("/data/wiki18-e5", encoder="/ckpt/e5-base-v2")
    retriever.search(["who wrote hamlet"], topk=3)     # [[Passage, Passage, Passage]]

The index folder comes from ``python -m atpo_jax.tools.build_index`` (``dense_index``). Loading
checks its manifest against the corpus (sha256 of the file) and the encoder (hashes of its
config, weights and tokenizer), so an index is never searched with embeddings it was not built
for. Queries are encoded as ``"query: " + q`` in one batch per call, then searched together.

Concurrent calls (the rollout's tool threads, the server's request threads) are coalesced: one
batch runs at a time, and the calls that arrive meanwhile are encoded and searched together as the
next batch. A forward pass of 32 queries costs little more than one of a single query, while 32
concurrent single-query passes would fight over the same cores, so this is both faster and
bounded; it also serialises access to a GPU index, which FAISS does not make thread-safe.

The encoder runs in JAX (``atpo_jax.models.text_encoder``), imported only when this retriever is
built, so the rest of ``atpo_jax.tools`` stays JAX-free.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from typing import Any

from atpo_jax.tools import faiss_index
from atpo_jax.tools.base import Passage
from atpo_jax.tools.corpus import read_corpus
from atpo_jax.tools.dense_index import (
    check_corpus,
    check_encoder,
    load_manifest,
    read_faiss_index,
)

# Queries per forward pass: a whole retrieval-server request (its --max-queries default).
QUERY_BATCH = 512


class DenseRetriever:
    """Top-k inner-product search over an e5 index (implements ``tools.Retriever``).

    Args:
      index_dir: a folder built by ``python -m atpo_jax.tools.build_index``.
      encoder: the encoder checkpoint directory, or a ready ``TextEncoder``; default: the path in
        the manifest. Either way it must be the encoder the index was built with.
      corpus: the JSONL corpus; default: the path in the manifest. Must have the same bytes.
      dtype: the query encoder's compute dtype; default: the dtype the passages were encoded in.
      nprobe: IVF cells scanned per query (default: the manifest's); ``nprobe = nlist`` is exact.
      ef_search: HNSW candidate list size (default: the manifest's).
      use_gpu: put the FAISS index on the GPUs (None: when faiss-gpu sees one; flat and ivf).

    Raises:
      IndexMismatchError: the folder is not a finished index, or the corpus or encoder differ
        from those it was built with (the message names the file and the rebuild command).
      CorpusError: the corpus is missing or malformed.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        *,
        encoder: Any = None,
        corpus: str | os.PathLike[str] | None = None,
        dtype: str | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
        use_gpu: bool | None = None,
    ) -> None:
        self.index_dir = os.fspath(index_dir)
        self.manifest = manifest = load_manifest(self.index_dir)
        self.corpus_path = os.fspath(corpus) if corpus else manifest.corpus["path"]
        self.rows, sha = read_corpus(self.corpus_path)
        check_corpus(self.index_dir, manifest, self.corpus_path, sha, len(self.rows))
        if encoder is None or isinstance(encoder, (str, os.PathLike)):
            from atpo_jax.models.text_encoder import TextEncoder

            encoder = TextEncoder.from_pretrained(
                os.fspath(encoder or manifest.encoder["path"]),
                dtype=dtype or manifest.dtype,
                max_length=manifest.encoder["max_length"],
                batch_size=QUERY_BATCH,
            )
        check_encoder(self.index_dir, manifest, encoder.fingerprint())
        self.encoder = encoder
        options = manifest.index
        if nprobe is not None or ef_search is not None:
            options = dataclasses.replace(
                options,
                nprobe=nprobe or options.nprobe,
                ef_search=ef_search or options.ef_search,
            )
        self.options = options
        index = read_faiss_index(self.index_dir, manifest)
        self.index, self.on_gpu = faiss_index.to_search_device(index, options, use_gpu)
        faiss_index.set_search_parameters(self.index, options, on_gpu=self.on_gpu)
        self._batcher = _Coalescer(self._search_batch, max_items=QUERY_BATCH)
        self.batches_run = 0  # forward passes so far (each one coalesced batch of calls)

    @property
    def num_documents(self) -> int:
        return len(self.rows)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """Ranked passages for each query (``min(topk, N)`` of them, best first)."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not queries:
            return []
        return self._batcher(list(queries), min(topk, len(self.rows)))

    def _search_batch(self, queries: list[str], k: int) -> list[list[Passage]]:
        """One forward pass and one FAISS search for ``queries`` (the coalesced calls)."""
        self.batches_run += 1
        # A whole batch in one pass (padded to a power-of-two batch bucket).
        batch = max(QUERY_BATCH, self.encoder.batch_size)
        embeddings = self.encoder.encode_queries(queries, batch_size=batch)
        scores, ids = faiss_index.search(self.index, embeddings, k)
        return [
            [
                Passage(document=self.rows[i], score=float(s))
                for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]


class _Call:
    """One caller's queries waiting in a :class:`_Coalescer`, and what it gets back."""

    def __init__(self, queries: list[str], k: int) -> None:
        self.queries, self.k = queries, k
        self.result: list[list[Passage]] | None = None
        self.error: BaseException | None = None
        self.done = False


class _Coalescer:
    """Runs ``fn(queries, k)`` for concurrent callers together, one batch at a time.

    A caller queues its call; if no batch is running it becomes the runner: it takes every queued
    call (up to ``max_items`` queries, at least one call), runs them as one batch with the largest
    ``k`` among them, hands each call its rows cut to its own ``k``, and then, if its own call was
    not in that batch, runs the next. Nobody waits for a timer: a lone call runs at once.
    An exception fails every call of its batch and no other.
    """

    def __init__(self, fn: Any, *, max_items: int) -> None:
        self._fn, self._max_items = fn, max_items
        self._cond = threading.Condition()
        self._queue: list[_Call] = []
        self._running = False

    def __call__(self, queries: list[str], k: int) -> list[list[Passage]]:
        call = _Call(queries, k)
        with self._cond:
            self._queue.append(call)
            while not call.done:
                if self._running:
                    self._cond.wait()
                    continue
                batch = self._take()
                self._running = True
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _take(self) -> list[_Call]:
        batch = [self._queue.pop(0)]
        size = len(batch[0].queries)
        while self._queue and size + len(self._queue[0].queries) <= self._max_items:
            size += len(self._queue[0].queries)
            batch.append(self._queue.pop(0))
        return batch

    def _run(self, batch: list[_Call]) -> None:
        try:
            rows = self._fn([q for call in batch for q in call.queries], max(c.k for c in batch))
        except BaseException as e:  # handed to each caller, raised in its own thread
            for call in batch:
                call.error, call.done = e, True
            return
        start = 0
        for call in batch:
            call.result = [hits[: call.k] for hits in rows[start : start + len(call.queries)]]
            start += len(call.queries)
            call.done = True
