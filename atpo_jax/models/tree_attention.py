"""Block-sparse attention over packed trees, without a [T, T] mask: the XLA path of packed training.

A packed sequence holds a forest laid out in depth-first (pre-)order: the prompt, then every node's
tokens, each node after its parent, each subtree contiguous (``atpo_jax.train.packing``). A token
then sees exactly the tokens of its own node before it and the tokens of its ancestors, which is
one interval per key:

    query i attends to key j   ⇔   j ≤ i ≤ visible_end[j]

where ``visible_end[j]`` is the last position of the subtree of the node that owns ``j`` (the
end of the row for rows packed one after another, the token itself for padding). A
[block_q, block_k] tile of the mask is computed from the keys' ``visible_end`` when the tile is
visited; a tile is skipped (``lax.cond``) when no query of it sees any key of it, so the work
follows the tree: causal tiles above the diagonal and tiles between unrelated subtrees or rows
cost nothing.

The kernel is flash attention (Dao et al. 2022, arXiv 2205.14135) written with ``lax.scan`` over
tiles: an online softmax in the forward pass, which saves only the output and the per-query
log-sum-exp, and a backward pass (``jax.custom_vjp``) that recomputes each live tile's
probabilities, so neither pass stores more than one tile of scores.

Shapes: q [B, T, N, D]; k, v [B, T, K, D] (N a multiple of K: grouped-query attention);
``visible_end`` [B, T] int32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_BLOCK = 256
_NEG = -1e30  # finite: a tile's running max starts here and masked scores never enter exp()


def tree_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    visible_end: jax.Array,
    *,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Attention of every token to the keys it may see in a packed forest (see the module doc).

    Args:
      q: [B, T, N, D] queries.
      k, v: [B, T, K, D] keys and values, N % K == 0.
      visible_end: [B, T] int32, ``visible_end[b, j] >= j``: key j is seen by queries
        ``j .. visible_end[b, j]``. Every query sees at least itself, so no softmax is empty.
      block: tile size (static); T is padded internally to a multiple of it.

    Returns:
      [B, T, N, D] in the dtype of ``q``:
      ``out[b, i] = Σ_j softmax_j(q_i·k_j / √D over visible j) v_j``.

    Example::

        # Two rows of 3 tokens packed into one sequence of 6: each sees only its own row.
        end = jnp.array([[2, 2, 2, 5, 5, 5]])
        out = tree_attention(q, k, v, end)  # q, k, v: [1, 6, heads, dim]
    """
    b, t, n, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d or n % k.shape[2]:
        raise ValueError(
            f"tree_attention: q {q.shape}, k {k.shape}, v {v.shape} are not [B, T, N, D] and "
            "[B, T, K, D] with N a multiple of K"
        )
    if visible_end.shape != (b, t):
        raise ValueError(f"tree_attention: visible_end {visible_end.shape} is not [B, T]={b, t}")
    block = max(1, min(block, t))
    pad = -t % block
    if pad:
        # Padding keys are seen by nobody but themselves; padding queries are dropped below.
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        tail = jnp.broadcast_to(jnp.arange(t, t + pad, dtype=jnp.int32), (b, pad))
        visible_end = jnp.concatenate([visible_end.astype(jnp.int32), tail], axis=1)
    out = _flash(q, k, v, visible_end.astype(jnp.int32), block)
    return out[:, :t]


def _tiles(x: jax.Array, block: int) -> jax.Array:
    """[B, T, ...] -> [T / block, B, block, ...] (the scan axis first)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _untile(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_tiles`."""
    nb, b, block = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, nb * block, *x.shape[3:])


def _live_tiles(visible_end: jax.Array, block: int) -> jax.Array:
    """[nq, nk] bool: does any query of tile qi see any key of tile kj (in any row)?"""
    nb = visible_end.shape[1] // block
    key_reach = jnp.max(visible_end.reshape(-1, nb, block), axis=(0, 2))  # [nk]
    starts = jnp.arange(nb) * block
    causal = starts[None, :] <= starts[:, None]  # key tile starts at or before the query tile
    return causal & (key_reach[None, :] >= starts[:, None])


def _tile_mask(q_start, k_start, end_tile: jax.Array, block: int) -> jax.Array:
    """[B, 1, 1, block_q, block_k] visibility of one tile from its keys' ``visible_end``."""
    qpos = q_start + jnp.arange(block)
    kpos = k_start + jnp.arange(block)
    mask = (kpos[None, None, :] <= qpos[None, :, None]) & (
        qpos[None, :, None] <= end_tile[:, None, :]
    )
    return mask[:, None, None]


def _grouped_q(q_tile: jax.Array, kv_heads: int) -> jax.Array:
    """[B, bq, N, D] -> [B, bq, K, G, D]."""
    b, bq, n, d = q_tile.shape
    return q_tile.reshape(b, bq, kv_heads, n // kv_heads, d)


def _scores(q_tile, k_tile, scale):
    """[B, bq, K, G, D] x [B, bk, K, D] -> [B, K, G, bq, bk] float32."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_tile, k_tile, preferred_element_type=jnp.float32)
    return s * scale


def _forward(q, k, v, visible_end, block):
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    scale = d**-0.5
    nb = t // block
    live = _live_tiles(visible_end, block)
    k_tiles, v_tiles, end_tiles = _tiles(k, block), _tiles(v, block), _tiles(visible_end, block)

    def query_tile(_, xs):
        qi, q_tile = xs
        q_tile = _grouped_q(q_tile, kv_heads)

        def key_tile(carry, ys):
            kj, k_tile, v_tile, end_tile = ys

            def visit(carry):
                m, norm, acc = carry
                s = _scores(q_tile, k_tile, scale)
                mask = _tile_mask(qi * block, kj * block, end_tile, block)
                m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _NEG), axis=-1))
                p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                norm = norm * correction + jnp.sum(p, axis=-1)
                pv = jnp.einsum(
                    "bkgqs,bskd->bkgqd",
                    p.astype(v.dtype),
                    v_tile,
                    preferred_element_type=jnp.float32,
                )
                return m_new, norm, acc * correction[..., None] + pv

            return jax.lax.cond(live[qi, kj], visit, lambda c: c, carry), None

        init = (
            jnp.full((b, kv_heads, g, block), _NEG, jnp.float32),
            jnp.zeros((b, kv_heads, g, block), jnp.float32),
            jnp.zeros((b, kv_heads, g, block, d), jnp.float32),
        )
        (m, norm, acc), _ = jax.lax.scan(
            key_tile, init, (jnp.arange(nb), k_tiles, v_tiles, end_tiles)
        )
        out = acc / norm[..., None]  # every query sees itself: norm > 0
        lse = m + jnp.log(norm)
        # [B, K, G, bq, D] -> [B, bq, N, D]
        out = jnp.moveaxis(out, 3, 1).reshape(b, block, n, d)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = jax.lax.scan(query_tile, None, (jnp.arange(nb), _tiles(q, block)))
    return _untile(out), lse  # lse: [nq, B, K, G, bq]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, visible_end, block):
    return _forward(q, k, v, visible_end, block)[0]


def _flash_fwd(q, k, v, visible_end, block):
    out, lse = _forward(q, k, v, visible_end, block)
    return out, (q, k, v, visible_end, out, lse)


def _flash_bwd(block, residuals, d_out):
    q, k, v, visible_end, out, lse = residuals
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    scale = d**-0.5
    nb = t // block
    live = _live_tiles(visible_end, block)
    # D_i = Σ_d dO_i · O_i, the softmax backward's row term, per query and head.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, T, N]
    k_tiles, v_tiles, end_tiles = _tiles(k, block), _tiles(v, block), _tiles(visible_end, block)

    def query_tile(carry, xs):
        dk, dv = carry  # [nk, B, bk, K, D] float32 accumulators
        qi, q_tile, do_tile, delta_tile, lse_tile = xs
        q_tile = _grouped_q(q_tile, kv_heads)
        do_tile = _grouped_q(do_tile, kv_heads)
        # [B, bq, N] -> [B, K, G, bq]
        delta_tile = jnp.moveaxis(_grouped_q(delta_tile[..., None], kv_heads)[..., 0], 1, 3)

        def key_tile(carry, ys):
            kj, k_tile, v_tile, end_tile = ys

            def visit(carry):
                dq, dk, dv = carry
                s = _scores(q_tile, k_tile, scale)
                mask = _tile_mask(qi * block, kj * block, end_tile, block)
                p = jnp.where(mask, jnp.exp(s - lse_tile[..., None]), 0.0)
                dv_tile = jnp.einsum(
                    "bkgqs,bqkgd->bskd",
                    p.astype(do_tile.dtype),
                    do_tile,
                    preferred_element_type=jnp.float32,
                )
                dp = jnp.einsum(
                    "bqkgd,bskd->bkgqs", do_tile, v_tile, preferred_element_type=jnp.float32
                )
                ds = p * (dp - delta_tile[..., None]) * scale
                dq = dq + jnp.einsum(
                    "bkgqs,bskd->bqkgd",
                    ds.astype(k_tile.dtype),
                    k_tile,
                    preferred_element_type=jnp.float32,
                )
                dk_tile = jnp.einsum(
                    "bkgqs,bqkgd->bskd",
                    ds.astype(q_tile.dtype),
                    q_tile,
                    preferred_element_type=jnp.float32,
                )
                return dq, dk.at[kj].add(dk_tile), dv.at[kj].add(dv_tile)

            return jax.lax.cond(live[qi, kj], visit, lambda c: c, carry), None

        dq0 = jnp.zeros(q_tile.shape, jnp.float32)
        (dq, dk, dv), _ = jax.lax.scan(
            key_tile, (dq0, dk, dv), (jnp.arange(nb), k_tiles, v_tiles, end_tiles)
        )
        return (dk, dv), dq.reshape(b, block, n, d)

    zeros = jnp.zeros((nb, b, block, kv_heads, d), jnp.float32)
    (dk, dv), dq = jax.lax.scan(
        query_tile,
        (zeros, zeros),
        (jnp.arange(nb), _tiles(q, block), _tiles(d_out, block), _tiles(delta, block), lse),
    )
    return (
        _untile(dq).astype(q.dtype),
        _untile(dk).astype(k.dtype),
        _untile(dv).astype(v.dtype),
        None,
    )


_flash.defvjp(_flash_fwd, _flash_bwd)


def dense_visibility(visible_end: jax.Array) -> jax.Array:
    """[B, T] ``visible_end`` -> the [B, T, T] bool mask it stands for (tests and small checks
    only: this is the dense mask the kernel never builds)."""
    t = visible_end.shape[1]
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    return (j <= i)[None] & (i[None] <= visible_end[:, None, :])
