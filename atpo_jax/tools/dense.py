"""Dense retrieval: an e5 bi-encoder and a FAISS index over a JSONL corpus (the paper's retriever).

    retriever = DenseRetriever("/data/wiki18-e5", encoder="/ckpt/e5-base-v2")
    retriever.search(["who wrote hamlet"], topk=3)     # [[Passage, Passage, Passage]]

The index folder comes from ``python -m atpo_jax.tools.build_index`` (``dense_index``). Loading
checks its manifest against the corpus (sha256 of the file) and the encoder (hashes of its
config, weights and tokenizer), so an index is never searched with embeddings it was not built
for. Queries are encoded as ``"query: " + q`` in one batch per call, then searched together.

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
        # FAISS CPU searches may run concurrently; GPU indexes are not thread-safe.
        self._search_lock = threading.Lock() if self.on_gpu else None

    @property
    def num_documents(self) -> int:
        return len(self.rows)

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """Ranked passages for each query (``min(topk, N)`` of them, best first)."""
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if not queries:
            return []
        # One forward pass for a whole request (padded to a power-of-two batch bucket).
        batch = max(QUERY_BATCH, self.encoder.batch_size)
        embeddings = self.encoder.encode_queries(list(queries), batch_size=batch)
        k = min(topk, len(self.rows))
        if self._search_lock is None:
            scores, ids = faiss_index.search(self.index, embeddings, k)
        else:
            with self._search_lock:
                scores, ids = faiss_index.search(self.index, embeddings, k)
        return [
            [
                Passage(document=self.rows[i], score=float(s))
                for s, i in zip(row_scores, row_ids, strict=True)
                if i >= 0
            ]
            for row_scores, row_ids in zip(scores, ids, strict=True)
        ]
