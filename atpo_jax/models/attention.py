"""Scaled dot-product attention kernels: a grouped-query XLA kernel and cuDNN flash attention.

``causal_attention`` is the training/scoring path (causal over left-aligned rows with per-row
lengths); ``masked_attention`` serves the KV-cache path (an arbitrary [B, 1, T, S] mask).

The XLA kernel folds the query heads of a group into the row dimension, so scores are one batched
[G*T, D] x [D, S] matmul per (row, kv head). ``jax.nn.dot_product_attention``'s XLA fallback maps
over the group axis instead, which XLA:CPU runs about 2x slower forward+backward. On GPU,
``attention_impl="cudnn"`` routes the causal path through ``jax.nn.dot_product_attention``'s cuDNN
flash kernel (padded-causal mask from the lengths, no mask tensor).

Shapes: q [B, T, N, D]; k and v [B, S, K, D] (``causal_attention``) or the KV-cache layout, keys
[B, K, D, S] and values [B, K, S, D] (``masked_attention``); N a multiple of K (G = N / K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a fully masked row gives a uniform (finite) softmax, not NaN


def _grouped(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv_layout: str = "bskd"
) -> jax.Array:
    """Attention with a [B or 1, 1, G*T, S] bool mask over folded rows m = g * T + t.

    ``kv_layout``: ``"bskd"`` for keys and values [B, S, K, D] (the training path) or ``"cache"``
    for the KV-cache layout, keys [B, K, D, S] (transposed) and values [B, K, S, D].
    """
    b, t, n, d = q.shape
    kv_heads = k.shape[2] if kv_layout == "bskd" else k.shape[1]
    key_axes, value_axes = ("bskd", "bskd") if kv_layout == "bskd" else ("bkds", "bksd")
    g = n // kv_heads
    qf = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    scores = jnp.einsum(f"bkmd,{key_axes}->bkms", qf, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * (d**-0.5), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkms,{value_axes}->bkmd", probs, v)
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    seq_lengths: jax.Array | None = None,
    *,
    impl: str = "xla",
) -> jax.Array:
    """Causal self-attention (S == T) over rows whose first ``seq_lengths[b]`` tokens are real.

    Args:
      q: [B, T, N, D] queries; k, v: [B, T, K, D].
      seq_lengths: [B] int32 real tokens per row (left-aligned); ``None`` = all real. Keys at or
        past a row's length are never attended; queries there get finite, meaningless outputs.
      impl: ``"xla"`` (grouped kernel above) or ``"cudnn"`` (flash attention, GPU only).

    Returns:
      [B, T, N, D] in the dtype of ``q``.
    """
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=seq_lengths, implementation="cudnn"
        )
    b, t, n, _ = q.shape
    g = n // k.shape[2]
    query_pos = jnp.tile(jnp.arange(t), g)  # folded row m = g * T + t is query position t
    key_pos = jnp.arange(t)
    mask = (key_pos[None, :] <= query_pos[:, None])[None, None]  # [1, 1, G*T, T]
    if seq_lengths is not None:
        mask = mask & (key_pos < seq_lengths[:, None, None, None])
    return _grouped(q, k, v, mask)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention of [B, T, N, D] queries to KV-cache-layout keys [B, K, D, S] (transposed) and
    values [B, K, S, D] under a [B, 1, T, S] bool mask."""
    g = q.shape[2] // k.shape[1]
    return _grouped(q, k, v, jnp.tile(mask, (1, 1, g, 1)), kv_layout="cache")
