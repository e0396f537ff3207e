"""Retrieval service (BM25 or dense e5/FAISS), speaking the reference protocol (ALGORITHM.md §6.1).

Run it with::

    python -m atpo_jax.tools.retrieval_server --corpus corpus.jsonl [--host 127.0.0.1] [--port 8000]
    python -m atpo_jax.tools.retrieval_server --method dense --index INDEX_DIR [--encoder DIR]

``--method bm25`` (the default) indexes ``--corpus`` with the embedded BM25 retriever. ``--method
dense`` serves an index built by ``python -m atpo_jax.tools.build_index`` (``--encoder`` and
``--corpus`` default to the ones recorded in its manifest, and are checked against it); the
queries of one request are encoded in one batch.

``POST /retrieve`` takes ``{"queries": [...], "topk": k, "return_scores": bool}`` (a missing or 0 ``topk``
means the server default) and answers ``{"result": [...]}``, one list per query: ``{"document": row,
"score": s}`` objects when ``return_scores`` is true, plain corpus rows otherwise. ``GET /health`` answers
``{"status": "ok", "documents": N}`` for readiness checks. Unlike the reference (which listens on 0.0.0.0),
the default bind address is loopback; pass ``--host 0.0.0.0`` to serve other machines.

Limits (:class:`ServerLimits`; each is a CLI flag, shown with its default). A request over a limit is
answered with a JSON ``{"detail": "..."}`` that names the limit and the flag that raises it:

* ``--max-body-bytes 1048576``: larger bodies get 413, from ``Content-Length`` before the body is read, or
  as soon as a chunked body passes the limit (at most the limit is ever buffered).
* ``--max-queries 512``, ``--max-query-chars 2000``, ``--max-topk 100``: more queries, a longer query or a
  larger ``topk`` get 422. A ``topk`` that is not a whole number from 0 to the limit (NaN, inf, -1, 2.5,
  "abc") is a 422 too; a body that is not JSON is a 400.
* ``--max-concurrent-requests 16``: searches running at once; more get 503 with ``Retry-After`` right away
  (the HTTP client retries those with backoff) instead of queueing without bound.
* ``--max-connections 256``: open connections; a request on a connection beyond this gets uvicorn's 503.
* ``--header-timeout 10``: a connection that has not sent a request's complete headers this many seconds
  after it opened (or after the first byte of a request on a kept-alive connection) is closed. uvicorn
  alone does not do this: its keep-alive timer runs only between requests and stops at the first byte.
* ``--body-timeout 30``: the body must arrive within this many seconds of the headers, else 408.
* ``--keep-alive-timeout 5``: an idle kept-alive connection is closed after this many seconds.

Request headers are capped at 16 KiB by h11 (a larger header block gets 400).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread
import fastapi
import h11
import pydantic
import starlette.requests
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from atpo_jax.tools.base import Retriever
from atpo_jax.tools.bm25 import LocalBM25Retriever
from atpo_jax.tools.corpus import CorpusError
from atpo_jax.tools.passages import render_retrieve_response

logger = logging.getLogger(__name__)

# uvicorn exits with this status when the server cannot start (e.g. the port is taken).
_STARTUP_FAILURE = 3
_CLOSE = {"connection": "close"}


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Bounds on what one client can make the server do (module docstring: status codes, flags).

    Attributes:
      max_body_bytes: largest request body.
      max_queries: most queries in one request.
      max_query_chars: longest query, in characters.
      max_topk: largest ``topk``.
      max_concurrent_requests: searches running at once; more get 503.
      max_connections: open connections; requests on more get 503 (uvicorn ``limit_concurrency``).
      header_timeout_s: time for a client to send a request's headers before the connection is closed.
      body_timeout_s: time for the body to arrive after the headers (408 after it).
      keep_alive_timeout_s: idle time after which a kept-alive connection is closed.
    """

    max_body_bytes: int = 1 << 20
    max_queries: int = 512
    max_query_chars: int = 2000
    max_topk: int = 100
    max_concurrent_requests: int = 16
    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ServerLimits.{field.name} must be > 0, got {value!r}")
            if isinstance(field.default, int) and not isinstance(value, int):
                raise ValueError(f"ServerLimits.{field.name} must be an integer, got {value!r}")


def limit_flag(name: str) -> str:
    """The CLI flag of limit ``name``: ``max_body_bytes`` -> ``--max-body-bytes``, ``header_timeout_s`` ->
    ``--header-timeout``."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def _over_limit(what: str, name: str, limits: ServerLimits) -> str:
    return f"{what}; the limit is {name}={getattr(limits, name)} (raise it with {limit_flag(name)})"


class RetrieveRequest(pydantic.BaseModel):
    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


# ----------------------------------------------------------------------------------------- request checks


async def _read_body(request: fastapi.Request, limits: ServerLimits) -> bytes:
    """The request body, refusing to hold more than ``max_body_bytes`` or to wait past ``body_timeout_s``.

    413/408 responses close the connection: the rest of the body is unread, so the connection cannot carry
    another request.
    """
    declared = request.headers.get("content-length")
    if declared is not None and (len(declared) > 18 or int(declared) > limits.max_body_bytes):
        what = f"request body is {declared} bytes (Content-Length)"
        raise fastapi.HTTPException(413, _over_limit(what, "max_body_bytes", limits), _CLOSE)
    chunks: list[bytes] = []
    size = 0
    try:
        with anyio.fail_after(limits.body_timeout_s):
            # Without Content-Length (chunked), count while streaming; uvicorn itself buffers at most
            # 64 KiB ahead of what we consume before it pauses reading the socket.
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    what = f"request body is over {limits.max_body_bytes} bytes"
                    raise fastapi.HTTPException(
                        413, _over_limit(what, "max_body_bytes", limits), _CLOSE
                    )
                chunks.append(chunk)
    except TimeoutError:
        what = f"request body did not arrive within {limits.body_timeout_s} s"
        raise fastapi.HTTPException(
            408, _over_limit(what, "body_timeout_s", limits), _CLOSE
        ) from None
    except starlette.requests.ClientDisconnect:
        # Nobody is left to read an answer; a 400 ends the request quietly instead of a logged traceback.
        raise fastapi.HTTPException(400, "client disconnected during the request body") from None
    return b"".join(chunks)


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (
        ValueError,
        RecursionError,
    ) as e:  # JSONDecodeError, bad UTF-8, >4300-digit ints, deep nesting
        raise fastapi.HTTPException(
            400,
            f"request body is not valid JSON ({str(e)[:200] or type(e).__name__}); expected "
            '{"queries": [...], "topk": k, "return_scores": bool}',
        ) from None
    if not isinstance(payload, dict):
        raise fastapi.HTTPException(
            422,
            'request body must be a JSON object {"queries": [...], "topk": k, "return_scores": bool}, '
            f"got a JSON {type(payload).__name__}",
        )
    return payload


def _check_queries(queries: Any, limits: ServerLimits) -> None:
    """Count and length limits, checked before validating every query so oversized input fails fast."""
    if not isinstance(queries, list):
        return  # not a list: the schema check reports it
    if len(queries) > limits.max_queries:
        what = f"request has {len(queries)} queries"
        raise fastapi.HTTPException(422, _over_limit(what, "max_queries", limits))
    for i, query in enumerate(queries):
        if isinstance(query, str) and len(query) > limits.max_query_chars:
            what = f"query {i} has {len(query)} characters"
            raise fastapi.HTTPException(422, _over_limit(what, "max_query_chars", limits))


def _check_topk(topk: Any, limits: ServerLimits, default_topk: int) -> int:
    """``topk`` as an int in [1, max_topk]; missing or 0 means ``default_topk`` (reference behaviour)."""
    # json.loads reads NaN and Infinity as floats; is_integer() is False for both. A whole float (3.0) is
    # accepted because some JSON encoders write every number as a float.
    whole = isinstance(topk, int) or (isinstance(topk, float) and topk.is_integer())
    if isinstance(topk, bool) or (topk is not None and not whole):
        raise fastapi.HTTPException(
            422,
            f"topk must be a whole number from 0 to {limits.max_topk} (0 or missing: the server default "
            f"{default_topk}), got {_brief(topk)}",
        )
    if topk is None or topk == 0:
        return default_topk
    if topk < 0:
        raise fastapi.HTTPException(422, f"topk must be >= 0, got {_brief(topk)}")
    if topk > limits.max_topk:
        raise fastapi.HTTPException(422, _over_limit(f"topk is {_brief(topk)}", "max_topk", limits))
    return int(topk)


def _brief(value: Any) -> str:
    text = "NaN" if isinstance(value, float) and math.isnan(value) else repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _validate(payload: dict[str, Any], topk: int) -> RetrieveRequest:
    try:
        return RetrieveRequest.model_validate({**payload, "topk": topk})
    except pydantic.ValidationError as e:
        # Our own message: FastAPI's default echoes the input (megabytes, or a NaN it cannot encode).
        errors = e.errors(include_input=False)
        parts = [f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise fastapi.HTTPException(422, "invalid request: " + "; ".join(parts) + more) from None


def parse_retrieve_request(body: bytes, limits: ServerLimits, default_topk: int) -> RetrieveRequest:
    """Parses and checks a ``POST /retrieve`` body; raises :class:`fastapi.HTTPException` (4xx) if it is bad."""
    payload = _parse_json(body)
    _check_queries(payload.get("queries"), limits)
    topk = _check_topk(payload.get("topk"), limits, default_topk)
    return _validate(payload, topk)


class _ConcurrencyGate:
    """Counts searches in progress; a request that finds all slots taken is refused, not queued.

    Touched only from the event loop thread, so a plain counter is enough.
    """

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.in_flight = 0

    def enter(self) -> None:
        if self.in_flight >= self.limits.max_concurrent_requests:
            what = f"server busy: {self.in_flight} searches in progress"
            raise fastapi.HTTPException(
                503,
                _over_limit(what, "max_concurrent_requests", self.limits) + "; retry later",
                {"retry-after": "1"},
            )
        self.in_flight += 1

    def exit(self) -> None:
        self.in_flight -= 1


# ----------------------------------------------------------------------------------------- app


def create_app(
    retriever: Retriever,
    *,
    default_topk: int = 3,
    num_documents: int | None = None,
    limits: ServerLimits = ServerLimits(),
) -> fastapi.FastAPI:
    """A FastAPI app serving ``retriever`` with the reference request/response shapes.

    ``limits`` is kept on ``app.state.limits``, where :func:`serve_in_thread` finds the connection-level
    ones (timeouts, ``max_connections``).
    """
    if not 1 <= default_topk <= limits.max_topk:
        raise ValueError(
            f"default_topk must be from 1 to max_topk={limits.max_topk}, got {default_topk}"
        )
    app = fastapi.FastAPI(title="atpo_jax retrieval server")
    app.state.limits = limits
    gate = _ConcurrencyGate(limits)
    # Searches run in worker threads so a slow one does not block the event loop; a limiter of the same
    # size as the gate means admitted searches never wait for anyio's shared pool of 40 threads.
    threads = anyio.CapacityLimiter(limits.max_concurrent_requests)

    @app.post("/retrieve")
    async def retrieve(request: fastapi.Request) -> dict:
        body = await _read_body(request, limits)
        parsed = parse_retrieve_request(body, limits, default_topk)
        if not parsed.queries:
            return render_retrieve_response([], return_scores=parsed.return_scores)
        gate.enter()
        try:
            # Not cancellable: the slot stays taken until the thread has really finished.
            results = await anyio.to_thread.run_sync(
                retriever.search, parsed.queries, parsed.topk, limiter=threads
            )
        finally:
            gate.exit()
        return render_retrieve_response(results, return_scores=parsed.return_scores)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "documents": num_documents}

    return app


# ----------------------------------------------------------------------------------------- connections


class _HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers.

    uvicorn arms its keep-alive timer only after a response and cancels it on the first byte received, so
    a client that opens a connection and sends a header line byte by byte (or nothing) holds it forever.
    Here a timer runs from the connection opening, and from the first byte of each later request, until
    h11 has parsed the request line and headers; if it fires first the connection is closed.
    """

    header_timeout_s: float = ServerLimits.header_timeout_s  # set per server by _protocol_class

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # the first bytes of a new request's headers
            self._arm_header_timer()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._cancel_header_timer()  # headers complete (or the connection failed)
        elif self.conn.trailing_data[0]:
            self._arm_header_timer()  # part of a pipelined request is waiting

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info(
                "closing a connection that sent no complete request headers in %s s",
                self.header_timeout_s,
            )
            self.transport.close()


def _protocol_class(header_timeout_s: float) -> type[H11Protocol]:
    # uvicorn builds protocols from a class and its Config, so the timeout travels as a class attribute.
    return type(
        "HeaderTimeoutH11Protocol",
        (_HeaderTimeoutProtocol,),
        {"header_timeout_s": header_timeout_s},
    )


def uvicorn_config(app: Any, limits: ServerLimits, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config that enforces the connection-level ``limits`` (``kwargs`` go to uvicorn.Config)."""
    return uvicorn.Config(
        app,
        # Always h11 (never httptools, if installed): the header deadline is implemented on its protocol.
        http=_protocol_class(limits.header_timeout_s),
        # uvicorn refuses a request once open connections >= limit_concurrency, the requesting one
        # included; +1 lets exactly max_connections connections be served.
        limit_concurrency=limits.max_connections + 1,
        timeout_keep_alive=limits.keep_alive_timeout_s,  # type: ignore[arg-type]  # any float works
        **kwargs,
    )


@dataclasses.dataclass
class RunningServer:
    """A uvicorn server running in a background thread (for tests, benchmarks and notebooks)."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/retrieve"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_in_thread(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 30.0,
    limits: ServerLimits | None = None,
) -> RunningServer:
    """Starts ``app`` on ``host:port`` (0 = a free port) in a daemon thread and waits until it accepts.

    ``limits`` defaults to the ones the app was created with (``app.state.limits``), else the defaults.
    """
    if limits is None:
        limits = getattr(getattr(app, "state", None), "limits", None) or ServerLimits()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, limits, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="retrieval-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"retrieval server on {host}:{port} exited during start-up")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(
                f"retrieval server on {host}:{port} did not start within {timeout} s"
            )
        time.sleep(0.01)
    return RunningServer(server=server, thread=thread, host=host, port=port)


# ----------------------------------------------------------------------------------------- CLI

_LIMIT_HELP = {
    "max_body_bytes": "largest request body in bytes (HTTP 413 beyond)",
    "max_queries": "most queries in one request (HTTP 422 beyond)",
    "max_query_chars": "longest query in characters (HTTP 422 beyond)",
    "max_topk": "largest topk a request may ask for (HTTP 422 beyond)",
    "max_concurrent_requests": "searches running at once (HTTP 503 beyond)",
    "max_connections": "open connections (HTTP 503 for requests beyond)",
    "header_timeout_s": "seconds a connection may take to send a request's headers before it is closed",
    "body_timeout_s": "seconds the request body may take after the headers (HTTP 408 beyond)",
    "keep_alive_timeout_s": "seconds an idle kept-alive connection stays open",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m atpo_jax.tools.retrieval_server",
        description="Serve a BM25 or dense (e5 + FAISS) index over a JSONL corpus with the "
        "Search-R1/ATPO /retrieve protocol.",
    )
    parser.add_argument(
        "--method", default="bm25", choices=["bm25", "dense"], help="retriever (default bm25)"
    )
    parser.add_argument(
        "--corpus",
        default=None,
        help="JSONL corpus, one {id, contents} per line (bm25: required; dense: default the "
        "index's own)",
    )
    parser.add_argument(
        "--index", default=None, help="dense: index folder built by atpo_jax.tools.build_index"
    )
    parser.add_argument(
        "--encoder", default=None, help="dense: encoder checkpoint dir (default: the index's)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="dense: query encoder dtype (default: the one the passages were encoded in)",
    )
    parser.add_argument("--nprobe", type=int, default=None, help="dense IVF: cells per query")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--topk", type=int, default=3, help="passages per query when a request gives none"
    )
    parser.add_argument(
        "--index-dir", default=None, help="BM25 index cache (default: <corpus>.bm25s)"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    limits = parser.add_argument_group("limits")
    for field in dataclasses.fields(ServerLimits):
        limits.add_argument(
            limit_flag(field.name),
            dest=field.name,
            type=type(field.default),
            default=field.default,
            help=f"{_LIMIT_HELP[field.name]} (default {field.default})",
        )
    args = parser.parse_args(argv)
    problem = method_flags_problem(args)
    if problem:
        parser.error(problem)  # exit status 2, like every other usage error
    return args


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})


def method_flags_problem(args: argparse.Namespace) -> str | None:
    """Why the flags do not fit ``--method`` (a usage error), or None."""
    if args.method == "bm25":
        extra = [f for f in ("index", "encoder", "dtype", "nprobe") if getattr(args, f)]
        if extra:
            return f"--{extra[0]} is for --method dense (this server runs bm25)"
        if not args.corpus:
            return "--corpus is required for --method bm25 (a JSONL corpus)"
        return None
    if not args.index:
        return (
            "--method dense needs --index INDEX_DIR (built with python -m "
            "atpo_jax.tools.build_index --encoder DIR --corpus corpus.jsonl --out INDEX_DIR)"
        )
    if args.index_dir:
        return "--index-dir is the BM25 cache folder; --method dense reads --index"
    return None


def build_retriever(args: argparse.Namespace) -> Any:
    """The retriever ``--method`` names (flags already checked by :func:`parse_args`)."""
    if args.method == "bm25":
        return LocalBM25Retriever(args.corpus, index_dir=args.index_dir)
    # The encoder is small: without this JAX would reserve most of a GPU's memory for it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from atpo_jax.tools.dense import DenseRetriever

    retriever = DenseRetriever(
        args.index, encoder=args.encoder, corpus=args.corpus, dtype=args.dtype, nprobe=args.nprobe
    )
    retriever.search(["warm-up"], args.topk)  # compile the one-query program before serving
    return retriever


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        limits = limits_from_args(args)
        if not 1 <= args.topk <= limits.max_topk:
            raise ValueError(
                f"--topk must be from 1 to --max-topk={limits.max_topk}, got {args.topk}"
            )
        retriever = build_retriever(args)
    except (CorpusError, ValueError, ImportError) as e:
        sys.exit(f"retrieval_server: {e}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "binding %s: the retrieval server is reachable from other machines", args.host
        )
    app = create_app(
        retriever, default_topk=args.topk, num_documents=retriever.num_documents, limits=limits
    )
    print(
        f"serving {retriever.num_documents} documents from {retriever.corpus_path} "
        f"({args.method}) on http://{args.host}:{args.port}/retrieve",
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn_config(app, limits, host=args.host, port=args.port, log_level=args.log_level)
    )
    server.run()
    if not server.started:  # what uvicorn.run does, e.g. when the port is taken
        sys.exit(_STARTUP_FAILURE)


if __name__ == "__main__":
    main()
