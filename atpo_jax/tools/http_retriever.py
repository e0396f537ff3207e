"""Client for the Search-R1/ATPO retrieval protocol: ``POST /retrieve`` (ALGORITHM.md §6).

Request body ``{"queries": [...], "topk": k, "return_scores": true}``; response ``{"result": [...]}`` in either
of the reference server's shapes (see :mod:`atpo_jax.tools.passages`). Differences from the reference client
(DESIGN.md §9): connect/read timeouts, a bounded number of attempts with exponential backoff, a hard deadline
on every call, batching of concurrent queries into one request, and an optional record/replay cache.

Batching: ``search`` may be called from many rollout threads at once. Each call queues its queries; a
dispatcher thread waits up to ``batch_wait_s`` for more, then sends everything queued for the same ``topk``
(duplicates sent once, at most ``max_batch_size`` queries) as one request, on up to ``max_in_flight``
concurrent connections. The server therefore sees a few large batches instead of 32 single-query requests,
which is what dense retrievers are fast at.

Errors: timeouts, connection errors, 5xx and 429 are retried with backoff (the retrieval server answers 503
when it is busy). Other 4xx are not: they raise :class:`~atpo_jax.tools.base.RetrievalError` with the
server's message at once. A 413 or 422 (the request broke a server limit, e.g. a query over
``--max-query-chars``) for a batch of several calls is resent call by call, so only the offending call fails.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence

import httpx

from atpo_jax.tools.base import Passage, RetrievalError
from atpo_jax.tools.cache import RetrievalCache
from atpo_jax.tools.passages import MalformedResponseError, parse_retrieve_response

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Timeouts and retries of one batched request.

    Attributes:
      connect_timeout_s: TCP connect timeout.
      read_timeout_s: longest wait for the server to send the next bytes of a response.
      max_attempts: total attempts per request (reference: 4 "retries", no backoff, no timeout).
      backoff_initial_s: sleep before the 2nd attempt; doubles each attempt.
      backoff_max_s: cap on a single sleep.
    """

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 4
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 8.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RetryPolicy.{name} must be > 0, got {getattr(self, name)}")

    def backoff(self, attempt: int) -> float:
        """Sleep after failed attempt number ``attempt`` (0-based)."""
        return min(self.backoff_initial_s * (2**attempt), self.backoff_max_s)

    def deadline_s(self) -> float:
        """Upper bound on the time one request can take, all attempts and sleeps included."""
        # Writes are bounded by the connect timeout too (tiny JSON bodies); +1 s for scheduling slack.
        per_attempt = 2 * self.connect_timeout_s + self.read_timeout_s
        sleeps = sum(self.backoff(a) for a in range(self.max_attempts - 1))
        return self.max_attempts * per_attempt + sleeps + 1.0


class _RetryableError(Exception):
    pass


class _RejectedError(RetrievalError):
    """The server refused the request itself (HTTP 4xx other than 429): retrying cannot help."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


# Rejections caused by what was asked (a server limit, e.g. an over-long query), not by the URL: when a
# batch of several calls gets one, each call is resent alone so only the offending one fails.
_PER_REQUEST_REJECTIONS = (413, 422)


def _rejection_message(url: str, response: httpx.Response) -> str:
    detail: object = response.text[:300]
    with contextlib.suppress(ValueError, AttributeError):
        detail = response.json().get("detail", detail)  # our server's {"detail": "..."}
    if response.status_code in (404, 405):
        hint = "check the retriever url (it should end in /retrieve)"
    elif response.status_code in _PER_REQUEST_REJECTIONS:
        hint = "the request breaks a server limit or the protocol; the detail says which"
    else:
        hint = "check the retriever url and the server's log"
    return (
        f"retrieval service at {url} rejected the request with HTTP {response.status_code}: "
        f"{str(detail)[:300]!r}; {hint}"
    )


@dataclasses.dataclass(eq=False)  # identity hashing: pending calls live in a set
class _Pending:
    queries: list[str]
    topk: int
    future: concurrent.futures.Future


def _fail(item: _Pending, error: RetrievalError) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # already answered
        item.future.set_exception(error)


class HttpRetriever:
    """Thread-safe client of a ``POST /retrieve`` service.

    Args:
      url: the endpoint, e.g. ``"http://127.0.0.1:8000/retrieve"`` (a URL without a path gets
        ``/retrieve`` appended).
      retry: timeouts and retries.
      max_batch_size: most queries sent in one request.
      batch_wait_s: how long the dispatcher waits for more concurrent queries before sending (0 = send
        whatever is queued right away).
      max_in_flight: concurrent requests to the server.
      cache_path: optional record/replay cache file (see :mod:`atpo_jax.tools.cache`).
      cache_mode: ``"record"`` or ``"replay"`` (replay never contacts the service).
      trust_env: honour ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` from the environment. Off by default
        because a retrieval service is normally on the same host or cluster, and a proxy setting meant
        for downloads would otherwise capture loopback traffic.

    ``search`` raises :class:`~atpo_jax.tools.base.RetrievalError` after the retry budget is spent, and never
    blocks longer than :meth:`RetryPolicy.deadline_s` plus the batching wait.
    """

    def __init__(
        self,
        url: str,
        *,
        retry: RetryPolicy = RetryPolicy(),
        max_batch_size: int = 64,
        batch_wait_s: float = 0.005,
        max_in_flight: int = 4,
        cache_path: str | os.PathLike[str] | None = None,
        cache_mode: str = "record",
        trust_env: bool = False,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"retriever url must start with http:// or https://, got {url!r} "
                "(e.g. http://127.0.0.1:8000/retrieve)"
            )
        if httpx.URL(url).path in ("", "/"):
            url = url.rstrip("/") + "/retrieve"
        if max_batch_size < 1 or max_in_flight < 1 or batch_wait_s < 0:
            raise ValueError(
                "HttpRetriever needs max_batch_size >= 1, max_in_flight >= 1 and batch_wait_s >= 0, got "
                f"{max_batch_size}, {max_in_flight}, {batch_wait_s}"
            )
        self.url = url
        self.retry = retry
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.cache = RetrievalCache(cache_path, cache_mode) if cache_path is not None else None
        self._client = httpx.Client(
            timeout=httpx.Timeout(
                connect=retry.connect_timeout_s,
                read=retry.read_timeout_s,
                write=retry.connect_timeout_s,
                pool=retry.read_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=max_in_flight, max_keepalive_connections=max_in_flight
            ),
            trust_env=trust_env,
        )
        self._senders = concurrent.futures.ThreadPoolExecutor(
            max_in_flight, thread_name_prefix="retrieve-send"
        )
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = threading.Event()
        self._dispatcher: threading.Thread | None = None
        self._start_lock = threading.Lock()
        # Calls not yet answered, so close() can fail them instead of leaving callers waiting.
        self._outstanding: set[_Pending] = set()
        self._stats_lock = threading.Lock()
        # HTTP requests attempted, retries included (for tests and benchmarks).
        self.requests_sent = 0

    # ----------------------------------------------------------------------------------------- public

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        queries = [str(q) for q in queries]
        results: list[list[Passage] | None] = [None] * len(queries)
        missing: list[int] = []
        for i, q in enumerate(queries):
            hit = self.cache.get(q, topk) if self.cache is not None else None
            if hit is not None:
                results[i] = hit
            elif self.cache is not None and self.cache.mode == "replay":
                raise self.cache.miss_error(q, topk)
            else:
                missing.append(i)
        if missing:
            fetched = self._fetch([queries[i] for i in missing], topk)
            for i, passages in zip(missing, fetched, strict=True):
                results[i] = passages
                if self.cache is not None:
                    self.cache.put(queries[i], topk, passages)
        return [r if r is not None else [] for r in results]

    def close(self) -> None:
        """Stops the dispatcher, fails queued calls, and closes connections (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(None)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        self._senders.shutdown(wait=False, cancel_futures=True)
        with self._start_lock:
            outstanding = list(self._outstanding)
        for item in outstanding:
            _fail(item, RetrievalError("HttpRetriever was closed"))
        self._client.close()

    def __enter__(self) -> HttpRetriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- batching

    def _fetch(self, queries: list[str], topk: int) -> list[list[Passage]]:
        if self._closed.is_set():
            raise RetrievalError("HttpRetriever is closed")
        self._ensure_dispatcher()
        pending = _Pending(queries, topk, concurrent.futures.Future())
        with self._start_lock:
            self._outstanding.add(pending)
        self._queue.put(pending)
        timeout = self.retry.deadline_s() + self.batch_wait_s
        try:
            return pending.future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise RetrievalError(
                f"retrieval service at {self.url} did not answer within {timeout:.1f} s"
            ) from None
        finally:
            with self._start_lock:
                self._outstanding.discard(pending)

    def _ensure_dispatcher(self) -> None:
        with self._start_lock:
            if self._dispatcher is None:
                self._dispatcher = threading.Thread(
                    target=self._dispatch_loop, name="retrieve-dispatch", daemon=True
                )
                self._dispatcher.start()

    def _dispatch_loop(self) -> None:
        carry: list[_Pending] = []  # queued calls with a different topk than the batch being built
        try:
            self._dispatch(carry)
        finally:
            for item in carry:
                _fail(item, RetrievalError("HttpRetriever was closed"))

    def _dispatch(self, carry: list[_Pending]) -> None:
        while not self._closed.is_set():
            if carry:
                first = carry.pop(0)
            else:
                first = self._queue.get()
                if first is None:
                    return
            batch, size = [first], len(first.queries)
            deadline = time.monotonic() + self.batch_wait_s
            while size < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # let the outer loop see the shutdown signal
                    break
                if item.topk == first.topk and size + len(item.queries) <= self.max_batch_size:
                    batch.append(item)
                    size += len(item.queries)
                else:
                    carry.append(item)
            try:
                self._senders.submit(self._send_batch, batch)
            except RuntimeError:  # executor shut down by close()
                for item in batch:
                    _fail(item, RetrievalError("HttpRetriever was closed"))
                return

    def _send_batch(self, batch: list[_Pending]) -> None:
        unique = list(dict.fromkeys(q for item in batch for q in item.queries))
        try:
            by_query = dict(
                zip(unique, self._post_with_retries(unique, batch[0].topk), strict=True)
            )
        except _RejectedError as e:
            if len(batch) > 1 and e.status_code in _PER_REQUEST_REJECTIONS:
                for item in batch:
                    self._send_batch([item])
                return
            for item in batch:
                _fail(item, e)
            return
        except RetrievalError as e:
            for item in batch:
                _fail(item, e)
            return
        except Exception as e:  # never leave a caller waiting on a future nobody will complete
            for item in batch:
                _fail(item, RetrievalError(f"unexpected client error: {e!r}"))
            return
        for item in batch:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # failed by close()
                item.future.set_result([by_query[q] for q in item.queries])

    # ----------------------------------------------------------------------------------------- transport

    def _post_with_retries(self, queries: list[str], topk: int) -> list[list[Passage]]:
        payload = {"queries": queries, "topk": topk, "return_scores": True}
        last_error = "no attempt made"
        for attempt in range(self.retry.max_attempts):
            if attempt:
                time.sleep(self.retry.backoff(attempt - 1))
            if self._closed.is_set():
                raise RetrievalError("HttpRetriever was closed")
            try:
                return self._post_once(payload, len(queries))
            except _RetryableError as e:
                last_error = str(e)
                logger.warning(
                    "retrieval attempt %d/%d to %s failed: %s",
                    attempt + 1,
                    self.retry.max_attempts,
                    self.url,
                    last_error,
                )
        raise RetrievalError(
            f"retrieval service at {self.url} failed after {self.retry.max_attempts} attempts "
            f"(last error: {last_error}); check that it is running, e.g. "
            "`python -m atpo_jax.tools.retrieval_server --corpus CORPUS.jsonl`, or raise the timeouts"
        )

    def _post_once(self, payload: dict, num_queries: int) -> list[list[Passage]]:
        with self._stats_lock:
            self.requests_sent += 1
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.TimeoutException as e:
            raise _RetryableError(f"timeout ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise _RetryableError(f"connection error ({type(e).__name__}: {e})") from None
        if response.status_code >= 500 or response.status_code == 429:
            raise _RetryableError(f"HTTP {response.status_code}: {response.text[:200]!r}")
        if response.status_code != 200:
            # A 4xx will not get better by retrying: the request or the URL is wrong.
            raise _RejectedError(_rejection_message(self.url, response), response.status_code)
        try:
            return parse_retrieve_response(json.loads(response.content), num_queries)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _RetryableError(f"response is not valid JSON ({e})") from None
        except MalformedResponseError as e:
            raise _RetryableError(f"malformed response: {e}") from None
