"""Session fixtures of the dense-retrieval tests: one tiny random BERT, its encoder, a corpus and
a flat index, built once (the encoder's compiled programs are then shared by every test)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from tests.tools import dense_helpers

MAX_LENGTH = 32  # two length buckets (16, 32); the longer passages are truncated
# 3 full shards: every shard is one forward pass of the same shape (one compiled program).
CORPUS_SIZE = 192
SHARD_SIZE = 64


@dataclasses.dataclass(frozen=True)
class DenseSetup:
    encoder_dir: str
    torch_model: object
    encoder: object  # atpo_jax.models.text_encoder.TextEncoder
    corpus: str
    rows: list
    index_dir: str


@pytest.fixture(scope="session")
def dense(tmp_path_factory) -> DenseSetup:
    from atpo_jax.models.text_encoder import TextEncoder
    from atpo_jax.tools.dense_index import build_dense_index

    root = tmp_path_factory.mktemp("dense")
    encoder_dir = str(root / "encoder")
    torch_model = dense_helpers.save_tiny_bert(encoder_dir)
    encoder = TextEncoder.from_pretrained(encoder_dir, max_length=MAX_LENGTH, batch_size=64)
    corpus = str(root / "corpus.jsonl")
    rows = dense_helpers.make_corpus(corpus, CORPUS_SIZE)
    index_dir = str(root / "flat")
    build_dense_index(encoder, corpus, index_dir, shard_size=SHARD_SIZE, progress=False)
    return DenseSetup(encoder_dir, torch_model, encoder, corpus, rows, index_dir)


@pytest.fixture(scope="session")
def reference_embeddings(dense):
    """(passages [N, H], function queries -> [Q, H]) from transformers' PyTorch model."""
    passages = dense_helpers.torch_embeddings(
        dense.torch_model,
        dense.encoder_dir,
        ["passage: " + row["contents"] for row in dense.rows],
        MAX_LENGTH,
    )

    def queries(texts):
        return dense_helpers.torch_embeddings(
            dense.torch_model, dense.encoder_dir, ["query: " + t for t in texts], MAX_LENGTH
        )

    return passages, queries


def corpus_copy(dense: DenseSetup, path: str | os.PathLike) -> str:
    """A byte-identical copy of the corpus elsewhere (the index checks content, not paths)."""
    with open(dense.corpus, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    return os.fspath(path)
