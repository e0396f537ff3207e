"""Retrieval-server limits over a real loopback socket: body size, query count and length, topk, bad
JSON, slow headers and bodies, concurrency and connection bounds, and what the HTTP client makes of them.

Limits are tiny (2 KB bodies, 0.5 s timeouts) so the whole file runs in a few seconds.
"""

from __future__ import annotations

import concurrent.futures
import json
import select
import socket
import threading
import time

import fastapi
import httpx
import pytest

from atpo_jax.tools import HttpRetriever, Passage, RetrievalError, RetryPolicy
from atpo_jax.tools.passages import render_retrieve_response
from atpo_jax.tools.retrieval_server import (
    ServerLimits,
    create_app,
    limits_from_args,
    main,
    parse_args,
    parse_retrieve_request,
    serve_in_thread,
)

LIMITS = ServerLimits(
    max_body_bytes=2000,
    max_queries=4,
    max_query_chars=50,
    max_topk=5,
    max_concurrent_requests=4,
    max_connections=64,  # room for the 50 slow-header sockets plus the good requests
    header_timeout_s=0.5,
    body_timeout_s=0.5,
)
FAST = RetryPolicy(connect_timeout_s=1, read_timeout_s=5, max_attempts=3, backoff_initial_s=0.05)


class EchoRetriever:
    """``topk`` passages per query, made from the query itself, so results are predictable."""

    def search(self, queries, topk):
        return [
            [Passage({"id": f"{q}-{i}", "contents": q}, score=float(-i)) for i in range(topk)]
            for q in queries
        ]


class BlockingRetriever(EchoRetriever):
    """Holds every search until ``release`` is set, so tests can fill the server's search slots."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def search(self, queries, topk):
        self.entered.release()
        self.release.wait(10)
        return super().search(queries, topk)


@pytest.fixture(scope="module")
def server():
    with serve_in_thread(create_app(EchoRetriever(), default_topk=3, limits=LIMITS)) as running:
        yield running


def post(server, body, **kwargs) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(server.url, content=body, timeout=10, **kwargs)
    return httpx.post(server.url, json=body, timeout=10, **kwargs)


def detail(response: httpx.Response) -> str:
    value = response.json()["detail"]
    assert isinstance(value, str) and "Traceback" not in value
    return value


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Reads one HTTP/1.1 response with a Content-Length body from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response; got {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server has closed ``sock`` (EOF or reset) within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ----------------------------------------------------------------------------------------- good requests


def test_good_requests_are_unchanged(server):
    for scores in (True, False):
        r = post(server, {"queries": ["a", "b"], "topk": 2, "return_scores": scores})
        assert r.status_code == 200
        expected = EchoRetriever().search(["a", "b"], 2)
        assert r.json() == render_retrieve_response(expected, return_scores=scores)
    # Missing or 0 topk -> the server default (3); return_scores defaults to false; a whole float is a
    # whole number; no queries -> no results.
    for topk in (None, 0, 3.0):
        body = {"queries": ["q"]} if topk is None else {"queries": ["q"], "topk": topk}
        assert post(server, body).json() == {
            "result": [[{"id": f"q-{i}", "contents": "q"} for i in range(3)]]
        }
    assert post(server, {"queries": []}).json() == {"result": []}
    # At the limits exactly is fine.
    r = post(server, {"queries": ["x" * 50] * 4, "topk": 5})
    assert r.status_code == 200 and [len(hits) for hits in r.json()["result"]] == [5] * 4
    assert httpx.get(f"http://{server.host}:{server.port}/health").json() == {
        "status": "ok",
        "documents": None,
    }


def test_a_good_chunked_body_is_served(server):
    chunks = [b'{"queries": ', b'["a"], "topk": 1}']
    r = httpx.post(server.url, content=iter(chunks), timeout=10)  # an iterator is sent chunked
    assert r.status_code == 200 and r.json()["result"] == [[{"id": "a-0", "contents": "a"}]]


# ----------------------------------------------------------------------------------------- body size


def test_body_over_the_limit_is_refused_from_content_length_before_it_is_read(server):
    with socket.create_connection((server.host, server.port)) as sock:
        # Headers only: the server must answer without waiting for the gigabyte it was promised.
        sock.sendall(
            b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        start = time.monotonic()
        status, headers, body = read_response(sock)
        assert time.monotonic() - start < 2.0
        assert status == 413 and headers["connection"] == "close"
        message = json.loads(body)["detail"]
        assert "1000000000 bytes" in message and "max_body_bytes=2000" in message
        assert "--max-body-bytes" in message
        assert closed_by_server(sock, 2.0)
    # The same through an ordinary client that sends the whole body.
    r = post(server, {"queries": ["a" * 40] * 60})
    assert r.status_code == 413 and "--max-body-bytes" in detail(r)


def test_chunked_body_over_the_limit_is_refused_while_streaming(server):
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        # 5 x 500 bytes passes the 2,000-byte limit; the body is never finished (no 0-length chunk), so
        # only counting while streaming can answer.
        for _ in range(5):
            sock.sendall(b"1f4\r\n" + b" " * 500 + b"\r\n")
        status, headers, body = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        message = json.loads(body)["detail"]
        assert "over 2000 bytes" in message and "--max-body-bytes" in message
        assert closed_by_server(sock, 2.0)
    r = httpx.post(server.url, content=iter([b" " * 1500, b" " * 1500]), timeout=10)
    assert r.status_code == 413 and "--max-body-bytes" in detail(r)


def test_a_body_that_never_arrives_times_out(server):
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        start = time.monotonic()
        status, headers, body = read_response(sock)
        assert 0.4 < time.monotonic() - start < 3.0
        assert status == 408 and headers["connection"] == "close"
        assert "--body-timeout" in json.loads(body)["detail"]


# ----------------------------------------------------------------------------------------- request contents


def test_too_many_queries(server):
    r = post(server, {"queries": ["a"] * 5})
    assert r.status_code == 422
    assert (
        "5 queries" in detail(r) and "max_queries=4" in detail(r) and "--max-queries" in detail(r)
    )


def test_query_too_long(server):
    r = post(server, {"queries": ["ok", "x" * 51]})
    assert r.status_code == 422
    message = detail(r)
    assert "query 1 has 51 characters" in message and "max_query_chars=50" in message
    assert "--max-query-chars" in message


@pytest.mark.parametrize(
    "topk",
    ["NaN", "Infinity", "-Infinity", "-1", "1e9", "6", '"abc"', "2.5", "true", "[3]", '"3"'],
)
def test_bad_topk_is_a_422_with_a_message(server, topk):
    # Raw bodies: NaN and Infinity are not JSON, but Python's json (and so the server) reads them.
    r = post(server, f'{{"queries": ["a"], "topk": {topk}}}'.encode())
    assert r.status_code == 422, r.text
    message = detail(r)
    assert "topk" in message
    if topk in ("1e9", "6"):
        assert "max_topk=5" in message and "--max-topk" in message


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b'{"queries": [', 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b"\xff\xfe\x00garbage", 400, "not valid JSON"),
        (b"[" * 1500, 400, "not valid JSON"),  # nesting deeper than the JSON decoder recurses
        (b'["a", "b"]', 422, "JSON object"),
        (b'{"topk": 2}', 422, "queries: Field required"),
        (b'{"queries": "abc"}', 422, "queries"),
        (b'{"queries": [1, 2]}', 422, "queries.0"),
        (b'{"queries": ["a"], "return_scores": [1]}', 422, "return_scores"),
    ],
)
def test_malformed_bodies_get_a_4xx_with_a_message(server, body, status, words):
    r = post(server, body)
    assert r.status_code == status, r.text
    assert words in detail(r)


def test_json_the_decoder_refuses_is_a_400_not_a_500():
    # Python refuses ints of more than 4,300 digits with a ValueError that is not a JSONDecodeError.
    huge = b'{"queries": ["a"], "topk": 1' + b"0" * 5000 + b"}"
    with pytest.raises(fastapi.HTTPException) as err:
        parse_retrieve_request(huge, ServerLimits(), 3)
    assert err.value.status_code == 400 and "not valid JSON" in err.value.detail


# ----------------------------------------------------------------------------------------- slow clients


def test_slow_header_connections_are_closed_after_the_header_timeout(server):
    # 50 clients that send part of a request line and stall, one that sends nothing, and one that keeps
    # the connection busy with a header byte every 0.1 s (data arriving must not reset the deadline).
    stalled = []
    for _ in range(50):
        sock = socket.create_connection((server.host, server.port))
        sock.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Le")
        stalled.append(sock)
    stalled.append(socket.create_connection((server.host, server.port)))
    dribbler = socket.create_connection((server.host, server.port))
    dribbler.sendall(b"GET /health HTTP/1.1\r\nX-Pad: ")
    start = time.monotonic()
    try:
        # Meanwhile, normal requests are served.
        assert post(server, {"queries": ["a"], "topk": 1}).status_code == 200

        dribbler_closed_after = None
        while time.monotonic() - start < 5 and dribbler_closed_after is None:
            try:
                dribbler.send(b"a")
                if select.select([dribbler], [], [], 0.1)[0] and dribbler.recv(1024) == b"":
                    dribbler_closed_after = time.monotonic() - start
            except (ConnectionResetError, BrokenPipeError):
                dribbler_closed_after = time.monotonic() - start
        assert dribbler_closed_after is not None and 0.4 < dribbler_closed_after < 3.0

        assert all(
            closed_by_server(sock, max(0.1, start + 3.0 - time.monotonic())) for sock in stalled
        )
        assert time.monotonic() - start < 3.5
        assert post(server, {"queries": ["b"], "topk": 1}).status_code == 200
    finally:
        for sock in [*stalled, dribbler]:
            sock.close()


def test_the_header_deadline_also_covers_later_requests_on_a_kept_alive_connection(server):
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        time.sleep(
            0.7
        )  # idle longer than the header timeout: idle time is the keep-alive timeout's
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # a second request that stalls
        start = time.monotonic()
        assert closed_by_server(sock, 3.0)
        assert 0.4 < time.monotonic() - start < 3.0


# ----------------------------------------------------------------------------------------- load bounds


def test_searches_beyond_the_concurrency_limit_get_a_quick_503():
    blocking = BlockingRetriever()
    limits = ServerLimits(max_concurrent_requests=2)
    with (
        serve_in_thread(create_app(blocking, limits=limits)) as srv,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        try:
            slow = [pool.submit(post, srv, {"queries": [f"q{i}"], "topk": 1}) for i in range(2)]
            for _ in range(2):
                assert blocking.entered.acquire(timeout=5), "the first two searches did not start"
            start = time.monotonic()
            r = post(srv, {"queries": ["third"], "topk": 1})
            assert time.monotonic() - start < 2.0
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "max_concurrent_requests=2" in detail(r)
            assert "--max-concurrent-requests" in detail(r)
            # Cheap requests do not take a search slot.
            assert httpx.get(f"http://{srv.host}:{srv.port}/health").status_code == 200
            assert post(srv, {"queries": []}).status_code == 200
        finally:
            blocking.release.set()
        assert [f.result().status_code for f in slow] == [200, 200]
        assert post(srv, {"queries": ["fourth"], "topk": 1}).status_code == 200  # slots freed


def test_requests_get_503_while_more_than_max_connections_are_open():
    limits = ServerLimits(max_connections=2)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with serve_in_thread(create_app(EchoRetriever(), limits=limits)) as srv:
        first, second = (socket.create_connection((srv.host, srv.port)) for _ in range(2))
        try:
            for sock in (first, second):
                sock.sendall(health)
                assert read_response(sock)[0] == 200
            with socket.create_connection((srv.host, srv.port)) as third:
                time.sleep(0.1)  # let the server accept it
                third.sendall(health)
                assert read_response(third)[0] == 503
            time.sleep(0.1)  # let the server see it close
            first.sendall(health)
            assert read_response(first)[0] == 200
        finally:
            first.close()
            second.close()


# ----------------------------------------------------------------------------------------- the client


def test_the_http_client_reports_a_limit_at_once_and_fails_only_the_offending_call(server):
    with HttpRetriever(server.url, retry=FAST, batch_wait_s=0.2) as client:
        with pytest.raises(RetrievalError) as err:
            client.search(["x" * 51], 1)
        message = str(err.value)
        assert "HTTP 422" in message and "--max-query-chars" in message
        assert client.requests_sent == 1  # not retried

        # Three concurrent calls batched into one request; only the call with the long query fails.
        def call(query):
            try:
                return client.search([query], 1)
            except RetrievalError as e:
                return e

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(call, ["good", "y" * 51, "fine"]))
        assert results[0] == EchoRetriever().search(["good"], 1)
        assert results[2] == EchoRetriever().search(["fine"], 1)
        assert isinstance(results[1], RetrievalError) and "--max-query-chars" in str(results[1])

        with pytest.raises(RetrievalError, match="max_topk=5"):
            client.search(["a"], 6)


# ----------------------------------------------------------------------------------------- settings


def test_cli_flags_set_the_limits():
    args = parse_args(
        [
            "--corpus",
            "c.jsonl",
            "--max-queries",
            "7",
            "--header-timeout",
            "2.5",
            "--max-body-bytes",
            "99",
        ]
    )
    assert limits_from_args(args) == ServerLimits(
        max_queries=7, header_timeout_s=2.5, max_body_bytes=99
    )
    assert limits_from_args(parse_args(["--corpus", "c.jsonl"])) == ServerLimits()


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="max_queries must be > 0"):
        ServerLimits(max_queries=0)
    with pytest.raises(ValueError, match="must be an integer"):
        ServerLimits(max_topk=2.5)
    with pytest.raises(ValueError, match="default_topk"):
        create_app(EchoRetriever(), default_topk=6, limits=ServerLimits(max_topk=5))
    # The CLI checks its limits before loading the corpus, and says what is wrong in one line.
    with pytest.raises(SystemExit, match="header_timeout_s must be > 0"):
        main(["--corpus", "missing.jsonl", "--header-timeout", "0"])
    with pytest.raises(SystemExit, match="--topk must be from 1 to --max-topk=5"):
        main(["--corpus", "missing.jsonl", "--topk", "9", "--max-topk", "5"])
