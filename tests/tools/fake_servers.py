"""Misbehaving HTTP servers on 127.0.0.1 for client fault tests (each runs in a daemon thread)."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator

from atpo_jax.tools.base import Retriever
from atpo_jax.tools.passages import render_retrieve_response

MODES = ("hang", "500", "malformed", "close", "404", "flaky", "ok")


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _FakeServer

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        srv = self.server
        with srv.lock:
            srv.requests += 1
            n = srv.requests
        mode = srv.mode
        if mode == "flaky":
            mode = "500" if n <= srv.failures_before_ok else "ok"
        if mode == "hang":
            srv.release.wait(30)
            return
        if mode == "close":
            self.close_connection = True
            return
        if mode in ("500", "404"):
            self._reply(int(mode), b'{"detail": "boom"}')
        elif mode == "malformed":
            self._reply(200, b'{"result": [[{"document": ')
        else:
            request = json.loads(body)
            results = srv.retriever.search(request["queries"], request.get("topk") or 3)
            payload = render_retrieve_response(results, return_scores=request["return_scores"])
            self._reply(200, json.dumps(payload).encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _FakeServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, mode: str, retriever: Retriever | None, failures_before_ok: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = mode
        self.retriever = retriever
        self.failures_before_ok = failures_before_ok
        self.requests = 0
        self.lock = threading.Lock()
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/retrieve"


@contextlib.contextmanager
def fake_server(
    mode: str, retriever: Retriever | None = None, *, failures_before_ok: int = 2
) -> Iterator[_FakeServer]:
    assert mode in MODES
    server = _FakeServer(mode, retriever, failures_before_ok)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.release.set()  # free hung handlers before shutting down
        server.shutdown()
        server.server_close()
        thread.join(5)
