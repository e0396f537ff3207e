"""``python -m atpo_jax.tools.retrieval_server`` as a real process on a loopback port."""

import socket
import subprocess
import sys
import time

import httpx
import pytest

from atpo_jax.tools import HttpRetriever, RetryPolicy, write_corpus

ROWS = [
    {"id": "a", "contents": '"Oslo"\nOslo is the capital of Norway.'},
    {"id": "b", "contents": '"Bergen"\nBergen is a city in Norway.'},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_the_corpus_on_loopback(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(ROWS, corpus)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atpo_jax.tools.retrieval_server",
            "--corpus",
            str(corpus),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up within 60 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        retry = RetryPolicy(connect_timeout_s=2, read_timeout_s=10, max_attempts=2)
        with HttpRetriever(f"http://127.0.0.1:{port}/retrieve", retry=retry) as client:
            hits = client.search(["Norway capital"], 3)[0]
        assert [h.id for h in hits] == ["a", "b"]
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    # Default bind address is loopback, and the banner says so.
    assert f"on http://127.0.0.1:{port}/retrieve" in out


def test_cli_reports_a_bad_corpus(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    out = subprocess.run(
        [sys.executable, "-m", "atpo_jax.tools.retrieval_server", "--corpus", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert f"{bad} line 1: missing string field 'contents'" in out.stderr


def test_cli_requires_a_corpus():
    out = subprocess.run(
        [sys.executable, "-m", "atpo_jax.tools.retrieval_server"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--corpus" in out.stderr


@pytest.mark.parametrize("topk", [-1])
def test_negative_topk_is_a_client_error(tmp_path, topk):
    from atpo_jax.tools import LocalBM25Retriever
    from atpo_jax.tools.retrieval_server import create_app, serve_in_thread

    corpus = tmp_path / "c.jsonl"
    write_corpus(ROWS, corpus)
    with serve_in_thread(create_app(LocalBM25Retriever(corpus))) as srv:
        r = httpx.post(srv.url, json={"queries": ["Oslo"], "topk": topk}, timeout=10)
    assert r.status_code == 422
