"""Our logits equal transformers' (PyTorch, float32) on tiny random Qwen3 / Qwen2 / Llama 3 models."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.hf_reference import CASES, random_batch, torch_logits

PADDINGS = ("none", "ones", "left", "right", "mixed", "holes")


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, padding, reference, ours):
    ref = reference(case)
    model = ours(case)
    ids, mask = random_batch(model.config.vocab_size, batch=4, length=11, padding=padding, seed=1)

    got = np.asarray(model(jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))
    want = torch_logits(ref.torch_model, ids, mask)

    real = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    assert got.shape == want.shape
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=1e-4)
    # The comparison is meaningful: logits are O(1) and differ across positions.
    assert np.abs(want[real]).max() > 0.5


@pytest.mark.parametrize("case", ["qwen3", "llama3"])
def test_padding_does_not_change_real_token_logits(case, ours):
    """A left- or right-padded row gives the same logits as the unpadded sequence."""
    model = ours(case)
    rng = np.random.default_rng(3)
    seq = rng.integers(0, model.config.vocab_size, size=7).astype(np.int32)
    plain = np.asarray(model(jnp.asarray(seq[None])))[0]

    ids = np.zeros((2, 10), np.int32)
    mask = np.zeros((2, 10), np.int32)
    ids[0, 3:], mask[0, 3:] = seq, 1  # left padded
    ids[1, :7], mask[1, :7] = seq, 1  # right padded
    padded = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(padded[0, 3:], plain, atol=1e-5)
    np.testing.assert_allclose(padded[1, :7], plain, atol=1e-5)
