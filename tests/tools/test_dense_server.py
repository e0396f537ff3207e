"""The retrieval server with ``--method dense``: same answers as the in-process retriever."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from atpo_jax.tools import HttpRetriever, RetryPolicy, parse_retrieve_response
from atpo_jax.tools.dense import DenseRetriever
from atpo_jax.tools.retrieval_server import (
    build_retriever,
    create_app,
    main,
    parse_args,
    serve_in_thread,
)
from tests.tools import dense_helpers


class RecordingEncoder:
    """The session encoder, recording how many queries each encode call carried."""

    def __init__(self, encoder):
        self.inner, self.calls = encoder, []
        self.batch_size = encoder.batch_size

    def fingerprint(self):
        return self.inner.fingerprint()

    def encode_queries(self, queries, *, batch_size=None):
        self.calls.append(len(queries))
        return self.inner.encode_queries(queries, batch_size=batch_size)


def hit_ids(results):
    return [[(p.id, p.score) for p in row] for row in results]


def assert_same_hits(got, want):
    """Same passages; scores equal up to float32 rounding (another batch shape rounds differently)."""
    assert [[p.id for p in row] for row in got] == [[p.id for p in row] for row in want]
    for a, b in zip(got, want, strict=True):
        assert [p.score for p in a] == pytest.approx([p.score for p in b], abs=1e-5)


def test_server_answers_equal_in_process_answers(dense):
    encoder = RecordingEncoder(dense.encoder)
    retriever = DenseRetriever(dense.index_dir, encoder=encoder)
    queries = dense_helpers.make_queries(64)
    want = retriever.search(queries, 3)
    app = create_app(retriever, num_documents=retriever.num_documents)
    with serve_in_thread(app) as server:
        encoder.calls.clear()
        body = {"queries": queries, "topk": 3, "return_scores": True}
        response = httpx.post(server.url, json=body, timeout=60, trust_env=False)
        assert response.status_code == 200, response.text
        assert encoder.calls == [64]  # the request's queries were encoded as one batch
        got = parse_retrieve_response(response.json(), len(queries))
        # Scores survive JSON exactly (a float32 widened to a double prints and parses back).
        assert hit_ids(got) == hit_ids(want)
        assert [[p.document for p in row] for row in got] == [
            [p.document for p in row] for row in want
        ]
        plain = httpx.post(server.url, json={**body, "return_scores": False}, trust_env=False)
        assert plain.json()["result"][0] == [p.document for p in want[0]]
        health = httpx.get(server.url.replace("/retrieve", "/health"), trust_env=False).json()
        assert health == {"status": "ok", "documents": 192}
        retry = RetryPolicy(read_timeout_s=60, max_attempts=2)
        with HttpRetriever(server.url, retry=retry) as client:
            assert_same_hits(client.search(queries[:8], 3), want[:8])


class SlowEncoder(RecordingEncoder):
    """Holds each batch for a while, so that concurrent callers queue behind it; fails on demand."""

    fail = False

    def encode_queries(self, queries, *, batch_size=None):
        time.sleep(0.15)
        if self.fail:
            raise RuntimeError("encoder failed")
        return super().encode_queries(queries, batch_size=batch_size)


def test_concurrent_searches_are_coalesced_into_batches(dense):
    encoder = SlowEncoder(dense.encoder)
    retriever = DenseRetriever(dense.index_dir, encoder=encoder)
    queries = dense_helpers.make_queries(16)
    want = DenseRetriever(dense.index_dir, encoder=dense.encoder).search(queries, 3)
    start = threading.Barrier(16)

    def one(i):
        start.wait()
        return retriever.search([queries[i]], 2 + i % 2)  # topk 2 and 3 in one batch

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    for i, hits in enumerate(got):  # each caller gets its own query's passages, at its own topk
        assert_same_hits(hits, [want[i][: 2 + i % 2]])
    assert sum(encoder.calls) == 16 and len(encoder.calls) <= 3, encoder.calls
    # A failing batch fails its callers, and the next call runs normally.
    encoder.fail = True
    with pytest.raises(RuntimeError, match="encoder failed"):
        retriever.search(queries[:2], 3)
    encoder.fail = False
    assert_same_hits(retriever.search(queries[:2], 3), want[:2])


def test_command_line_builds_the_dense_retriever_from_the_index(dense, monkeypatch):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # what the server sets
    retriever = build_retriever(parse_args(["--method", "dense", "--index", dense.index_dir]))
    # The encoder and corpus default to the manifest's.
    assert retriever.corpus_path == dense.corpus and retriever.num_documents == 192
    queries = dense_helpers.make_queries(64)
    in_process = DenseRetriever(dense.index_dir, encoder=dense.encoder)
    assert hit_ids(retriever.search(queries, 3)) == hit_ids(in_process.search(queries, 3))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "dense"], "--method dense needs --index INDEX_DIR (built with python -m"),
        (["--corpus", "c.jsonl", "--index", "x"], "--index is for --method dense"),
        (["--method", "bm25"], "--corpus is required for --method bm25"),
        (
            ["--method", "dense", "--index", "x", "--index-dir", "y"],
            "--index-dir is the BM25 cache",
        ),
    ],
)
def test_command_line_usage_errors_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_a_missing_index_folder_is_one_message():
    with pytest.raises(SystemExit, match=r"index folder '/nonexistent' does not exist: build it"):
        main(["--method", "dense", "--index", "/nonexistent"])
