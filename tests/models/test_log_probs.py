"""Chunked token log-probs equal log_softmax of the full logits, with gradients and bounded memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atpo_jax import models
from tests.models.hf_reference import random_batch, torch_logits


def _np_log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _batch(model: models.CausalLM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mixed left/right padded ids, next-token targets, and out-of-range junk at masked targets."""
    vocab = model.config.vocab_size
    ids, mask = random_batch(vocab, batch=3, length=10, padding="mixed", seed=7)
    targets = np.roll(ids, -1, axis=1)
    targets = np.where(mask == 1, targets, vocab + 5).astype(np.int32)
    return ids, targets, mask


log_probs_jit = nnx.jit(models.token_log_probs, static_argnames=("chunk", "return_entropy"))


@pytest.mark.parametrize("chunk", [1, 7, 30, 512])
@pytest.mark.parametrize("case", ["qwen3", "qwen2"])  # untied and tied lm_head
def test_matches_log_softmax_of_full_logits(case, chunk, ours, reference):
    model = ours(case)
    ids, targets, mask = _batch(model)
    lp, ent = log_probs_jit(
        model, jnp.asarray(ids), jnp.asarray(targets), jnp.asarray(mask), chunk=chunk,
        return_entropy=True,
    )  # fmt: skip
    lp, ent = np.asarray(lp), np.asarray(ent)
    assert lp.dtype == np.float32 and lp.shape == ids.shape and ent.shape == ids.shape
    real = mask == 1
    safe_targets = np.where(real, targets, 0)

    # Against our own full logits (the acceptance criterion: 1e-5; random weights give log-probs
    # down to -40, where float32 spacing is 4e-6, hence the small relative term).
    full = _np_log_softmax(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))))
    want = np.take_along_axis(full, safe_targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp[real], want[real], atol=1e-5, rtol=1e-6)
    want_ent = -(np.exp(full) * full).sum(-1)
    np.testing.assert_allclose(ent[real], want_ent[real], atol=1e-5, rtol=1e-6)
    # Masked positions are exactly 0, even with out-of-range targets there.
    assert (lp[~real] == 0).all() and (ent[~real] == 0).all()

    # Against transformers' logits.
    torch_full = _np_log_softmax(torch_logits(reference(case).torch_model, ids, mask))
    torch_lp = np.take_along_axis(torch_full, safe_targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(lp[real], torch_lp[real], atol=1e-4)


def test_without_mask_and_without_entropy(ours):
    model = ours("llama3")
    ids, _ = random_batch(model.config.vocab_size, batch=2, length=6, padding="none", seed=2)
    targets = np.roll(ids, -1, axis=1)
    lp = models.token_log_probs(model, jnp.asarray(ids), jnp.asarray(targets), chunk=5)
    full = _np_log_softmax(np.asarray(model(jnp.asarray(ids))))
    want = np.take_along_axis(full, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), want, atol=1e-5)


@pytest.mark.parametrize("case", ["qwen3", "qwen2"])
def test_gradients_match_full_log_softmax(case, ours):
    model = ours(case)
    ids, targets, mask = _batch(model)
    ids, targets, mask = jnp.asarray(ids), jnp.asarray(targets), jnp.asarray(mask)
    weights = jnp.linspace(0.5, 1.5, ids.size).reshape(ids.shape)  # distinct per-token weights

    def chunked_loss(m):
        lp, ent = models.token_log_probs(m, ids, targets, mask, chunk=7, return_entropy=True)
        return jnp.sum(weights * lp) + 0.3 * jnp.sum(ent)

    def full_loss(m):
        logp = jax.nn.log_softmax(m(ids, mask).astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(
            logp, jnp.clip(targets, 0, None)[..., None] % logp.shape[-1], -1
        )
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return jnp.sum(mask * (weights * picked[..., 0] + 0.3 * ent))

    got = nnx.jit(nnx.grad(chunked_loss))(model)
    want = nnx.jit(nnx.grad(full_loss))(model)
    flat_got = dict(nnx.to_flat_state(got))
    for path, value in nnx.to_flat_state(want):
        g, w = np.asarray(flat_got[path][...]), np.asarray(value[...])
        assert np.abs(w).max() > 0, path
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4, err_msg=str(path))


def test_temp_memory_does_not_grow_with_length(ours):
    """Compile-time memory of the log-prob head's gradient: flat in length, unlike the naive one."""
    width, vocab, chunk = 32, 8192, 128

    def temp_bytes(fn, length):
        args = (
            jax.ShapeDtypeStruct((2, length, width), jnp.float32),
            jax.ShapeDtypeStruct((width, vocab), jnp.float32),
            jax.ShapeDtypeStruct((2, length), jnp.int32),
        )
        compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def chunked(h, w, t):
        return models.log_probs_from_hidden(h, w, t, chunk=chunk).sum()

    def naive(h, w, t):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        return jnp.take_along_axis(logp, t[..., None], -1).sum()

    short, long = temp_bytes(chunked, 256), temp_bytes(chunked, 2048)
    logits_bytes = 2 * 2048 * vocab * 4
    assert long < 1.1 * short + 2 * 2048 * width * 4 * 4  # only the [B, L, H]-sized terms grow
    assert long < logits_bytes / 8
    assert temp_bytes(naive, 2048) >= logits_bytes  # the naive head holds full logits
