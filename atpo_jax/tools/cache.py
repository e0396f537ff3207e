"""On-disk record/replay cache of retrieval results, so an evaluation can be re-run without the service.

The file is JSONL, one ``{"query", "topk", "passages": [{"document", "score"}]}`` object per line, appended
and flushed as results arrive (a crash loses at most the line being written). Modes:

* ``"record"``: answer from the cache when possible, otherwise ask the service and append the answer.
* ``"replay"``: answer only from the cache; a query that is not there is an error naming the cache file,
  and the service is never contacted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from atpo_jax.tools.base import Passage, RetrievalError

logger = logging.getLogger(__name__)

CACHE_MODES = ("record", "replay")


class CacheFileError(ValueError):
    """The cache file has a malformed line."""


class RetrievalCache:
    """Thread-safe (query, topk) -> passages map backed by an append-only JSONL file."""

    def __init__(self, path: str | os.PathLike[str], mode: str = "record") -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"retrieval cache mode must be one of {CACHE_MODES}, got {mode!r}")
        self.path = os.fspath(path)
        self.mode = mode
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, int], list[Passage]] = {}
        if mode == "replay" and not os.path.isfile(self.path):
            raise RetrievalError(
                f"retrieval cache {self.path!r} does not exist; record it first with cache mode 'record'"
            )
        if os.path.isfile(self.path):
            self._load()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        # The text after the last newline is either "" or a line cut short by a crash while appending.
        if lines[-1].strip():
            logger.warning(
                "retrieval cache %s: ignoring an incomplete last line (a crash while writing?)",
                self.path,
            )
        for lineno, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = (str(record["query"]), int(record["topk"]))
                passages = [
                    Passage(document=p["document"], score=p.get("score"))
                    for p in record["passages"]
                ]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise CacheFileError(
                    f"{self.path} line {lineno}: malformed cache record ({e}); delete the line or the file"
                ) from None
            self._entries[key] = passages
        if lines[-1].strip() and self.mode == "record":
            # Drop the partial line so the next append starts on a fresh line (replay never writes).
            with open(self.path, "r+", encoding="utf-8") as f:
                f.truncate(len("\n".join(lines[:-1]).encode()) + (1 if len(lines) > 1 else 0))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, query: str, topk: int) -> list[Passage] | None:
        with self._lock:
            return self._entries.get((query, topk))

    def put(self, query: str, topk: int, passages: list[Passage]) -> None:
        if self.mode == "replay":
            return
        record: dict[str, Any] = {
            "query": query,
            "topk": topk,
            "passages": [p.to_json() for p in passages],
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            if (query, topk) in self._entries:
                return
            self._entries[(query, topk)] = passages
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()

    def miss_error(self, query: str, topk: int) -> RetrievalError:
        return RetrievalError(
            f"query {query!r} (topk={topk}) is not in the replay cache {self.path!r}; "
            "re-record it with cache mode 'record' against a running retrieval service"
        )
