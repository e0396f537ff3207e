"""Tiny random e5-style encoders and generated corpora for the dense-retrieval tests.

Everything is built in the test: a random ``transformers.BertModel`` saved with ``save_pretrained``
and a WordPiece tokenizer made from a small vocab file. ``torch_embeddings`` is the reference: the
e5 recipe run with transformers' PyTorch model (tokenize with padding, mean-pool the last hidden
states over the mask, L2-normalise).
"""

from __future__ import annotations

import os
import random
import string

import numpy as np
import torch
import transformers

from atpo_jax.tools.corpus import write_corpus

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Invented words (whole tokens), the prefixes' pieces, and letters/sub-word pieces so that any
# text tokenizes without [UNK] runs.
WORDS = [a + b for a in "bdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "an", "or")]
VOCAB = [
    *SPECIAL,
    "query",
    "passage",
    ":",
    '"',
    *WORDS,
    *string.ascii_lowercase,
    *("##" + c for c in string.ascii_lowercase),
    *string.digits,
    *("##" + c for c in string.digits),
]


def save_tiny_bert(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    vocab: list[str] = VOCAB,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    max_positions: int = 64,
    model_class: str = "BertModel",
) -> torch.nn.Module:
    """Writes a random BERT (config, weights, tokenizer) to ``path``; returns the torch model.

    Weights are redrawn with a larger spread than BERT's 0.02 init and LayerNorm parameters are
    moved off 1/0, so a mis-mapped tensor changes the embeddings far beyond the test tolerance.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "LayerNorm.weight" in name:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)
    model.save_pretrained(path)
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    # AutoTokenizer builds the WordPiece tokenizer from vocab.txt + config.json (transformers 4
    # and 5 alike); saving writes tokenizer.json and tokenizer_config.json next to them.
    transformers.AutoTokenizer.from_pretrained(path).save_pretrained(path)
    return model


def torch_embeddings(
    model: torch.nn.Module, path: str | os.PathLike, texts: list[str], max_length: int
) -> np.ndarray:
    """The e5 recipe with transformers' PyTorch model: [N, H] float32 unit rows."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.fspath(path))
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def make_corpus(path: str | os.PathLike, count: int, seed: int = 0) -> list[dict]:
    """A wiki-18-shaped corpus: ``"Title"\\ntext`` with 3-40 invented words (some get truncated)."""
    rng = random.Random(seed)
    rows = [
        {"id": f"doc{i}", "contents": f'"{rng.choice(WORDS).title()}"\n{sentence(rng, 3, 40)}'}
        for i in range(count)
    ]
    write_corpus(rows, path)
    return rows


def make_queries(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, 1, 8) for _ in range(count)]


def assert_exact_top_k(scores: np.ndarray, ids: np.ndarray, reference: np.ndarray, k: int):
    """``ids``/``scores`` ([Q, k]) are a correct top-k of the [Q, N] ``reference`` scores.

    The reference's own top-k is unique when its k-th and (k+1)-th scores are apart; then the ids
    must be identical. Where two reference scores are within 1e-5 (float32 rounding of two
    different BLAS kernels can order them either way), the returned items must still have the
    reference's top-k scores.
    """
    order = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    want = np.take_along_axis(reference, order, axis=1)
    np.testing.assert_allclose(scores, want, atol=1e-5)
    got_true = np.take_along_axis(reference, ids, axis=1)
    np.testing.assert_allclose(got_true, want, atol=1e-5)
    sorted_ref = -np.sort(-reference, axis=1)
    clear = np.all(np.abs(np.diff(sorted_ref[:, : k + 1], axis=1)) > 1e-5, axis=1)
    np.testing.assert_array_equal(ids[clear], order[clear])
    return clear
