"""Scripted policies and tokenizers for engine and tree-search tests.

``logit_table_model`` builds a real CausalLM whose next-token logits depend only on the current
token: attention and MLP outputs are zeroed, so the residual stream at each position is the token's
one-hot embedding, the final RMSNorm makes it ``sqrt(V)·onehot`` and the untied lm_head maps token
``a`` to the logit row ``table[a]``. Generation is then a Markov chain we choose (deterministic with
sharp rows, with controlled entropy otherwise), while every engine code path runs for real.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from atpo_jax.models import CausalLM, ModelConfig


def logit_table_model(table: np.ndarray) -> CausalLM:
    """A CausalLM with ``logits(next | current = a) = table[a]`` ([V, V] array)."""
    table = np.asarray(table, np.float32)
    vocab = table.shape[0]
    config = ModelConfig(
        model_type="qwen3",
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=8,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        qk_norm=True,
        tie_word_embeddings=False,
    )
    model = CausalLM(config, rngs=nnx.Rngs(0))
    model.embed_tokens.embedding[...] = jnp.eye(vocab, dtype=jnp.float32)
    model.lm_head.kernel[...] = jnp.asarray(table / np.sqrt(vocab))
    for layer in model.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    return model


def successor_model(
    successor: Sequence[int], sharpness: float | Sequence[float] = 30.0
) -> CausalLM:
    """Greedy decoding walks ``successor``; ``sharpness[a]`` is the logit margin after token a."""
    vocab = len(successor)
    sharp = np.broadcast_to(np.asarray(sharpness, np.float32), (vocab,))
    table = np.zeros((vocab, vocab), np.float32)
    table[np.arange(vocab), np.asarray(successor)] = sharp
    return logit_table_model(table)


def piece_decoder(pieces: Sequence[str]):
    """A tokenizer ``decode``: the concatenation of each id's text piece (like byte-level BPE)."""
    return lambda ids, **_: "".join(pieces[int(i)] for i in ids)


class PieceTokenizer:
    """Greedy longest-match tokenizer over a fixed list of text pieces (id = index)."""

    def __init__(self, pieces: Sequence[str], eos: int = 0):
        self.pieces = list(pieces)
        self.eos_token_id = eos
        self._by_text = {p: i for i, p in enumerate(self.pieces) if p}
        self._longest = max(len(p) for p in self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(
            self.pieces[int(i)]
            for i in ids
            if not (skip_special_tokens and int(i) == self.eos_token_id)
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for size in range(min(self._longest, len(text) - i), 0, -1):
                if text[i : i + size] in self._by_text:
                    ids.append(self._by_text[text[i : i + size]])
                    i += size
                    break
            else:
                raise ValueError(f"PieceTokenizer cannot encode {text[i : i + 20]!r}")
        return ids
