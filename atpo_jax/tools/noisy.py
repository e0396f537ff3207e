"""A retriever whose top-k sometimes misses: seeded, per-query retrieval noise over any retriever.

``NoisyRetriever(base, miss_rate=r, seed=s)`` answers a query like ``base`` does, except that for a
share ``r`` of the queries the best passage is dropped and the next one moves up (the list keeps its
``topk`` length when ``base`` has more hits). Whether a query misses is a pure function of
``(seed, query)`` (SHA-256 of both, the query's whitespace collapsed and lower-cased, as BM25 sees
it), so the same query always gets the same answer, in any process, thread or batch, and a
*different* query (a re-query with another word) is an independent draw. The synthetic ``noisy`` and
``mixed`` worlds record their rate and seed in ``manifest.json`` (``world.retrieval``), and
``atpo_jax.data.synthetic.world_retriever`` applies them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from atpo_jax.tools.base import Passage, Retriever


def miss_draw(query: str, seed: int) -> float:
    """The query's uniform draw in [0, 1): it misses when the draw is below the miss rate."""
    text = " ".join(query.split()).lower()
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class NoisyRetriever:
    """Wraps ``base`` (any :class:`~atpo_jax.tools.base.Retriever`); see the module docstring.

    Args:
      base: the retriever asked for ``topk + 1`` passages per query.
      miss_rate: share of queries whose best passage is dropped, in [0, 1).
      seed: the noise seed.
    """

    def __init__(self, base: Retriever, *, miss_rate: float, seed: int = 0) -> None:
        if not 0 <= miss_rate < 1:
            raise ValueError(f"retrieval miss_rate must be in [0, 1), got {miss_rate}")
        self.base = base
        self.miss_rate = miss_rate
        self.seed = seed

    def misses(self, query: str) -> bool:
        """Whether this query's top-k misses its best passage."""
        return miss_draw(query, self.seed) < self.miss_rate

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        results = self.base.search(queries, topk + 1)
        return [
            list(hits[1 : topk + 1]) if self.misses(query) else list(hits[:topk])
            for query, hits in zip(queries, results, strict=True)
        ]
