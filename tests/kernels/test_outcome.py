"""GRPO outcome advantages against a NumPy loop (torch.std is unbiased: ddof=1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from atpo_jax import kernels


def numpy_group_advantages(rewards, valid, eps=1e-6, ddof=1):
    out = np.zeros(rewards.shape)
    for g in range(rewards.shape[0]):
        members = [s for s in range(rewards.shape[1]) if valid[g, s]]
        if len(members) <= ddof:
            continue
        values = np.array([rewards[g, s] for s in members])
        std = values.std(ddof=ddof)
        for s in members:
            out[g, s] = (rewards[g, s] - values.mean()) / (std + eps)
    return out


@given(seed=st.integers(0, 2**31 - 1), ddof=st.sampled_from([0, 1]))
def test_matches_numpy(call, seed, ddof):
    rng = np.random.default_rng(seed)
    rewards = rng.choice([-1.0, 0.0, 1.0, 0.5], (5, 7))
    valid = rng.uniform(size=(5, 7)) < 0.8
    valid[0] = True
    valid[1] = False  # an empty group
    valid[2, 1:] = False  # a one-sample group
    got = call(kernels.group_normalized_advantages, rewards, valid, ddof=ddof)
    np.testing.assert_allclose(got, numpy_group_advantages(rewards, valid, ddof=ddof), atol=1e-5)


def test_hand_values_and_equal_rewards(call):
    rewards = np.array([[1.0, 0.0, 0.0, -1.0], [2.0, 2.0, 2.0, 2.0]])
    got = np.asarray(call(kernels.group_normalized_advantages, rewards))
    std = np.sqrt(2.0 / 3.0)  # unbiased: sum of squares 2 over 3
    np.testing.assert_allclose(got[0], [1 / std, 0, 0, -1 / std], rtol=1e-5)
    np.testing.assert_array_equal(got[1], 0.0)


def test_rank_error():
    with pytest.raises(AssertionError, match="rank"):
        kernels.group_normalized_advantages(np.zeros(3))
