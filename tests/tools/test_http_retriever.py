"""HttpRetriever against a real localhost socket: interoperation, batching, faults, record/replay."""

import concurrent.futures
import json
import socket
import threading
import time

import httpx
import pytest

from atpo_jax.tools import (
    HttpRetriever,
    LocalBM25Retriever,
    RetrievalError,
    RetryPolicy,
    SearchTool,
    Toolbox,
    render_retrieve_response,
    write_corpus,
)
from atpo_jax.tools.cache import CacheFileError
from atpo_jax.tools.retrieval_server import create_app, serve_in_thread

from .fake_servers import fake_server

FAST = RetryPolicy(
    connect_timeout_s=0.5, read_timeout_s=0.3, max_attempts=3, backoff_initial_s=0.05
)
ROWS = [
    {"id": "0", "contents": '"Paris"\nParis is the capital of France.'},
    {"id": "1", "contents": '"Berlin"\nBerlin is the capital of Germany.'},
    {"id": "2", "contents": '"France"\nFrance is a country. Its capital is Paris.'},
    {"id": "3", "contents": '"Rome"\nRome is the capital of Italy.', "title": "Rome"},
]


class CountingRetriever:
    """Wraps a retriever and records the query batches the server receives."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def search(self, queries, topk):
        with self.lock:
            self.batches.append(list(queries))
        return self.inner.search(queries, topk)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_corpus(ROWS, path)
    return LocalBM25Retriever(path)


@pytest.fixture
def server(local):
    counting = CountingRetriever(local)
    with serve_in_thread(create_app(counting, default_topk=3, num_documents=len(ROWS))) as running:
        running.counting = counting
        yield running


def test_server_speaks_the_reference_protocol(server, local):
    expected = local.search(["Paris", "Rome"], 2)
    for scores in (True, False):
        response = httpx.post(
            server.url,
            json={"queries": ["Paris", "Rome"], "topk": 2, "return_scores": scores},
            timeout=10,
        )
        assert response.status_code == 200
        assert response.json() == render_retrieve_response(expected, return_scores=scores)
    # Reference defaults: missing or 0 topk -> server default (3); return_scores defaults to false.
    body = httpx.post(server.url, json={"queries": ["capital"], "topk": 0}, timeout=10).json()
    assert len(body["result"][0]) == 3 and "document" not in body["result"][0][0]
    assert httpx.post(server.url, json={"queries": []}, timeout=10).json() == {"result": []}
    assert httpx.post(server.url, json={"topk": 3}, timeout=10).status_code == 422
    health = httpx.get(server.url.replace("/retrieve", "/health"), timeout=10).json()
    assert health == {"status": "ok", "documents": 4}


def test_client_and_server_interoperate(server, local):
    with HttpRetriever(server.url, retry=FAST) as client:
        got = client.search(["Paris", "Italy", "zzz"], 3)
    want = local.search(["Paris", "Italy", "zzz"], 3)
    assert [[p.document for p in g] for g in got] == [[p.document for p in g] for g in want]
    assert [[p.score for p in g] for g in got] == [[p.score for p in g] for g in want]
    assert got[1][0].document["title"] == "Rome"  # extra corpus fields travel unchanged
    assert got[2] == []


def test_url_without_path_gets_retrieve(server):
    base = server.url.removesuffix("/retrieve")
    with HttpRetriever(base, retry=FAST) as client:
        assert client.url == server.url
        assert client.search(["Berlin"], 1)[0][0].id == "1"
    with pytest.raises(ValueError, match="http://"):
        HttpRetriever("127.0.0.1:8000")


def test_concurrent_calls_are_batched_and_deduplicated(server, local):
    queries = [["Paris", "Berlin"], ["Rome"], ["Paris"], ["France", "capital"]] * 8  # 32 callers
    with HttpRetriever(server.url, retry=FAST, batch_wait_s=0.05, max_in_flight=2) as client:
        barrier = threading.Barrier(len(queries))

        def call(qs):
            barrier.wait()
            return client.search(qs, 3)

        with concurrent.futures.ThreadPoolExecutor(len(queries)) as pool:
            results = list(pool.map(call, queries))
        sent = client.requests_sent
    for qs, got in zip(queries, results, strict=True):
        assert got == local.search(qs, 3)
    assert sent < len(queries) / 4  # 32 callers, a handful of requests
    batches = server.counting.batches
    assert len(batches) == sent
    assert all(len(b) == len(set(b)) for b in batches)  # duplicates sent once per batch


def test_mixed_topk_calls_are_not_mixed_in_a_batch(server, local):
    with (
        HttpRetriever(server.url, retry=FAST, batch_wait_s=0.05) as client,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        one = pool.submit(client.search, ["capital"], 1)
        three = pool.submit(client.search, ["capital"], 3)
        assert len(one.result()[0]) == 1 and len(three.result()[0]) == 3


@pytest.mark.parametrize("mode", ["hang", "500", "malformed", "close"])
def test_faults_are_retried_within_bounds_then_fail(mode):
    with fake_server(mode) as srv, HttpRetriever(srv.url, retry=FAST) as client:
        start = time.monotonic()
        with pytest.raises(RetrievalError, match="failed after 3 attempts") as info:
            client.search(["q"], 3)
        elapsed = time.monotonic() - start
        assert srv.requests == 3
    assert elapsed < FAST.deadline_s()
    # Backoff sleeps 0.05 s then 0.1 s between the attempts.
    assert elapsed >= 0.15
    if mode == "hang":
        assert elapsed >= 3 * FAST.read_timeout_s
    assert srv.url in str(info.value)


def test_client_error_is_not_retried():
    with fake_server("404") as srv, HttpRetriever(srv.url, retry=FAST) as client:
        with pytest.raises(RetrievalError, match="HTTP 404"):
            client.search(["q"], 3)
        assert srv.requests == 1


def test_connection_refused_fails_within_bounds():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on this port now
    with HttpRetriever(f"http://127.0.0.1:{port}/retrieve", retry=FAST) as client:
        start = time.monotonic()
        with pytest.raises(RetrievalError, match="connection error"):
            client.search(["q"], 3)
        assert time.monotonic() - start < FAST.deadline_s()
        assert client.requests_sent == 3


def test_transient_failures_recover(local):
    with fake_server("flaky", local, failures_before_ok=2) as srv:
        with HttpRetriever(srv.url, retry=FAST) as client:
            assert client.search(["Paris"], 1) == local.search(["Paris"], 1)
        assert srv.requests == 3


def test_search_tool_reports_failure_as_data():
    with fake_server("500") as srv, HttpRetriever(srv.url, retry=FAST) as client:
        toolbox = Toolbox([SearchTool(client)])
        result = toolbox.run("search", "anything")
    assert not result.ok and result.status == "retrieval_error" and result.text == ""
    assert "failed after 3 attempts" in result.error


def test_close_releases_waiting_callers():
    slow = RetryPolicy(connect_timeout_s=1, read_timeout_s=20, max_attempts=1)
    with fake_server("hang") as srv:
        client = HttpRetriever(srv.url, retry=slow)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(client.search, ["q"], 3)
            while srv.requests == 0:
                time.sleep(0.01)
            start = time.monotonic()
            client.close()
            with pytest.raises(RetrievalError, match="closed"):
                future.result(timeout=5)
            assert time.monotonic() - start < 5
    with pytest.raises(RetrievalError, match="closed"):
        client.search(["q"], 3)


def test_deadline_bound_formula():
    policy = RetryPolicy(
        connect_timeout_s=2, read_timeout_s=10, max_attempts=4, backoff_initial_s=1
    )
    assert [policy.backoff(a) for a in range(5)] == [1, 2, 4, 8, 8]
    assert policy.deadline_s() == 4 * (2 * 2 + 10) + (1 + 2 + 4) + 1
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_record_then_replay_without_the_service(local, tmp_path):
    cache = tmp_path / "cache.jsonl"
    with (
        serve_in_thread(create_app(local)) as running,
        HttpRetriever(running.url, retry=FAST, cache_path=cache) as client,
    ):
        recorded = client.search(["Paris", "Rome"], 2)
        again = client.search(["Paris"], 2)  # served from the cache
        assert client.requests_sent == 1 and again == recorded[:1]
    lines = cache.read_text().splitlines()
    assert [json.loads(line)["query"] for line in lines] == ["Paris", "Rome"]
    # The service is gone now; replay answers from the file and never opens a connection.
    with HttpRetriever(running.url, retry=FAST, cache_path=cache, cache_mode="replay") as replay:
        assert replay.search(["Rome", "Paris"], 2) == [recorded[1], recorded[0]]
        with pytest.raises(RetrievalError, match="not in the replay cache"):
            replay.search(["Berlin"], 2)
        assert replay.requests_sent == 0


def test_replay_needs_an_existing_cache(tmp_path):
    with pytest.raises(RetrievalError, match="does not exist"):
        HttpRetriever(
            "http://127.0.0.1:1/retrieve", cache_path=tmp_path / "x.jsonl", cache_mode="replay"
        )
    with pytest.raises(ValueError, match="cache mode"):
        HttpRetriever(
            "http://127.0.0.1:1/retrieve", cache_path=tmp_path / "x.jsonl", cache_mode="rw"
        )


def test_cache_survives_a_cut_last_line_and_rejects_bad_lines(tmp_path):
    good = json.dumps(
        {
            "query": "q",
            "topk": 3,
            "passages": [{"document": {"id": "1", "contents": "c"}, "score": 1.5}],
        }
    )
    path = tmp_path / "cache.jsonl"
    path.write_text(good + "\n" + '{"query": "cut')
    with HttpRetriever(
        "http://127.0.0.1:1/retrieve", cache_path=path, cache_mode="replay"
    ) as client:
        [[hit]] = client.search(["q"], 3)
        assert (hit.id, hit.contents, hit.score) == ("1", "c", 1.5)
    assert path.read_text().endswith('{"query": "cut')  # replay never writes
    HttpRetriever("http://127.0.0.1:1/retrieve", cache_path=path).close()  # record mode repairs
    assert path.read_text() == good + "\n"
    path.write_text('{"query": "q"}\n' + good + "\n")
    with pytest.raises(CacheFileError, match="line 1"):
        HttpRetriever("http://127.0.0.1:1/retrieve", cache_path=path)
