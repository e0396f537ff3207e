"""KV-cache pool: prefill, extend, decode and fork give the logits of a full forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atpo_jax import models

TOL = dict(atol=1e-4, rtol=1e-4)

# One compiled program per (shapes, kv_len, last_only), like the engine will use it.
step = nnx.jit(models.forward_with_cache, static_argnames=("kv_len", "last_only"))


_forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
REF_LEN = 16  # reference sequences are right-padded to one length: one compile per model
WIDTH = 12  # prefill/extend calls are right-padded to one width, as the engine buckets them


def _full_logits(model: models.CausalLM, seq: np.ndarray) -> np.ndarray:
    """Reference: one uncached forward over the whole sequence, [len(seq), V]."""
    ids = np.zeros((1, REF_LEN), np.int32)
    ids[0, : len(seq)] = seq
    mask = (np.arange(REF_LEN) < len(seq)).astype(np.int32)[None]
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))[0, : len(seq)]


def _append(
    model: models.CausalLM, cache: models.KVCache, rows: list[np.ndarray], slots: list[int], **kw
) -> tuple[np.ndarray, models.KVCache]:
    """Appends ``rows[b]`` (lengths <= WIDTH, possibly 0) to ``slots[b]``."""
    tokens = np.zeros((len(rows), WIDTH), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    num = jnp.asarray([len(r) for r in rows], jnp.int32)
    logits, cache = step(
        model, jnp.asarray(tokens), cache, jnp.asarray(slots, jnp.int32), num, **kw
    )
    return np.asarray(logits), cache


def _cache(model: models.CausalLM) -> models.KVCache:
    return models.init_cache(model.config, num_slots=4, max_len=REF_LEN)


@pytest.mark.parametrize("case", ["qwen3", "qwen2", "llama3"])
def test_prefill_then_decode_matches_full_forward(case, ours):
    model = ours(case)
    rng = np.random.default_rng(0)
    totals, prompts = [13, 8, 11], [5, 3, 9]
    slots = [2, 0, 3]  # non-trivial slot mapping; slot 1 stays empty
    seqs = [rng.integers(0, model.config.vocab_size, n).astype(np.int32) for n in totals]
    want = [_full_logits(model, s) for s in seqs]

    logits, cache = _append(
        model, _cache(model), [s[:p] for s, p in zip(seqs, prompts, strict=True)], slots
    )
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(logits[b, :p], want[b][:p], **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [3, 0, 5, 9])

    for offset in range(max(totals) - min(prompts)):
        positions = [p + offset for p in prompts]
        active = [pos < n for pos, n in zip(positions, totals, strict=True)]
        tokens = [s[pos] if a else 0 for s, pos, a in zip(seqs, positions, active, strict=True)]
        logits, cache = step(
            model,
            jnp.asarray(tokens, jnp.int32)[:, None],
            cache,
            jnp.asarray(slots, jnp.int32),
            jnp.asarray(active, jnp.int32),  # finished rows append nothing
        )
        for b, pos in enumerate(positions):
            if active[b]:
                np.testing.assert_allclose(np.asarray(logits[b, 0]), want[b][pos], **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [8, 0, 13, 11])


def test_chunked_prefill_equals_one_shot(ours):
    model = ours("llama3")
    seq = np.random.default_rng(1).integers(0, model.config.vocab_size, 12).astype(np.int32)

    one_shot, cache_a = _append(model, _cache(model), [seq], [1])
    cache_b = _cache(model)
    chunks = []
    for lo, hi in [(0, 5), (5, 9), (9, 12)]:
        out, cache_b = _append(model, cache_b, [seq[lo:hi]], [1])
        chunks.append(out[0, : hi - lo])
    np.testing.assert_allclose(np.concatenate(chunks), one_shot[0], **TOL)
    np.testing.assert_allclose(np.concatenate(chunks), _full_logits(model, seq), **TOL)
    np.testing.assert_array_equal(np.asarray(cache_a.lengths), np.asarray(cache_b.lengths))
    for layer in range(
        model.config.num_layers
    ):  # keys [slots, K, D, len], values [slots, K, len, D]
        np.testing.assert_allclose(
            np.asarray(cache_a.k[layer][1, ..., :12]),
            np.asarray(cache_b.k[layer][1, ..., :12]),
            atol=1e-5,
        )
        np.testing.assert_allclose(
            np.asarray(cache_a.v[layer][1, :, :12]),
            np.asarray(cache_b.v[layer][1, :, :12]),
            atol=1e-5,
        )


def test_extend_rows_of_different_lengths_and_idle_rows(ours):
    """One call extends slots by different amounts; a row with num_tokens == 0 is a no-op."""
    model = ours("qwen3")
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, model.config.vocab_size, n).astype(np.int32) for n in (10, 9))
    _, cache = _append(model, _cache(model), [a[:4], b[:2]], [0, 2])
    before = cache

    logits, cache = _append(model, cache, [a[4:10], b[2:2]], [0, 2])  # slot 2 idle
    np.testing.assert_allclose(logits[0, :6], _full_logits(model, a)[4:10], **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 0, 2, 0])
    for layer in range(model.config.num_layers):  # the idle slot's keys and values are untouched
        np.testing.assert_array_equal(np.asarray(cache.k[layer][2]), np.asarray(before.k[layer][2]))
        np.testing.assert_array_equal(np.asarray(cache.v[layer][2]), np.asarray(before.v[layer][2]))

    logits, cache = _append(model, cache, [a[10:10], b[2:9]], [0, 2])  # slot 0 idle
    np.testing.assert_allclose(logits[1, :7], _full_logits(model, b)[2:9], **TOL)
    np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 0, 9, 0])


def test_fork_copies_a_prefix_into_another_slot(ours):
    model = ours("qwen3")
    rng = np.random.default_rng(3)
    trunk = rng.integers(0, model.config.vocab_size, 10).astype(np.int32)
    branch = rng.integers(0, model.config.vocab_size, 4).astype(np.int32)
    _, cache = _append(model, _cache(model), [trunk], [0])

    fork = jax.jit(models.fork_slots)
    cache = fork(cache, jnp.asarray([0]), jnp.asarray([2]), jnp.asarray([6]))
    np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 0, 6, 0])
    logits, cache = _append(model, cache, [branch], [2])
    want = _full_logits(model, np.concatenate([trunk[:6], branch]))[6:]
    np.testing.assert_allclose(logits[0, :4], want, **TOL)

    # The source slot is unaffected: it continues as the full trunk would.
    logits, cache = _append(model, cache, [np.asarray([7], np.int32)], [0])
    want = _full_logits(model, np.concatenate([trunk, [7]]))[-1]
    np.testing.assert_allclose(logits[0, 0], want, **TOL)


def test_fork_in_place_truncates_and_reset_empties(ours):
    model = ours("qwen2")
    seq = np.random.default_rng(4).integers(0, model.config.vocab_size, 9).astype(np.int32)
    other = np.asarray([5, 6, 7], np.int32)
    _, cache = _append(model, _cache(model), [seq], [1])

    cache = models.fork_slots(cache, jnp.asarray([1]), jnp.asarray([1]), jnp.asarray([4]))
    logits, cache = _append(model, cache, [other], [1])
    want = _full_logits(model, np.concatenate([seq[:4], other]))[4:]
    np.testing.assert_allclose(logits[0, :3], want, **TOL)

    cache = models.reset_slots(cache, jnp.asarray([1]))
    assert int(cache.lengths[1]) == 0
    logits, cache = _append(model, cache, [other], [1])
    np.testing.assert_allclose(logits[0, :3], _full_logits(model, other), **TOL)


def test_batch_local_pool_decodes_like_the_pool(ours):
    """gather_slots -> decode with slots=None -> scatter_slots: the logits of a full forward, and
    the pool afterwards equals decoding on the pool directly; other slots are untouched."""
    model = ours("qwen3")
    rng = np.random.default_rng(6)
    seqs = [rng.integers(0, model.config.vocab_size, n).astype(np.int32) for n in (9, 6)]
    prompts = [5, 2]
    slots = jnp.asarray([3, 1], jnp.int32)
    bystander = rng.integers(0, model.config.vocab_size, 7).astype(np.int32)
    _, cache = _append(model, _cache(model), [seqs[0][:5], seqs[1][:2], bystander], [3, 1, 0])
    local = jax.jit(models.gather_slots, static_argnums=2)(cache, slots, 12)
    assert local.num_slots == 2 and local.max_len == 12
    np.testing.assert_array_equal(np.asarray(local.lengths), prompts)
    direct = cache
    for offset in range(4):
        tokens = jnp.asarray([[s[p + offset]] for s, p in zip(seqs, prompts, strict=True)])
        got, local = step(model, tokens, local, None, kv_len=12)
        want, direct = step(model, tokens, direct, slots, kv_len=12)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
        for b, (s, p) in enumerate(zip(seqs, prompts, strict=True)):
            np.testing.assert_allclose(
                np.asarray(got[b, 0]), _full_logits(model, s)[p + offset], **TOL
            )
    merged = jax.jit(models.scatter_slots)(cache, local, slots)
    np.testing.assert_array_equal(np.asarray(merged.lengths), [7, 6, 0, 9])
    for layer in range(model.config.num_layers):
        for a, b in [(merged.k[layer], direct.k[layer]), (merged.v[layer], direct.v[layer])]:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    with pytest.raises(ValueError, match="length=17 must be in"):
        models.gather_slots(cache, slots, 17)
    with pytest.raises(ValueError, match="slots=None needs one row per slot"):
        models.forward_with_cache(model, jnp.ones((3, 1), jnp.int32), local, None)


def test_kv_len_bucket_and_last_only(ours):
    model = ours("llama3")
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, model.config.vocab_size, n).astype(np.int32) for n in (7, 4)]
    last, cache = _append(model, _cache(model), seqs, [0, 1], kv_len=8, last_only=True)
    assert last.shape == (2, model.config.vocab_size)
    for b, seq in enumerate(seqs):
        np.testing.assert_allclose(last[b], _full_logits(model, seq)[-1], **TOL)

    slots = jnp.asarray([0, 1], jnp.int32)
    nxt = jnp.asarray([[3], [4]], jnp.int32)
    small, _ = step(model, nxt, cache, slots, kv_len=8)
    full, _ = step(model, nxt, cache, slots)
    np.testing.assert_allclose(np.asarray(small), np.asarray(full), **TOL)

    with pytest.raises(ValueError, match="kv_len=17"):
        models.forward_with_cache(model, nxt, cache, slots, kv_len=17)


def test_cache_shapes_and_dtype(ours):
    model = ours("qwen3")
    cfg = model.config
    cache = models.init_cache(cfg, num_slots=3, max_len=10, dtype=jnp.bfloat16)
    # One array per layer; keys transposed [slots, kv_heads, head_dim, max_len].
    assert len(cache.k) == len(cache.v) == cfg.num_layers == cache.num_layers
    assert all(k.shape == (3, cfg.num_kv_heads, cfg.head_dim, 10) for k in cache.k)
    assert all(v.shape == (3, cfg.num_kv_heads, 10, cfg.head_dim) for v in cache.v)
    assert cache.k[0].dtype == jnp.bfloat16 and cache.lengths.dtype == jnp.int32
    assert (cache.num_slots, cache.max_len) == (3, 10)
    # A bf16 cache with a float32 model still runs (reads are cast to the compute dtype).
    logits, cache = step(model, jnp.ones((1, 3), jnp.int32), cache, jnp.asarray([1]))
    assert logits.dtype == jnp.float32 and cache.k[0].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(logits)).all()
