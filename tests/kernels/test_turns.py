"""turn_ids_from_mask, segment_mean, the per-token run/turn means and token_entropy against NumPy loops
and hand-made cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from atpo_jax import kernels
from atpo_jax.kernels.turns import (
    _exclusive_cumsum_rows,
    per_token_run_mean,
    per_token_turn_mean,
)
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


def numpy_run_mean(values, mask):
    """Per-token mean over the token's run of non-zero mask entries (a loop over rows and runs)."""
    out = np.zeros(values.shape)
    runs_per_row = np.zeros(values.shape[0], np.int64)
    for s, row in enumerate(mask):
        runs = ref.turns_of_row(row)
        runs_per_row[s] = len(runs)
        for a, b in runs:
            out[s, a:b] = np.mean(values[s, a:b])
    return out, runs_per_row


@st.composite
def any_length_masks(draw):
    """Masks of any length 1-140 (not only multiples of the 4-token window or the 64-token block),
    mixing long runs, single-token runs and alternating 1,0,1,0 (three runs in one window)."""
    rows, length = draw(st.integers(1, 4)), draw(st.integers(1, 140))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["sparse", "dense", "alternating", "blocks"]))
    if kind == "alternating":
        mask = np.tile([1, 0], length)[None, :length].repeat(rows, 0)
        mask[:, : rng.integers(0, length + 1)] ^= 1
        return mask.astype(np.int32)
    if kind == "blocks":
        return np.repeat(rng.uniform(size=(rows, length)) < 0.5, 5, axis=1)[:, :length].astype(
            np.int32
        )
    p = 0.3 if kind == "sparse" else 0.85
    return (rng.uniform(size=(rows, length)) < p).astype(np.int32)


@given(mask=any_length_masks())
def test_per_token_run_mean_matches_numpy(call, mask):
    values = np.random.default_rng(mask.size).normal(size=mask.shape).astype(np.float32)
    want, want_runs = numpy_run_mean(values.astype(np.float64), mask)
    got, runs = call(per_token_run_mean, values, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(runs, want_runs)
    # Same as the general turn-id path it replaces for mask-derived turns.
    general, general_runs = per_token_turn_mean(
        jnp.asarray(values), jnp.asarray(mask, jnp.float32), kernels.turn_ids_from_mask(mask)
    )
    np.testing.assert_allclose(got, general, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(runs, general_runs)


def test_per_token_run_mean_hand_case(call):
    # Runs [0,2), [3,4), [5,6), [7,9) (the window of tokens 4-7 holds the end of none, a 1-token run
    # and the start of another); NaN and inf outside runs never leak in; float mask values count as 1.
    values = np.array([[1.0, 3.0, np.nan, 5.0, np.inf, 7.0, -np.inf, 2.0, 4.0]])
    mask = np.array([[0.5, 2.0, 0, 1, 0, 1, 0, 1, 1]])
    got, runs = call(per_token_run_mean, values, mask)
    np.testing.assert_allclose(got, [[2.0, 2.0, 0.0, 5.0, 0.0, 7.0, 0.0, 3.0, 3.0]])
    np.testing.assert_array_equal(runs, [4])


def test_per_token_run_mean_edge_rows(call):
    values = np.arange(1.0, 11.0).reshape(2, 5)
    mask = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    got, runs = call(per_token_run_mean, values, mask)
    np.testing.assert_allclose(got, [[0.0] * 5, [8.0] * 5])
    np.testing.assert_array_equal(runs, [0, 1])
    one, one_runs = call(per_token_run_mean, np.array([[4.0]]), np.array([[1]]))
    np.testing.assert_allclose(one, [[4.0]])
    np.testing.assert_array_equal(one_runs, [1])


def test_per_token_run_mean_rejects_bad_shapes():
    with pytest.raises(AssertionError):
        per_token_run_mean(jnp.ones((2, 4)), jnp.ones((2, 5)))
    with pytest.raises(AssertionError):
        per_token_run_mean(jnp.ones((8,)), jnp.ones((8,)))


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 200])
def test_exclusive_cumsum_rows_is_exact(call, n):
    counts = np.random.default_rng(n).integers(0, 3, (3, n)).astype(np.int32)
    got = call(_exclusive_cumsum_rows, counts)
    np.testing.assert_array_equal(got, np.cumsum(counts, axis=1) - counts)
    assert got.dtype == jnp.int32


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
