"""The JAX e5 encoder against transformers' PyTorch BertModel (tiny random BERT built here)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from atpo_jax.models.bert import BertCheckpointError, load_bert
from atpo_jax.models.config import ConfigError
from atpo_jax.models.text_encoder import TextEncoder, buckets
from tests.tools import dense_helpers
from tests.tools.conftest import MAX_LENGTH

TEXTS = [
    "ba",  # one word
    "query: " + dense_helpers.sentence(__import__("random").Random(3), 5, 9),
    " ".join(dense_helpers.WORDS[:60]),  # truncated at MAX_LENGTH tokens
    'Kor "Ta" ki 1987 zebra',  # digits, quotes, sub-word pieces
]


def test_pooled_embeddings_match_transformers(dense):
    want = dense_helpers.torch_embeddings(dense.torch_model, dense.encoder_dir, TEXTS, MAX_LENGTH)
    got = dense.encoder.encode(TEXTS)
    assert got.shape == (len(TEXTS), 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_prefixes_are_the_e5_ones(dense):
    np.testing.assert_array_equal(
        dense.encoder.encode_queries(["ba ke"]), dense.encoder.encode(["query: ba ke"])
    )
    np.testing.assert_array_equal(
        dense.encoder.encode_passages(["ba ke"]), dense.encoder.encode(["passage: ba ke"])
    )
    assert not np.allclose(
        dense.encoder.encode_queries(["ba ke"]), dense.encoder.encode_passages(["ba ke"])
    )


def test_batch_composition_and_buckets_do_not_change_an_embedding(dense):
    # Batch buckets 4 (all), 1 (alone, lengths 16 and 32) and 2 (pairs): the padding rows, the
    # padded length and the neighbours never change an embedding.
    together = dense.encoder.encode(TEXTS)
    alone = np.concatenate([dense.encoder.encode([t]) for t in TEXTS])
    pairs = dense.encoder.encode(TEXTS[:3], batch_size=2)
    np.testing.assert_allclose(alone, together, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pairs, together[:3], rtol=1e-5, atol=1e-6)
    assert dense.encoder.encode([]).shape == (0, 32)
    assert buckets(256, 16) == [16, 32, 64, 128, 256] and buckets(100, 1)[-2:] == [64, 100]


def test_bfloat16_encoder_is_close_to_float32(dense):
    bf16 = TextEncoder.from_pretrained(dense.encoder_dir, dtype="bfloat16", max_length=MAX_LENGTH)
    assert bf16.dtype_name == "bfloat16"
    got = bf16.encode(TEXTS)
    assert got.dtype == np.float32  # pooled and normalised in float32 whatever the compute dtype
    cosine = np.sum(got * dense.encoder.encode(TEXTS), axis=1)
    assert np.all(cosine > 0.99), cosine


def test_pytorch_bin_and_task_model_checkpoints_load(tmp_path, dense):
    """``pytorch_model.bin`` reads like safetensors; a ``BertForMaskedLM`` checkpoint (``bert.``
    prefix, ``cls.*`` head) gives the embeddings of its inner BertModel."""
    bin_dir = tmp_path / "bin"
    torch_model = dense_helpers.save_tiny_bert(bin_dir, seed=5)
    # Older checkpoints (and transformers 4 with safe_serialization=False) ship this file.
    torch.save(torch_model.state_dict(), bin_dir / "pytorch_model.bin")
    os.remove(bin_dir / "model.safetensors")
    want = dense_helpers.torch_embeddings(torch_model, bin_dir, TEXTS, MAX_LENGTH)
    got = TextEncoder.from_pretrained(bin_dir, max_length=MAX_LENGTH).encode(TEXTS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    mlm_dir = tmp_path / "mlm"
    mlm = dense_helpers.save_tiny_bert(mlm_dir, seed=6, model_class="BertForMaskedLM")
    want = dense_helpers.torch_embeddings(mlm.bert, mlm_dir, TEXTS, MAX_LENGTH)
    got = TextEncoder.from_pretrained(mlm_dir, max_length=MAX_LENGTH).encode(TEXTS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _edit_config(path, **changes):
    with open(path / "config.json") as f:
        config = json.load(f)
    config.update(changes)
    with open(path / "config.json", "w") as f:
        json.dump(config, f)


def test_unusable_checkpoints_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json not found"):
        load_bert(tmp_path)
    bert = tmp_path / "bert"
    dense_helpers.save_tiny_bert(bert, layers=1)
    _edit_config(bert, model_type="qwen3")
    with pytest.raises(ConfigError, match=r"bert/config.json: model_type 'qwen3' is not supported"):
        load_bert(bert)
    _edit_config(bert, model_type="bert", position_embedding_type="relative_key")
    with pytest.raises(ConfigError, match=r"position_embedding_type 'relative_key'"):
        load_bert(bert)
    _edit_config(bert, position_embedding_type="absolute", hidden_size=48, num_attention_heads=4)
    with pytest.raises(
        BertCheckpointError, match=r"has shape \[32\] but config.json implies \[48\]"
    ):
        load_bert(bert)
    _edit_config(bert, hidden_size=32, num_hidden_layers=2)
    with pytest.raises(BertCheckpointError, match=r"tensor 'encoder\.layer\.1\..*' is missing"):
        load_bert(bert)
    os.remove(bert / "model.safetensors")
    with pytest.raises(BertCheckpointError, match=r"no weights found"):
        load_bert(bert)
