"""A real CausalLM whose next-token distribution is scripted: a successor table with a sharpness.

Attention and MLP outputs are zeroed, so the residual stream at each position is the token's
embedding (one-hot). The final RMSNorm turns it into ``sqrt(V)·onehot`` and the untied lm_head maps
token ``a`` to logit ``sharpness[a]`` on ``successor[a]`` and 0 elsewhere. Greedy decoding therefore
walks the successor table, and the sampling entropy after token ``a`` is set by ``sharpness[a]``,
while every engine code path (cache writes, masks, sampling) runs for real.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from atpo_jax.models import CausalLM, ModelConfig


def successor_model(
    successor: Sequence[int], sharpness: float | Sequence[float] = 30.0
) -> CausalLM:
    vocab = len(successor)
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
    sharp = np.broadcast_to(np.asarray(sharpness, np.float32), (vocab,))
    head = np.zeros((vocab, vocab), np.float32)
    head[np.arange(vocab), np.asarray(successor)] = sharp / np.sqrt(vocab)
    model.embed_tokens.embedding[...] = jnp.eye(vocab, dtype=jnp.float32)
    model.lm_head.kernel[...] = jnp.asarray(head)
    for layer in model.layers:
        layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(layer.self_attn.o_proj.kernel[...])
        layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    return model


def piece_decoder(pieces: Sequence[str]):
    """A tokenizer ``decode``: the concatenation of each id's text piece (like byte-level BPE)."""
    return lambda ids: "".join(pieces[int(i)] for i in ids)
