"""Retrieval throughput: BM25 and dense (e5 + FAISS) retrievers, and the HTTP service under load.

    .venv/bin/python benchmarks/retrieval.py [--parts bm25 dense] [--docs 5000 50000] [--queries 1000]
        [--clients 32] [--dense-vectors 100000] [--encoders tiny base]

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

Dense (``--parts dense``), all on the CPU, every model and vector random (no weights are downloaded):

* encoding: passages/s (about 100 words, the 128-token bucket) and queries/s (one query per call, and
  32 per call) of a random encoder of each ``--encoders`` shape: ``base`` is e5-base-v2's (12 layers,
  hidden 768, 12 heads, FFN 3072, vocab 30522), ``tiny`` is 2 layers, hidden 64; compile time excluded
  (reported separately); with torch installed, the same checkpoint through transformers' PyTorch
  ``BertModel`` is the baseline row;
* FAISS search latency over ``--dense-vectors`` random unit vectors of dimension 768, uniform
  (no neighbourhoods: IVF's worst case) and clustered (around N/50 random centres, cosine about 0.9
  to their centre; each query a stored vector plus noise, cosine about 0.96), like real embeddings:
  NumPy brute force (baseline), flat (exact) and IVF (nlist about 4 sqrt(N), nprobe 8/32/128,
  recall@3 against flat), for 1 query and for batches of 32;
* the retrieval server with ``--method dense`` (base-shaped encoder, flat index over a 256-passage
  corpus, so the query encoding, not the search, is what is measured) under ``--clients`` concurrent
  clients: one query per request (the reference client) and ``HttpRetriever`` (batched).
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
    return start_server_with(["--corpus", corpus, "--index-dir", index_dir])


def start_server_with(server_args: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atpo_jax.tools.retrieval_server",
            *server_args,
            "--port",
            str(port),
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


# ------------------------------------------------------------------------------------------ dense

ENCODER_SHAPES = {
    "base": dict(hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522),  # e5-base-v2
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=128, vocab=30522),
}


def save_random_bert(path: str, shape: dict, seed: int = 0) -> None:
    """A random BERT checkpoint in the Hugging Face layout (config.json, model.safetensors,
    vocab.txt + tokenizer files), written with our own parameter-name mapping."""
    import json

    import numpy as np
    import transformers
    from flax import nnx
    from safetensors.numpy import save_file

    from atpo_jax.models.bert import BertConfig, BertEncoder, hf_name

    os.makedirs(path, exist_ok=True)
    config = BertConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        num_layers=shape["layers"],
        num_heads=shape["heads"],
        intermediate_size=shape["intermediate"],
    )
    model = BertEncoder(config, rngs=nnx.Rngs(seed))
    tensors = {}
    for param_path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(param_path)
        array = np.asarray(variable[...], np.float32)
        tensors[name] = np.ascontiguousarray(array.T if transposed else array)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(
            {
                "model_type": "bert",
                "architectures": ["BertModel"],
                "vocab_size": config.vocab_size,
                "hidden_size": config.hidden_size,
                "num_hidden_layers": config.num_layers,
                "num_attention_heads": config.num_heads,
                "intermediate_size": config.intermediate_size,
                "max_position_embeddings": 512,
                "type_vocab_size": 2,
                "hidden_act": "gelu",
                "layer_norm_eps": 1e-12,
                "pad_token_id": 0,
            },
            f,
        )
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "query", "passage", ":"]
    words = [f"w{i}" for i in range(shape["vocab"] - len(special))]
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(special + words) + "\n")
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(path)


def word_texts(n: int, low: int, high: int, rng: random.Random) -> list[str]:
    """Texts of vocabulary words (one token each): ``low``-``high`` words."""
    return [
        " ".join(f"w{rng.randrange(20000)}" for _ in range(rng.randint(low, high)))
        for _ in range(n)
    ]


def measure_encoding(shape_name: str, root: str, rng: random.Random) -> None:
    from atpo_jax.models.text_encoder import TextEncoder

    path = os.path.join(root, shape_name)
    save_random_bert(path, ENCODER_SHAPES[shape_name])
    encoder = TextEncoder.from_pretrained(path, max_length=256, batch_size=64)
    n_passages = 128 if shape_name == "base" else 4096
    passages = word_texts(n_passages, 90, 110, rng)  # + prefix, CLS, SEP: the 128-token bucket
    queries = word_texts(128 if shape_name == "base" else 2048, 4, 10, rng)  # the 16-token bucket
    compile_s = timed(lambda: encoder.encode_passages(passages[:64]))
    compile_s += timed(lambda: encoder.encode_queries(queries[:1]))
    compile_s += timed(lambda: encoder.encode_queries(queries[:32]))
    rows = {
        "passages/s (batch 64, ~100 words)": n_passages
        / timed(lambda: encoder.encode_passages(passages)),
        "queries/s (1 per call)": 64
        / timed(lambda: [encoder.encode_queries([q]) for q in queries[:64]]),
        "queries/s (32 per call)": len(queries)
        / timed(
            lambda: [
                encoder.encode_queries(queries[i : i + 32]) for i in range(0, len(queries), 32)
            ]
        ),
    }
    torch_rate = torch_passages_per_s(path, passages[:64])
    if torch_rate is not None:
        rows["transformers BertModel (PyTorch), passages/s"] = torch_rate
    shape = ENCODER_SHAPES[shape_name]
    print(
        f"\n== encoder {shape_name}: {shape['layers']} layers, hidden {shape['hidden']}, float32, "
        f"CPU ({os.cpu_count()} cores); compile {compile_s:.1f} s for 3 shapes"
    )
    for name, value in rows.items():
        print(f"   {name:<46} {value:>10.1f}")


def torch_passages_per_s(path: str, passages: list[str]) -> float | None:
    """The same checkpoint and texts through transformers' PyTorch BertModel (the baseline; None
    without torch). Padded to 128 tokens like our bucket."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()
    batch = tokenizer(
        ["passage: " + p for p in passages],
        padding="max_length",
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )
    with torch.no_grad():
        model(**batch)  # warm-up
        return len(passages) / timed(lambda: model(**batch))


def measure_faiss(count: int, rng_seed: int, data: str) -> None:
    import numpy as np

    from atpo_jax.tools import faiss_index
    from atpo_jax.tools.faiss_index import IndexOptions

    rng = np.random.default_rng(rng_seed)
    dim = 768

    def unit_rows(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def unit(n):
        return unit_rows(rng.standard_normal((n, dim), dtype=np.float32))

    if data == "uniform":  # no neighbourhoods at all in 768-d: the worst case for IVF
        vectors, queries = unit(count), unit(512)
    else:  # clustered, like real embeddings: near one of count/50 centres; queries near points
        centres = unit(max(1, count // 50))
        vectors = unit_rows(centres[rng.integers(len(centres), size=count)] + 0.5 * unit(count))
        queries = unit_rows(vectors[rng.integers(count, size=512)] + 0.3 * unit(512))
    flat = faiss_index.new_index(dim, IndexOptions(), count)
    flat.add(vectors)
    ivf_options = IndexOptions(type="ivf")
    ivf = faiss_index.new_index(dim, ivf_options, count)
    train_s = timed(lambda: ivf.train(vectors[faiss_index.training_rows(ivf_options, count)]))
    ivf.add(vectors)
    nlist = faiss_index.resolved_nlist(ivf_options, count)
    _, exact = faiss_index.search(flat, queries, 3)
    print(
        f"\n== FAISS over {count} random {data} unit vectors, d={dim}, top 3, CPU "
        f"({os.cpu_count()} cores); IVF nlist={nlist}, trained in {train_s:.1f} s"
    )
    print(f"   {'index':<22} {'1 query (ms)':>13} {'32/batch (ms/query)':>20} {'recall@3':>9}")

    def row(name, index):
        single = timed(
            lambda: [faiss_index.search(index, queries[i : i + 1], 3) for i in range(64)]
        )
        batched = timed(
            lambda: [faiss_index.search(index, queries[i : i + 32], 3) for i in range(0, 512, 32)]
        )
        ids = faiss_index.search(index, queries, 3)[1]
        hit = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(ids, exact, strict=True)])
        print(f"   {name:<22} {single / 64 * 1e3:>13.2f} {batched / 512 * 1e3:>20.3f} {hit:>9.3f}")

    def numpy_top3(batch):
        scores = batch @ vectors.T
        return np.argpartition(-scores, 3, axis=1)[:, :3]

    class NumpyBaseline:  # brute force with NumPy's BLAS, the baseline of the table
        d = dim

        @staticmethod
        def search(batch, k):
            return None, numpy_top3(batch)

    row("NumPy matmul (baseline)", NumpyBaseline)
    row("flat (exact)", flat)
    for nprobe in (8, 32, 128):
        options = IndexOptions(type="ivf", nlist=nlist, nprobe=nprobe)
        faiss_index.set_search_parameters(ivf, options, on_gpu=False)
        row(f"ivf nprobe={nprobe}", ivf)


def measure_dense_server(root: str, args: argparse.Namespace, rng: random.Random) -> None:
    from atpo_jax.models.text_encoder import TextEncoder
    from atpo_jax.tools.dense_index import build_dense_index

    encoder_dir = os.path.join(root, "base")
    if not os.path.isdir(encoder_dir):
        save_random_bert(encoder_dir, ENCODER_SHAPES["base"])
    corpus = os.path.join(root, "corpus.jsonl")
    rows = [{"id": str(i), "contents": t} for i, t in enumerate(word_texts(256, 10, 20, rng))]
    write_corpus(rows, corpus)
    index = os.path.join(root, "index")
    encoder = TextEncoder.from_pretrained(encoder_dir, max_length=256, batch_size=64)
    build_s = timed(lambda: build_dense_index(encoder, corpus, index, progress=False))
    n = args.dense_queries
    queries = word_texts(n, 4, 10, rng)
    k = args.topk
    # Every client's request is admitted (the default --max-concurrent-requests 16 would answer
    # half of 32 clients with 503).
    server_args = ["--method", "dense", "--index", index, "--max-concurrent-requests", "64"]
    proc, url = start_server_with(server_args)
    results = {}
    try:
        clients = threading.local()

        def reference_style(q: str) -> None:
            if not hasattr(clients, "c"):
                clients.c = httpx.Client(timeout=120, trust_env=False)
            r = clients.c.post(url, json={"queries": [q], "topk": k, "return_scores": True})
            r.raise_for_status()

        # Warm every batch bucket the batched client can produce (compiles are not measured).
        for size in (1, 2, 4, 8, 16, 32, 64):
            body = {"queries": queries[:size], "topk": k}
            httpx.post(url, json=body, timeout=300, trust_env=False)
        results[f"{args.clients} clients, 1 query/request"] = n / timed(
            lambda: run_threads(args.clients, queries, reference_style)
        )
        retry = RetryPolicy(read_timeout_s=300)
        with HttpRetriever(url, retry=retry, batch_wait_s=0.002, max_batch_size=64) as client:
            elapsed = timed(
                lambda: run_threads(args.clients, queries, lambda q: client.search([q], k))
            )
            requests = client.requests_sent
        results[f"HttpRetriever, {args.clients} callers, batched"] = n / elapsed
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(
        f"\n== dense retrieval server (base-shaped random encoder, float32, flat index over 256 "
        f"passages built in {build_s:.0f} s), {n} queries of 4-10 words, top {k}, "
        f"{os.cpu_count()} CPUs"
    )
    for name, qps in results.items():
        print(f"   {name:<40} {qps:>8.1f} queries/s")
    print(f"   HttpRetriever sent {requests} requests ({n / requests:.1f} queries each)")


def measure_dense(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as root:
        for shape_name in args.encoders:
            measure_encoding(shape_name, root, rng)
        for data in args.faiss_data:
            measure_faiss(args.dense_vectors, args.seed, data)
        if not args.skip_dense_server:
            measure_dense_server(root, args, rng)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["bm25", "dense"],
        choices=["bm25", "dense"],
        help="what to run",
    )
    parser.add_argument("--dense-vectors", type=int, default=100_000, help="FAISS benchmark size")
    parser.add_argument(
        "--faiss-data",
        nargs="*",
        default=["uniform", "clustered"],
        choices=["uniform", "clustered"],
    )
    parser.add_argument("--skip-dense-server", action="store_true")
    parser.add_argument(
        "--dense-queries", type=int, default=256, help="queries for the dense server measurement"
    )
    parser.add_argument(
        "--encoders", nargs="*", default=["tiny", "base"], choices=list(ENCODER_SHAPES)
    )
    parser.add_argument("--docs", type=int, nargs="+", default=[5000, 50000], help="corpus sizes")
    parser.add_argument("--queries", type=int, default=1000, help="queries per measurement")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients/threads")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if "bm25" in args.parts:
        for num_docs in args.docs:
            measure(num_docs, args)
    if "dense" in args.parts:
        measure_dense(args)


if __name__ == "__main__":
    main()
