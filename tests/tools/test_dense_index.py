"""FAISS search against brute-force NumPy top-k, the resumable index build, the manifest checks."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from atpo_jax.tools import faiss_index
from atpo_jax.tools.build_index import main as build_index_main
from atpo_jax.tools.corpus import write_corpus
from atpo_jax.tools.dense import DenseRetriever
from atpo_jax.tools.dense_index import (
    IndexBuildError,
    IndexMismatchError,
    build_dense_index,
    load_manifest,
    read_faiss_index,
    shard_paths,
)
from atpo_jax.tools.faiss_index import IndexOptions, IndexType
from tests.tools import dense_helpers
from tests.tools.conftest import CORPUS_SIZE, MAX_LENGTH, SHARD_SIZE, corpus_copy


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors():
    """2000 passages and 50 queries of dimension 32, their exact inner products (float64) and
    the NumPy top-10 (unique: no two of the 11 best scores of a query are within 1e-5)."""
    passages, queries = unit_vectors(2000, 32, 0), unit_vectors(50, 32, 1)
    scores = queries.astype(np.float64) @ passages.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")
    top = -np.sort(-scores, axis=1)[:, :11]
    assert np.all(-np.diff(top, axis=1) > 1e-5)  # the test's premise: no near ties
    return passages, queries, scores, order[:, :10]


def recall(ids: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, want, strict=True)]))


def test_flat_index_equals_numpy_top_k(vectors):
    passages, queries, scores, want = vectors
    index = faiss_index.new_index(32, IndexOptions(), len(passages))
    index.add(passages)
    got_scores, got_ids = faiss_index.search(index, queries, 10)
    np.testing.assert_array_equal(got_ids, want)
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, want, axis=1), atol=1e-5)


def test_ivf_scanning_every_cell_equals_numpy_top_k(vectors):
    passages, queries, scores, want = vectors
    options = IndexOptions(type="ivf", nlist=16, nprobe=16)
    index = faiss_index.new_index(32, options, len(passages))
    index.train(passages[faiss_index.training_rows(options, len(passages))])
    index.add(passages)
    faiss_index.set_search_parameters(index, options, on_gpu=False)
    got_scores, got_ids = faiss_index.search(index, queries, 10)
    np.testing.assert_array_equal(got_ids, want)
    np.testing.assert_allclose(got_scores, np.take_along_axis(scores, want, axis=1), atol=1e-5)
    # One cell of 16 is an approximation (which is what nprobe trades): recall drops.
    faiss_index.set_search_parameters(index, IndexOptions(type="ivf", nprobe=1), on_gpu=False)
    assert recall(faiss_index.search(index, queries, 10)[1], want) < 0.9


def test_hnsw_recall_is_high(vectors):
    passages, queries, _, want = vectors
    options = IndexOptions(type="hnsw", hnsw_m=16, ef_construction=64, ef_search=128)
    index = faiss_index.new_index(32, options, len(passages))
    index.add(passages)
    faiss_index.set_search_parameters(index, options, on_gpu=False)
    got = recall(faiss_index.search(index, queries, 10)[1], want)
    print(
        f"HNSW (M=16, efConstruction=64, efSearch=128) recall@10 on 2000 random unit vectors: {got:.3f}"
    )
    assert got >= 0.95


def test_automatic_ivf_cells():
    assert faiss_index.auto_nlist(100_000) == 1264  # 4 sqrt(N)
    assert faiss_index.auto_nlist(1000) == 25  # at least 39 training points per cell
    assert faiss_index.resolved_nlist(IndexOptions(type="ivf", nlist=500), 100) == 100


# ------------------------------------------------------------------------------- the retriever


def test_dense_retriever_top_k_equals_brute_force_over_transformers_embeddings(
    dense, reference_embeddings
):
    """Encoder + flat index against the e5 recipe in PyTorch and a NumPy brute-force search."""
    passages, encode_queries = reference_embeddings
    queries = dense_helpers.make_queries(64)
    retriever = DenseRetriever(dense.index_dir, encoder=dense.encoder)
    hits = retriever.search(queries, 5)
    ids = np.array([[int(p.id.removeprefix("doc")) for p in row] for row in hits])
    scores = np.array([[p.score for p in row] for row in hits])
    reference = encode_queries(queries).astype(np.float64) @ passages.astype(np.float64).T
    clear = dense_helpers.assert_exact_top_k(scores, ids, reference, 5)
    assert clear.mean() > 0.9  # almost every query's top-5 is unique, and matched exactly
    assert hits[0][0].document == dense.rows[ids[0, 0]]
    assert retriever.search([], 3) == [] and len(retriever.search(["ba"], 500)[0]) == CORPUS_SIZE


def _copy_embeddings(dense, out) -> str:
    """A new index folder holding the fixture build's shards (so only the FAISS index is built)."""
    os.makedirs(out)
    shutil.copytree(os.path.join(dense.index_dir, "shards"), os.path.join(out, "shards"))
    shutil.copy(os.path.join(dense.index_dir, "build.json"), out)
    return os.fspath(out)


def test_ivf_and_hnsw_indexes_from_the_same_embeddings(dense, reference_embeddings, tmp_path):
    passages, encode_queries = reference_embeddings
    queries = dense_helpers.make_queries(64)
    reference = encode_queries(queries).astype(np.float64) @ passages.astype(np.float64).T
    want = np.argsort(-reference, axis=1, kind="stable")[:, :5]
    for options in (
        IndexOptions(type="ivf", nlist=4, nprobe=4),
        IndexOptions(type="hnsw", hnsw_m=8, ef_search=64),
    ):
        out = _copy_embeddings(dense, tmp_path / str(options.type))
        report = build_dense_index(
            dense.encoder, dense.corpus, out, options=options, shard_size=SHARD_SIZE, progress=False
        )
        assert report.shards_encoded == 0 and report.index_rebuilt  # the embeddings were reused
        assert load_manifest(out).index == options
        hits = DenseRetriever(out, encoder=dense.encoder).search(queries, 5)
        ids = np.array([[int(p.id.removeprefix("doc")) for p in row] for row in hits])
        if options.type is IndexType.IVF:  # nprobe = nlist: exact
            scores = np.array([[p.score for p in row] for row in hits])
            dense_helpers.assert_exact_top_k(scores, ids, reference, 5)
        else:
            assert recall(ids, want) >= 0.9


# ------------------------------------------------------------------------------- the build


class CountingEncoder:
    """The session encoder, counting the passages it is asked to encode."""

    def __init__(self, encoder):
        self.inner, self.passages = encoder, 0
        self.batch_size, self.dimension = encoder.batch_size, encoder.dimension
        self.dtype_name = encoder.dtype_name

    def fingerprint(self):
        return self.inner.fingerprint()

    def encode_passages(self, texts):
        self.passages += len(texts)
        return self.inner.encode_passages(texts)


def _same_index(a: str, b: str) -> None:
    for shard in range(CORPUS_SIZE // SHARD_SIZE):
        np.testing.assert_array_equal(
            np.load(shard_paths(a, shard)[0]), np.load(shard_paths(b, shard)[0])
        )
    index_a = read_faiss_index(a, load_manifest(a))
    index_b = read_faiss_index(b, load_manifest(b))
    np.testing.assert_array_equal(
        index_a.reconstruct_n(0, CORPUS_SIZE), index_b.reconstruct_n(0, CORPUS_SIZE)
    )


def test_an_interrupted_build_resumes_after_its_last_complete_shard(dense, tmp_path):
    out = str(tmp_path / "index")
    encoder = CountingEncoder(dense.encoder)

    def killed_after_shard_1(shard: int) -> None:
        if shard == 1:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        build_dense_index(
            encoder, dense.corpus, out, shard_size=SHARD_SIZE, progress=False,
            on_shard_done=killed_after_shard_1,
        )  # fmt: skip
    assert encoder.passages == 2 * SHARD_SIZE
    with pytest.raises(
        IndexMismatchError, match=r"manifest.json not found: the index build did not finish; rerun"
    ):
        DenseRetriever(out, encoder=dense.encoder)
    report = build_dense_index(encoder, dense.corpus, out, shard_size=SHARD_SIZE, progress=False)
    assert (report.shards_total, report.shards_encoded) == (3, 1)
    assert encoder.passages == CORPUS_SIZE  # shards 0 and 1 were not encoded again
    _same_index(out, dense.index_dir)
    # The manifest, checked against hashes computed here.
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    with open(dense.corpus, "rb") as f:
        assert manifest["corpus"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(dense.encoder_dir, "config.json"), "rb") as f:
        assert manifest["encoder"]["config_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert manifest["encoder"]["path"] == os.path.abspath(dense.encoder_dir)
    assert (manifest["count"], manifest["dimension"], manifest["dtype"]) == (192, 32, "float32")
    assert manifest["index"]["type"] == "flat" and manifest["created"]
    # A finished build run again does nothing.
    again = build_dense_index(encoder, dense.corpus, out, shard_size=SHARD_SIZE, progress=False)
    assert not again.index_rebuilt and encoder.passages == CORPUS_SIZE


def test_a_damaged_shard_is_encoded_again(dense, tmp_path):
    out = str(tmp_path / "index")
    shutil.copytree(dense.index_dir, out)
    npy = shard_paths(out, 1)[0]
    with open(npy, "r+b") as f:
        f.truncate(os.path.getsize(npy) // 2)  # a shard cut short (a full disk, a bad copy)
    open(os.path.join(out, "shards", ".tmp-leftover"), "w").close()  # a killed write
    encoder = CountingEncoder(dense.encoder)
    report = build_dense_index(encoder, dense.corpus, out, shard_size=SHARD_SIZE, progress=False)
    assert report.shards_encoded == 1 and encoder.passages == SHARD_SIZE
    assert not os.path.exists(os.path.join(out, "shards", ".tmp-leftover"))
    _same_index(out, dense.index_dir)


def test_a_folder_of_another_build_is_refused(dense, tmp_path):
    out = _copy_embeddings(dense, tmp_path / "index")
    with pytest.raises(
        IndexBuildError,
        match=r"holds embeddings of another build \(it differs in: shard_size\); pass a new --out",
    ):
        build_dense_index(dense.encoder, dense.corpus, out, shard_size=32, progress=False)


def test_the_index_refuses_another_corpus_or_encoder(dense, tmp_path):
    manifest = os.path.join(dense.index_dir, "manifest.json")
    changed = str(tmp_path / "changed.jsonl")
    write_corpus([*dense.rows[:-1], {**dense.rows[-1], "contents": "edited"}], changed)
    with pytest.raises(IndexMismatchError) as err:
        DenseRetriever(dense.index_dir, encoder=dense.encoder, corpus=changed)
    message = str(err.value)
    assert message.startswith(f"{manifest}: the index was built from {dense.corpus}")
    assert f"but the corpus {changed} has sha256" in message
    assert (
        f"Rebuild the index for this corpus: python -m atpo_jax.tools.build_index --encoder "
        f"{os.path.abspath(dense.encoder_dir)} --corpus {changed} --out {dense.index_dir}"
    ) in message
    # The same bytes under another name are the same corpus.
    copy = corpus_copy(dense, tmp_path / "copy.jsonl")
    assert DenseRetriever(dense.index_dir, encoder=dense.encoder, corpus=copy).corpus_path == copy

    other_dir = tmp_path / "other_encoder"
    dense_helpers.save_tiny_bert(other_dir, seed=1)
    from atpo_jax.models.text_encoder import TextEncoder

    other = TextEncoder.from_pretrained(other_dir, max_length=MAX_LENGTH)
    with pytest.raises(
        IndexMismatchError,
        match=r"differs in weights_sha256. Use the encoder the index was built with, or rebuild",
    ):
        DenseRetriever(dense.index_dir, encoder=other)
    truncating = TextEncoder.from_pretrained(dense.encoder_dir, max_length=16)
    with pytest.raises(IndexMismatchError, match=r"differs in max_length"):
        DenseRetriever(dense.index_dir, encoder=truncating)

    with pytest.raises(
        IndexMismatchError,
        match=r"does not exist: build it with python -m atpo_jax.tools.build_index",
    ):
        load_manifest(str(tmp_path / "missing"))
    with pytest.raises(IndexMismatchError, match=r"not a dense index folder"):
        load_manifest(str(tmp_path))


def test_build_index_command(dense, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["--encoder", dense.encoder_dir, "--corpus", dense.corpus, "--out", out]
    build_index_main([*args, "--shard-size", str(SHARD_SIZE), "--batch-size", "64",
                      "--max-length", str(MAX_LENGTH), "--no-progress"])  # fmt: skip
    assert (
        f"{out}: 192 passages, dimension 32, flat index; 3 of 3 shards encoded now"
        in capsys.readouterr().out
    )
    _same_index(out, dense.index_dir)
    with pytest.raises(SystemExit, match=r"--encoder '/nonexistent' is not a directory"):
        build_index_main(["--encoder", "/nonexistent", "--corpus", dense.corpus, "--out", out])
    with pytest.raises(SystemExit, match=r"corpus file '/nonexistent.jsonl' does not exist"):
        build_index_main(
            ["--encoder", dense.encoder_dir, "--corpus", "/nonexistent.jsonl", "--out", out]
        )
