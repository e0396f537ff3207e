"""KV-cache pool and cached forward pass, the substrate of the rollout engine.

The cache is a fixed pool of ``num_slots`` sequences, each with room for ``max_len`` tokens, held as
explicit arrays in a ``flax.struct.dataclass`` so it crosses ``jit`` (and can be donated) like any
other pytree. Every operation is a pure function returning a new ``KVCache``:

- ``forward_with_cache``: append T >= 1 tokens to each of B slots at that slot's own length
  (prefill: a fresh slot and T prompt tokens; extend: more tokens, e.g. a tool result, without
  recomputing the prefix; decode: T = 1) and return their logits;
- ``fork_slots``: copy the first n positions of one slot into another (a tree branch);
- ``reset_slots``: empty slots;
- ``gather_slots`` / ``scatter_slots``: a batch-local copy of some slots for a decode loop, and
  its write-back.

Slot ``s`` stores its tokens at cache positions ``0 .. lengths[s]-1`` and the rotary position of a
token equals its cache position, so there are no holes and no per-slot offsets to track.

Layout, chosen for the decode step (where the cache is read once per generated token):

- one array per layer, so a layer's update is in place and its read needs no slice of a stacked
  [layers, ...] array (XLA:CPU copied such slices out before every attention matmul);
- head-major, keys stored transposed: ``k[layer]`` is [slots, kv_heads, head_dim, max_len] and
  ``v[layer]`` [slots, kv_heads, max_len, head_dim], so both attention matmuls (q @ K^T and
  p @ V) read their right-hand operand in its natural row-major layout (XLA:CPU's q @ K^T with
  [S, D] keys ran 3x slower);
- a decode loop works on a batch-local pool (``gather_slots`` once per call, ``scatter_slots``
  after it), so its steps read their keys without gathering the slots from the pool.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from atpo_jax.models.config import ModelConfig
from atpo_jax.models.layers import CacheView
from atpo_jax.models.model import CausalLM


@struct.dataclass
class KVCache:
    """A pool of per-slot key/value caches.

    Attributes:
      k: per layer, [slots, kv_heads, head_dim, max_len] keys, transposed (after RoPE and, for
        Qwen3, the k-norm).
      v: per layer, [slots, kv_heads, max_len, head_dim] values.
      lengths: [slots] int32, number of valid positions per slot; entries past it are stale and
        never attended to.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def num_slots(self) -> int:
        return self.lengths.shape[0]

    def logical_axes(self) -> KVCache:
        """What each array's dimensions mean, for the parallel layer's rules (a ``KVCache`` of
        tuples): slots are batch rows, kv heads split like the attention heads."""
        keys = ("batch", "kv_heads", None, None)
        return KVCache(
            k=tuple(keys for _ in self.k), v=tuple(keys for _ in self.v), lengths=(None,)
        )

    @property
    def max_len(self) -> int:
        return self.v[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)


def init_cache(config: ModelConfig, num_slots: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty pool: per layer, zero keys [num_slots, kv_heads, head_dim, max_len] and values
    [num_slots, kv_heads, max_len, head_dim]; lengths 0.

    ``dtype`` defaults to the model's compute dtype.
    """
    dtype = config.dtype if dtype is None else dtype
    heads, dim, layers = config.num_kv_heads, config.head_dim, config.num_layers
    return KVCache(
        k=tuple(jnp.zeros((num_slots, heads, dim, max_len), dtype) for _ in range(layers)),
        v=tuple(jnp.zeros((num_slots, heads, max_len, dim), dtype) for _ in range(layers)),
        lengths=jnp.zeros((num_slots,), jnp.int32),
    )


def forward_with_cache(
    model: CausalLM,
    tokens: jax.Array,
    cache: KVCache,
    slots: jax.Array | None,
    num_tokens: jax.Array | None = None,
    *,
    kv_len: int | None = None,
    last_only: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Appends tokens to cache slots and returns their next-token logits.

    Row ``b`` appends ``tokens[b, :num_tokens[b]]`` to slot ``slots[b]``, at positions
    ``cache.lengths[slots[b]] ...``; the new tokens attend causally to the slot's cached prefix and
    to each other. Tokens past ``num_tokens[b]`` are right padding: not written, not counted. A row
    with ``num_tokens[b] == 0`` leaves its slot untouched (a finished slot in a batched decode
    step).

    Args:
      model: the LM.
      tokens: [B, T] int token ids, right-padded per row.
      cache: the pool.
      slots: [B] int32 distinct slot indices, or ``None`` when row ``b`` is slot ``b`` of a pool
        of exactly B slots (a batch-local pool from :func:`gather_slots`): the layers then read
        their keys and values directly instead of gathering the slots.
      num_tokens: [B] int32 real tokens per row; ``None`` = all T.
      kv_len: static number of leading cache positions to attend over (a bucket <= ``max_len``;
        every touched slot must satisfy ``lengths + num_tokens <= kv_len``). Default ``max_len``.
        Smaller buckets make decode steps proportionally cheaper.
      last_only: return only the logits of each row's last real token, [B, V] (what sampling needs,
        without projecting T x V logits for a long prefill).

    Returns:
      (logits [B, T, V] or [B, V] in the compute dtype, updated cache). Logits at padding positions
      are finite but meaningless. The caller must keep ``lengths + num_tokens <= max_len``:
      positions past the end are dropped, not wrapped.
    """
    batch, steps = tokens.shape
    max_len = cache.max_len
    kv_len = max_len if kv_len is None else kv_len
    if not 0 < kv_len <= max_len:
        raise ValueError(f"kv_len={kv_len} must be in [1, max_len={max_len}]")
    if num_tokens is None:
        num_tokens = jnp.full((batch,), steps, jnp.int32)
    if slots is None:
        if batch != cache.num_slots:
            raise ValueError(
                f"slots=None needs one row per slot: {batch} rows for {cache.num_slots} slots"
            )
        start = cache.lengths
    else:
        slots = slots.astype(jnp.int32)
        start = cache.lengths[slots]
    offsets = jnp.arange(steps, dtype=jnp.int32)
    positions = start[:, None] + offsets[None, :]  # [B, T]
    real = offsets[None, :] < num_tokens[:, None]
    new_lengths = start + num_tokens.astype(jnp.int32)
    # Out-of-range index => the scatter drops the write (padding must not clobber real positions).
    write_pos = jnp.where(real, positions, max_len)
    key_pos = jnp.arange(kv_len, dtype=jnp.int32)
    mask = (key_pos[None, None, :] <= positions[:, :, None]) & (
        key_pos[None, None, :] < new_lengths[:, None, None]
    )  # [B, T, kv_len]
    view = CacheView(
        k=cache.k, v=cache.v, slots=slots, write_pos=write_pos, mask=mask[:, None], kv_len=kv_len
    )
    hidden, view = model.hidden_states_with_cache(tokens, positions, view)
    if last_only:
        last = jnp.maximum(num_tokens - 1, 0)
        hidden = hidden[jnp.arange(batch), last]
    logits = model.logits(hidden)
    lengths = new_lengths if slots is None else cache.lengths.at[slots].set(new_lengths)
    return logits, KVCache(k=view.k, v=view.v, lengths=lengths)


def gather_slots(cache: KVCache, slots: jax.Array, length: int) -> KVCache:
    """A batch-local pool: row ``b`` holds the first ``length`` positions of slot ``slots[b]``.

    Args:
      cache: the pool.
      slots: [B] int32 slot indices.
      length: static number of leading positions to take (<= ``cache.max_len``).

    Returns:
      A ``KVCache`` of B slots and ``max_len == length`` with the slots' lengths; run it with
      ``forward_with_cache(..., slots=None)`` and write it back with :func:`scatter_slots`.
    """
    if not 0 < length <= cache.max_len:
        raise ValueError(f"gather_slots: length={length} must be in [1, max_len={cache.max_len}]")
    slots = slots.astype(jnp.int32)
    return KVCache(
        k=tuple(k[slots, :, :, :length] for k in cache.k),
        v=tuple(v[slots, :, :length] for v in cache.v),
        lengths=cache.lengths[slots],
    )


def scatter_slots(cache: KVCache, local: KVCache, slots: jax.Array) -> KVCache:
    """Writes a batch-local pool (from :func:`gather_slots`) back into slots ``slots`` of the pool.

    The first ``local.max_len`` positions and the lengths of each slot are replaced; positions
    past them are left as they were.
    """
    slots = slots.astype(jnp.int32)
    length = local.max_len
    return KVCache(
        k=tuple(k.at[slots, :, :, :length].set(lk) for k, lk in zip(cache.k, local.k, strict=True)),
        v=tuple(v.at[slots, :, :length].set(lv) for v, lv in zip(cache.v, local.v, strict=True)),
        lengths=cache.lengths.at[slots].set(local.lengths),
    )


def fork_slots(cache: KVCache, src: jax.Array, dst: jax.Array, length: jax.Array) -> KVCache:
    """Makes slot ``dst[i]`` a copy of the first ``length[i]`` positions of slot ``src[i]``.

    Args:
      cache: the pool.
      src: [B] int32 source slots.
      dst: [B] int32 distinct destination slots (``dst == src`` truncates in place).
      length: [B] int32 prefix lengths, each <= the source slot's length.

    Returns:
      The updated pool; the destination slots' lengths are ``length``.
    """
    src = src.astype(jnp.int32)
    dst = dst.astype(jnp.int32)
    # Whole rows are copied: positions past `length` are stale and masked by `lengths` anyway.
    return KVCache(
        k=tuple(k.at[dst].set(k[src]) for k in cache.k),
        v=tuple(v.at[dst].set(v[src]) for v in cache.v),
        lengths=cache.lengths.at[dst].set(length.astype(jnp.int32)),
    )


def reset_slots(cache: KVCache, slots: jax.Array) -> KVCache:
    """Empties [B] ``slots`` (sets their lengths to 0; the stale contents are never read)."""
    return cache.replace(lengths=cache.lengths.at[slots].set(0))


# ---------------------------------------------------------------------------------------------
# Paged KV cache: a pool of fixed-size pages shared by all sequences (the rollout engine's store).
#
# A sequence's cached positions live in the pages listed by its page table: position p is slot
# ``p % page_size`` of page ``table[p // page_size]``. Sequences that share a prefix share its full
# pages (the host keeps reference counts; see ``rollout.pages``); a page is written only by the one
# sequence that owns it privately, so a shared page never changes. Page 0 is a null page that no
# sequence owns: page-table entries past a sequence's pages point to it (reads there are masked by
# the sequence's length) and writes meant for nowhere are dropped.
#
# A device call works on a batch-local dense copy of its rows' pages (``gather_pages``: one gather
# per call, the XLA path's "gather per block") with the same code as the dense layout
# (``forward_with_cache(..., slots=None)``), and writes back only the pages its new tokens touched
# (``scatter_pages``). That keeps the per-step reads of a decode loop gather-free, as before.
# ---------------------------------------------------------------------------------------------

NULL_PAGE = 0


@struct.dataclass
class PagedKVCache:
    """A pool of KV pages.

    Attributes:
      k: per layer, [num_pages, kv_heads, head_dim, page_size] keys, transposed like ``KVCache``.
      v: per layer, [num_pages, kv_heads, page_size, head_dim] values.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @property
    def num_pages(self) -> int:
        return self.v[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.v[0].shape[2]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def logical_axes(self) -> PagedKVCache:
        """Pages split like batch rows (a page can be read by any row), kv heads like heads."""
        axes = ("batch", "kv_heads", None, None)
        return PagedKVCache(k=tuple(axes for _ in self.k), v=tuple(axes for _ in self.v))


def init_paged_cache(
    config: ModelConfig, num_pages: int, page_size: int, dtype: Any = None
) -> PagedKVCache:
    """An empty pool of ``num_pages`` pages (page 0 is the null page) of ``page_size`` positions."""
    if num_pages < 2 or page_size < 1:
        raise ValueError(
            f"a paged cache needs >= 2 pages of >= 1 position, got {num_pages} x {page_size}"
        )
    dtype = config.dtype if dtype is None else dtype
    heads, dim, layers = config.num_kv_heads, config.head_dim, config.num_layers
    return PagedKVCache(
        k=tuple(jnp.zeros((num_pages, heads, dim, page_size), dtype) for _ in range(layers)),
        v=tuple(jnp.zeros((num_pages, heads, page_size, dim), dtype) for _ in range(layers)),
    )


def gather_pages(cache: PagedKVCache, table: jax.Array, lengths: jax.Array) -> KVCache:
    """A batch-local dense cache of the rows' pages.

    Args:
      cache: the page pool.
      table: [B, P] int32 page ids per row (``NULL_PAGE`` past a row's pages).
      lengths: [B] int32 cached positions per row (<= P * page_size).

    Returns:
      A ``KVCache`` of B slots and ``max_len = P * page_size`` whose slot b holds row b's positions
      in order: ``k[l][b, :, :, p] = cache.k[l][table[b, p // S], :, :, p % S]`` (S = page size).
    """
    batch, pages = table.shape
    assert lengths.shape == (batch,), (lengths.shape, batch)
    size = cache.page_size
    table = table.astype(jnp.int32)

    def keys(k):  # [B, P, H, D, S] -> [B, H, D, P*S]
        g = k[table]
        return g.transpose(0, 2, 3, 1, 4).reshape(batch, g.shape[2], g.shape[3], pages * size)

    def values(v):  # [B, P, H, S, D] -> [B, H, P*S, D]
        g = v[table]
        return g.transpose(0, 2, 1, 3, 4).reshape(batch, g.shape[2], pages * size, g.shape[4])

    return KVCache(
        k=tuple(keys(k) for k in cache.k),
        v=tuple(values(v) for v in cache.v),
        lengths=lengths.astype(jnp.int32),
    )


def scatter_pages(
    cache: PagedKVCache,
    local: KVCache,
    table: jax.Array,
    first: jax.Array,
    last: jax.Array,
    *,
    count: int,
) -> PagedKVCache:
    """Writes pages ``first[b] .. last[b]`` (inclusive, at most ``count``) of each row of a
    batch-local cache (from :func:`gather_pages`) back to their pool pages ``table[b, ...]``.

    Only pages that a call wrote to are passed (its rows' private pages: the partial last page and
    fresh ones), so shared pages are never rewritten. A row with ``last < first`` writes nothing.

    Args:
      cache: the page pool.
      local: the batch-local cache, ``max_len == P * page_size``.
      table: [B, P] int32 page ids.
      first, last: [B] int32 page positions (indices into the row's table).
      count: static bound on ``last - first + 1``.
    """
    batch, pages = table.shape
    size = cache.page_size
    assert local.max_len == pages * size, (local.max_len, pages, size)
    index = first[:, None].astype(jnp.int32) + jnp.arange(count, dtype=jnp.int32)[None, :]
    valid = (index <= last[:, None]) & (index < pages)
    index = jnp.minimum(index, pages - 1)  # [B, W]
    # Out-of-range page id => the scatter drops the write.
    ids = jnp.where(
        valid, jnp.take_along_axis(table.astype(jnp.int32), index, axis=1), cache.num_pages
    )
    ids = ids.reshape(-1)
    rows = jnp.arange(batch)[:, None]

    def put_keys(k, lk):  # lk [B, H, D, P*S] -> pages [B*W, H, D, S]
        paged = lk.reshape(batch, lk.shape[1], lk.shape[2], pages, size).transpose(0, 3, 1, 2, 4)
        return k.at[ids].set(paged[rows, index].reshape(-1, *k.shape[1:]), mode="drop")

    def put_values(v, lv):  # lv [B, H, P*S, D] -> pages [B*W, H, S, D]
        paged = lv.reshape(batch, lv.shape[1], pages, size, lv.shape[3]).transpose(0, 2, 1, 3, 4)
        return v.at[ids].set(paged[rows, index].reshape(-1, *v.shape[1:]), mode="drop")

    return PagedKVCache(
        k=tuple(put_keys(k, lk) for k, lk in zip(cache.k, local.k, strict=True)),
        v=tuple(put_values(v, lv) for v, lv in zip(cache.v, local.v, strict=True)),
    )


def copy_pages(cache: PagedKVCache, src: jax.Array, dst: jax.Array) -> PagedKVCache:
    """Copies pages ``src[i]`` to ``dst[i]`` ([n] int32 each; the copy-on-write of a fork's last,
    partial page). A ``dst`` equal to ``num_pages`` is dropped (padding)."""
    src = src.astype(jnp.int32)
    dst = dst.astype(jnp.int32)
    return PagedKVCache(
        k=tuple(k.at[dst].set(k[src], mode="drop") for k in cache.k),
        v=tuple(v.at[dst].set(v[src], mode="drop") for v in cache.v),
    )
