"""The grouped XLA attention kernel equals jax.nn.dot_product_attention (values and gradients)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atpo_jax.models.attention import causal_attention, masked_attention


def _qkv(heads: int, kv_heads: int, t: int, s: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (3, t, heads, 8))
    k = jax.random.normal(keys[1], (3, s, kv_heads, 8))
    v = jax.random.normal(keys[2], (3, s, kv_heads, 8))
    return q, k, v


def _reference(q, k, v, lengths):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)


@jax.jit
def _both_with_grads(q, k, v, lengths, weight):
    """(ours, reference, ours' grads, reference grads, ours without lengths, reference without)."""

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, lengths)) * weight)

    return (
        causal_attention(q, k, v, lengths),
        _reference(q, k, v, lengths),
        jax.grad(loss(causal_attention), (0, 1, 2))(q, k, v),
        jax.grad(loss(_reference), (0, 1, 2))(q, k, v),
        causal_attention(q, k, v),
        _reference(q, k, v, None),
    )


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_causal_matches_jax_reference(heads, kv_heads):
    q, k, v = _qkv(heads, kv_heads, 7, 7)
    lengths = jnp.asarray([7, 4, 1], jnp.int32)
    real = np.arange(7)[None, :] < np.asarray(lengths)[:, None]
    weight = jnp.asarray(real, jnp.float32)[..., None, None]  # outputs at padding are unspecified
    got, want, got_grads, want_grads, got_full, want_full = _both_with_grads(
        q, k, v, lengths, weight
    )
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_full), np.asarray(want_full), atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, t", [(4, 1, 1), (4, 2, 3)])
def test_masked_matches_jax_reference(heads, kv_heads, t):
    q, k, v = _qkv(heads, kv_heads, t, 9, seed=1)
    mask = jax.random.bernoulli(jax.random.key(2), 0.6, (3, 1, t, 9)).at[..., 0].set(True)
    got, want = jax.jit(
        lambda q, k, v, m: (
            # The KV-cache layout: keys [B, K, D, S], values [B, K, S, D].
            masked_attention(q, k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3), m),
            jax.nn.dot_product_attention(q, k, v, mask=m),
        )
    )(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_bfloat16_inputs_keep_dtype():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(4, 2, 5, 5))
    out, want = jax.jit(lambda q, k, v: (causal_attention(q, k, v), _reference(q, k, v, None)))(
        q, k, v
    )
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32), atol=3e-2)
