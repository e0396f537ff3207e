"""Retrieval throughput: the embedded BM25 retriever and the HTTP service under concurrent clients.

    .venv/bin/python benchmarks/retrieval.py [--docs 5000 50000] [--queries 1000] [--clients 32]

Builds a synthetic corpus (Zipf-distributed invented words, 30–80 words per passage, so posting lists look
like natural text), starts ``python -m atpo_jax.tools.retrieval_server`` in its own process on a loopback
port, and measures queries per second for:

* local, 1 query per call, 1 thread        the embedded retriever as the rollout would call it
* local, 32 threads                         same, from the rollout's thread pool
* local, one batched call                   upper bound for the BM25 scoring itself
* HTTP baseline: 32 clients, 1 query/request  what the reference client does (plus keep-alive)
* HTTP HttpRetriever: 32 callers, batched     our client, coalescing concurrent queries

Ratios are against the HTTP baseline measured in the same run. Numbers depend on the machine; compare
rows, not runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from atpo_jax.tools import HttpRetriever, LocalBM25Retriever, RetryPolicy, write_corpus


def make_corpus(path: str, num_docs: int, rng: random.Random) -> list[list[str]]:
    """Writes a corpus of invented words; returns the word lists (to draw queries from)."""
    letters = "bcdfghklmnprstvz"
    vowels = "aeiou"
    vocab = sorted(
        {
            "".join(rng.choice(letters) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
            for _ in range(30000)
        }
    )
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]  # Zipf
    docs, rows = [], []
    for i in range(num_docs):
        words = rng.choices(vocab, weights=weights, k=rng.randint(30, 80))
        docs.append(words)
        rows.append({"id": str(i), "contents": f'"{words[0].title()}"\n' + " ".join(words)})
    write_corpus(rows, path)
    return docs


def make_queries(docs: list[list[str]], n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.sample(doc, 3)) for doc in rng.choices(docs, k=n)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_threads(n_threads: int, queries: list[str], call) -> None:
    """Runs ``call(query)`` for every query on ``n_threads`` threads that start together."""
    chunks = [queries[i::n_threads] for i in range(n_threads)]
    barrier = threading.Barrier(n_threads)

    def worker(chunk: list[str]) -> None:
        barrier.wait()
        for q in chunk:
            call(q)

    with concurrent.futures.ThreadPoolExecutor(n_threads) as pool:
        list(pool.map(worker, chunks))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(corpus: str, index_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atpo_jax.tools.retrieval_server",
            "--corpus",
            corpus,
            "--port",
            str(port),
            "--index-dir",
            index_dir,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("retrieval server exited during start-up")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/retrieve"
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("retrieval server did not start within 300 s")


def measure(num_docs: int, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    k = args.topk
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.jsonl")
        docs = make_corpus(corpus, num_docs, rng)
        queries = make_queries(docs, args.queries, rng)
        index_dir = os.path.join(tmp, "index")
        build_s = timed(lambda: LocalBM25Retriever(corpus, index_dir=index_dir))
        load_s = timed(lambda: LocalBM25Retriever(corpus, index_dir=index_dir))
        local = LocalBM25Retriever(corpus, index_dir=index_dir)
        print(
            f"\n== corpus: {num_docs} passages; index build {build_s:.1f} s, cached load {load_s:.2f} s"
        )
        print(
            f"   {args.queries} queries of 3 words, top-{k}, {args.clients} clients, {os.cpu_count()} CPUs"
        )

        results: dict[str, float] = {}
        results["local, 1 query/call, 1 thread"] = args.queries / timed(
            lambda: [local.search([q], k) for q in queries]
        )
        results[f"local, 1 query/call, {args.clients} threads"] = args.queries / timed(
            lambda: run_threads(args.clients, queries, lambda q: local.search([q], k))
        )
        results["local, one batched call"] = args.queries / timed(lambda: local.search(queries, k))

        proc, url = start_server(corpus, index_dir)
        try:
            clients = threading.local()

            def reference_style(q: str) -> None:
                if not hasattr(clients, "c"):
                    clients.c = httpx.Client(timeout=60, trust_env=False)
                r = clients.c.post(url, json={"queries": [q], "topk": k, "return_scores": True})
                r.raise_for_status()

            baseline_key = f"HTTP baseline, {args.clients} clients, 1 query/request"
            results[baseline_key] = args.queries / timed(
                lambda: run_threads(args.clients, queries, reference_style)
            )
            retry = RetryPolicy(read_timeout_s=120)
            with HttpRetriever(url, retry=retry, batch_wait_s=0.002, max_batch_size=64) as client:
                elapsed = timed(
                    lambda: run_threads(args.clients, queries, lambda q: client.search([q], k))
                )
                requests = client.requests_sent
            results[f"HTTP HttpRetriever, {args.clients} callers, batched"] = args.queries / elapsed
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    baseline = results[baseline_key]
    width = max(map(len, results))
    print(f"   {'measurement':<{width}}  {'queries/s':>10}  {'vs HTTP baseline':>16}")
    for name, qps in results.items():
        print(f"   {name:<{width}}  {qps:>10.0f}  {qps / baseline:>15.2f}x")
    print(
        f"   HttpRetriever sent {requests} requests for {args.queries} queries "
        f"({args.queries / requests:.1f} queries per request)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, nargs="+", default=[5000, 50000], help="corpus sizes")
    parser.add_argument("--queries", type=int, default=1000, help="queries per measurement")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients/threads")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for num_docs in args.docs:
        measure(num_docs, args)


if __name__ == "__main__":
    main()
