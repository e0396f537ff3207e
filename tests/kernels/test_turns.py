"""turn_ids_from_mask, segment_mean and token_entropy against NumPy loops and hand-made cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from atpo_jax import kernels
from tests.kernels import numpy_reference as ref
from tests.kernels.strategies import row_masks


def test_golden_turn_segmentation(call):
    # ALGORITHM.md §9.6: mask [0,1,1,0,0,1,0,1,1,1] -> turns [1,3), [5,6), [7,10).
    mask = np.array([[0, 1, 1, 0, 0, 1, 0, 1, 1, 1]])
    ids = call(kernels.turn_ids_from_mask, mask)
    np.testing.assert_array_equal(ids, [[-1, 0, 0, -1, -1, 1, -1, 2, 2, 2]])
    assert ids.dtype == jnp.int32


def test_turn_ids_accepts_bool_and_float_masks(call):
    mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0]])
    expected = [[0, 0, -1, 1], [-1, -1, -1, -1]]
    for as_type in (bool, np.float32, np.int32):
        np.testing.assert_array_equal(
            call(kernels.turn_ids_from_mask, mask.astype(as_type)), expected
        )


@given(mask=row_masks())
def test_turn_ids_match_numpy(call, mask):
    np.testing.assert_array_equal(call(kernels.turn_ids_from_mask, mask), ref.turn_ids(mask))


@given(mask=row_masks())
def test_segment_mean_matches_numpy(call, mask):
    values = np.random.default_rng(int(mask.sum())).normal(size=mask.shape)
    ids = ref.turn_ids(mask)
    for num_turns in (1, 3, 8):
        got = call(kernels.segment_mean, values, ids, num_turns=num_turns)
        np.testing.assert_allclose(got, ref.segment_mean(values, ids, num_turns), atol=1e-5)


def test_segment_mean_hand_case_and_empty_turns(call):
    values = np.array([[1.0, 2.0, 3.0, np.nan, 10.0]])
    ids = np.array([[0, 0, 2, -1, 2]])
    got = call(kernels.segment_mean, values, ids, num_turns=4)
    # turn 0: (1+2)/2; turn 1 empty -> 0; turn 2: (3+10)/2; turn 3 empty; the NaN is outside turns.
    np.testing.assert_allclose(got, [[1.5, 0.0, 6.5, 0.0]])


def test_token_entropy_matches_numpy(call):
    logits = np.random.default_rng(0).normal(0, 3, (3, 5, 17))
    np.testing.assert_allclose(
        call(kernels.token_entropy, logits), ref.token_entropy(logits), atol=1e-5
    )


def test_token_entropy_hand_values_and_masked_vocab(call):
    uniform = np.zeros((1, 8))
    np.testing.assert_allclose(call(kernels.token_entropy, uniform), [np.log(8)], rtol=1e-6)
    # -inf logits (masked vocabulary) contribute nothing: uniform over the 2 finite entries.
    masked = np.array([[0.0, -np.inf, 0.0, -np.inf]])
    np.testing.assert_allclose(call(kernels.token_entropy, masked), [np.log(2)], rtol=1e-6)
    one_hot = np.array([[0.0, -np.inf, -np.inf]])
    np.testing.assert_allclose(call(kernels.token_entropy, one_hot), [0.0], atol=1e-7)


def test_token_entropy_gradient_is_finite_with_masked_vocab():
    logits = jnp.array([[0.3, -jnp.inf, 1.2, -0.5]])
    grad = jax.grad(lambda x: kernels.token_entropy(x).sum())(logits)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert grad[0, 1] == 0.0


def test_token_entropy_of_bfloat16_is_float32():
    out = kernels.token_entropy(jnp.zeros((2, 4), jnp.bfloat16))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [np.log(4)] * 2, rtol=1e-6)


def test_shape_errors_are_raised_at_trace_time():
    with pytest.raises(AssertionError, match="rank"):
        jax.jit(kernels.turn_ids_from_mask)(jnp.ones((2, 3, 4)))
    with pytest.raises(AssertionError):
        kernels.segment_mean(jnp.ones((2, 3)), jnp.zeros((2, 4), jnp.int32), 2)
    with pytest.raises(ValueError, match="num_turns"):
        kernels.segment_mean(jnp.ones((2, 3)), jnp.zeros((2, 3), jnp.int32), 0)
    with pytest.raises(ValueError, match="vocabulary axis"):
        kernels.token_entropy(jnp.float32(1.0))
