"""Retrieval service over the embedded BM25 index, speaking the reference protocol (ALGORITHM.md §6.1).

Run it with::

    python -m atpo_jax.tools.retrieval_server --corpus corpus.jsonl [--host 127.0.0.1] [--port 8000]

``POST /retrieve`` takes ``{"queries": [...], "topk": k, "return_scores": bool}`` (a missing or 0 ``topk``
means the server default) and answers ``{"result": [...]}``, one list per query: ``{"document": row,
"score": s}`` objects when ``return_scores`` is true, plain corpus rows otherwise. ``GET /health`` answers
``{"status": "ok", "documents": N}`` for readiness checks. Unlike the reference (which listens on 0.0.0.0),
the default bind address is loopback; pass ``--host 0.0.0.0`` to serve other machines.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
import threading
import time
from collections.abc import Sequence

import fastapi
import pydantic
import uvicorn

from atpo_jax.tools.base import Retriever
from atpo_jax.tools.bm25 import LocalBM25Retriever
from atpo_jax.tools.corpus import CorpusError
from atpo_jax.tools.passages import render_retrieve_response

logger = logging.getLogger(__name__)


class RetrieveRequest(pydantic.BaseModel):
    queries: list[str]
    topk: int | None = None
    return_scores: bool = False


def create_app(retriever: Retriever, *, default_topk: int = 3, num_documents: int | None = None):
    """A FastAPI app serving ``retriever`` with the reference request/response shapes."""
    if default_topk < 1:
        raise ValueError(f"default_topk must be >= 1, got {default_topk}")
    app = fastapi.FastAPI(title="atpo_jax retrieval server")

    # A plain (sync) endpoint runs in the server's thread pool, so concurrent requests are served in
    # parallel and a slow query does not block the event loop.
    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> dict:
        topk = request.topk or default_topk
        if topk < 0:
            raise fastapi.HTTPException(status_code=422, detail=f"topk must be >= 0, got {topk}")
        results = retriever.search(request.queries, topk) if request.queries else []
        return render_retrieve_response(results, return_scores=request.return_scores)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "documents": num_documents}

    return app


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
    app, *, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0
) -> RunningServer:
    """Starts ``app`` on ``host:port`` (0 = a free port) in a daemon thread and waits until it accepts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m atpo_jax.tools.retrieval_server",
        description="Serve a BM25 index over a JSONL corpus with the Search-R1/ATPO /retrieve protocol.",
    )
    parser.add_argument("--corpus", required=True, help="JSONL corpus, one {id, contents} per line")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--topk", type=int, default=3, help="passages per query when a request gives none"
    )
    parser.add_argument(
        "--index-dir", default=None, help="BM25 index cache (default: <corpus>.bm25s)"
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    try:
        retriever = LocalBM25Retriever(args.corpus, index_dir=args.index_dir)
    except CorpusError as e:
        sys.exit(f"retrieval_server: {e}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "binding %s: the retrieval server is reachable from other machines", args.host
        )
    app = create_app(retriever, default_topk=args.topk, num_documents=retriever.num_documents)
    print(
        f"serving {retriever.num_documents} documents from {args.corpus} on "
        f"http://{args.host}:{args.port}/retrieve",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
