"""Block-sparse tree attention equals dense attention under the mask its intervals stand for.

The reference is ``jax.nn.dot_product_attention`` with the dense [B, 1, T, T] boolean mask
``j <= i <= visible_end[j]`` (built here, never by the kernel), and a NumPy loop over queries for
one case; values and gradients, jitted and not, grouped-query heads, lengths that are not a
multiple of the tile, and tiles that are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atpo_jax.models.tree_attention import _live_tiles, dense_visibility, tree_attention


def _qkv(b, t, heads, kv_heads, d=8, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, heads, d), dtype)
    k = jax.random.normal(keys[1], (b, t, kv_heads, d), dtype)
    v = jax.random.normal(keys[2], (b, t, kv_heads, d), dtype)
    return q, k, v


def _random_ends(rng: np.random.Generator, b: int, t: int, reach: int) -> np.ndarray:
    """Random intervals: key j is seen by queries j .. j + U[0, reach)."""
    j = np.arange(t)
    return np.stack([np.minimum(t - 1, j + rng.integers(0, reach, t)) for _ in range(b)]).astype(
        np.int32
    )


def _forest_ends() -> np.ndarray:
    """A forest in depth-first order: prompt 0-3; node A 4-9 with child B 10-13 and child C
    14-19; a second tree 20-24 with one node 25-30; padding 31-39 (sees itself only)."""
    end = np.arange(40, dtype=np.int32)
    end[0:4] = 19
    end[4:10] = 19
    end[10:14] = 13
    end[14:20] = 19
    end[20:25] = 30
    end[25:31] = 30
    return end[None]


def _reference(q, k, v, end):
    mask = dense_visibility(end)[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _numpy_reference(q, k, v, end):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, d = q.shape
    g = n // k.shape[2]
    out = np.zeros_like(q)
    for bb in range(b):
        for i in range(t):
            seen = [j for j in range(i + 1) if i <= end[bb, j]]
            for h in range(n):
                s = np.array([q[bb, i, h] @ k[bb, j, h // g] for j in seen]) / np.sqrt(d)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bb, i, h] = p @ v[bb, seen, h // g]
    return out


def test_forest_matches_a_numpy_loop():
    end = _forest_ends()
    q, k, v = _qkv(1, 40, 4, 2, seed=3)
    got = tree_attention(q, k, v, jnp.asarray(end), block=8)
    np.testing.assert_allclose(np.asarray(got), _numpy_reference(q, k, v, end), atol=2e-6)


@pytest.mark.parametrize(
    "b, t, heads, kv_heads, block, reach, jit",
    [
        (2, 100, 4, 2, 16, 40, True),
        (1, 64, 2, 2, 64, 64, True),
        (3, 37, 6, 1, 8, 5, True),
        (1, 130, 4, 4, 32, 200, True),
        (1, 48, 4, 2, 16, 20, False),  # eager: the same kernel without jit
    ],
)
def test_values_and_gradients_match_dense_attention(b, t, heads, kv_heads, block, reach, jit):
    rng = np.random.default_rng(t)
    end = jnp.asarray(_random_ends(rng, b, t, reach))
    q, k, v = _qkv(b, t, heads, kv_heads, seed=t)
    weight = jax.random.normal(jax.random.key(1), q.shape)

    def loss(fn):
        def value(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(jnp.sin(out) * weight), out

        return jax.value_and_grad(value, (0, 1, 2), has_aux=True)

    ours = loss(lambda q, k, v: tree_attention(q, k, v, end, block=block))
    (got, got_out), got_grads = (jax.jit(ours) if jit else ours)(q, k, v)
    (want, want_out), want_grads = jax.jit(loss(lambda q, k, v: _reference(q, k, v, end)))(q, k, v)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=2e-6)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


def test_unrelated_tiles_are_skipped():
    # Four rows of 16 tokens packed end to end, tiles of 16: only the diagonal tiles are live.
    end = np.repeat(np.arange(4) * 16 + 15, 16)[None].astype(np.int32)
    live = np.asarray(_live_tiles(jnp.asarray(end), 16))
    np.testing.assert_array_equal(live, np.eye(4, dtype=bool))
    # A prompt seen by everything makes its tile column live below the diagonal.
    end[0, :16] = 63
    live = np.asarray(_live_tiles(jnp.asarray(end), 16))
    assert live[:, 0].all() and live[1:, 1:].sum() == 3


def test_bfloat16_inputs_stay_close_to_float32():
    end = jnp.asarray(_forest_ends())
    q, k, v = _qkv(1, 40, 4, 2, seed=5)
    want = tree_attention(q, k, v, end, block=16)
    got = tree_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), end, block=16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=5e-2)


def test_shape_errors_name_the_arguments():
    q, k, v = _qkv(1, 8, 4, 2)
    with pytest.raises(ValueError, match="visible_end"):
        tree_attention(q, k, v, jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="multiple of K"):
        tree_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), None)
