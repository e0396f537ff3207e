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


def windowed_run_mean(values, mask):
    """per_token_run_mean traced without the native CPU kernel (the GPU/TPU and no-compiler path)."""
    return per_token_run_mean(values, mask, native=False)


@pytest.fixture(params=["default", "windowed"])
def run_mean(request):
    """per_token_run_mean as dispatched on this machine (the native kernel on CPU when it builds;
    tests/kernels/test_native.py checks that it does) and forced onto the pure-JAX windowed path."""
    return per_token_run_mean if request.param == "default" else windowed_run_mean


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
def test_per_token_run_mean_matches_numpy(call, run_mean, mask):
    values = np.random.default_rng(mask.size).normal(size=mask.shape).astype(np.float32)
    want, want_runs = numpy_run_mean(values.astype(np.float64), mask)
    got, runs = call(run_mean, values, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(runs, want_runs)
    # Same as the general turn-id path it replaces for mask-derived turns.
    general, general_runs = per_token_turn_mean(
        jnp.asarray(values), jnp.asarray(mask, jnp.float32), kernels.turn_ids_from_mask(mask)
    )
    np.testing.assert_allclose(got, general, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(runs, general_runs)


def test_per_token_run_mean_hand_case(call, run_mean):
    # Runs [0,2), [3,4), [5,6), [7,9) (the window of tokens 4-7 holds the end of none, a 1-token run
    # and the start of another); NaN and inf outside runs never leak in; float mask values count as 1.
    values = np.array([[1.0, 3.0, np.nan, 5.0, np.inf, 7.0, -np.inf, 2.0, 4.0]])
    mask = np.array([[0.5, 2.0, 0, 1, 0, 1, 0, 1, 1]])
    got, runs = call(run_mean, values, mask)
    np.testing.assert_allclose(got, [[2.0, 2.0, 0.0, 5.0, 0.0, 7.0, 0.0, 3.0, 3.0]])
    np.testing.assert_array_equal(runs, [4])


def test_per_token_run_mean_edge_rows(call, run_mean):
    values = np.arange(1.0, 11.0).reshape(2, 5)
    mask = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    got, runs = call(run_mean, values, mask)
    np.testing.assert_allclose(got, [[0.0] * 5, [8.0] * 5])
    np.testing.assert_array_equal(runs, [0, 1])
    one, one_runs = call(run_mean, np.array([[4.0]]), np.array([[1]]))
    np.testing.assert_allclose(one, [[4.0]])
    np.testing.assert_array_equal(one_runs, [1])
    # No tokens or no rows: empty results of the right shapes, not an error.
    for shape in ((3, 0), (0, 5)):
        empty, empty_runs = call(run_mean, np.ones(shape, np.float32), np.ones(shape))
        assert empty.shape == shape and empty.dtype == jnp.float32
        np.testing.assert_array_equal(empty_runs, np.zeros(shape[0], np.int32))


@pytest.mark.parametrize(
    "mask_dtype", [bool, np.int8, np.uint8, np.int32, np.uint32, np.float16, np.float32]
)
def test_per_token_run_mean_accepts_any_mask_dtype(call, run_mean, mask_dtype):
    # The native kernel reads bool/int8/uint8/int32/float32 masks as they are and gets the others as
    # bool; either way a non-zero entry marks a run token.
    values = np.array([[2.0, 4.0, 9.0, 1.0, 3.0, 5.0]], np.float32)
    mask = np.array([[1, 3, 0, 0, 1, 7]]).astype(mask_dtype)
    got, runs = call(run_mean, values, mask)
    np.testing.assert_allclose(got, [[3.0, 3.0, 0.0, 0.0, 4.0, 4.0]])
    np.testing.assert_array_equal(runs, [2])


def test_per_token_run_mean_float64_and_bfloat16_values(run_mean):
    mask = np.array([[1, 1, 1, 0, 1]])
    with jax.enable_x64(True):
        # 1 + 1e-12 survives in float64 only; the mean keeps it.
        values = np.array([[1.0 + 3e-12, 1.0, 1.0, 5.0, 2.0]])
        got, _ = jax.jit(run_mean)(values, mask)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, [[1.0 + 1e-12] * 3 + [0.0, 2.0]], rtol=0, atol=1e-15)
    got, _ = jax.jit(run_mean)(jnp.asarray([[1.0, 2.0, 4.0, 0.0, 8.0]], jnp.bfloat16), mask)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, [[7 / 3] * 3 + [0.0, 8.0]], rtol=1e-6)


def test_per_token_run_mean_many_rows_and_long_rows(run_mean):
    # 96 x 3000 tokens: large enough that the native kernel splits rows over threads.
    rng = np.random.default_rng(7)
    mask = (rng.uniform(size=(96, 3000)) < 0.97).astype(np.float32)
    mask[5] = 0
    mask[6] = 1
    values = rng.normal(size=mask.shape).astype(np.float32)
    want, want_runs = numpy_run_mean(values.astype(np.float64), mask)
    got, runs = jax.jit(run_mean)(values, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(runs, want_runs)


def test_per_token_run_mean_vmap(run_mean):
    rng = np.random.default_rng(3)
    mask = (rng.uniform(size=(3, 4, 37)) < 0.6).astype(np.int32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    got, runs = jax.jit(jax.vmap(run_mean))(values, mask)
    for b in range(3):
        want, want_runs = numpy_run_mean(values[b].astype(np.float64), mask[b])
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(runs[b], want_runs)


def test_per_token_run_mean_gradient(call, run_mean):
    # d/dv sum(w * mean) = M w, with M[i, j] = 1/|run| when i, j share a run (0 off runs).
    rng = np.random.default_rng(11)
    mask = np.array([[1, 1, 1, 0, 1, 1, 0, 0, 1], [0, 1, 0, 1, 1, 1, 1, 0, 1]])
    values = rng.normal(size=mask.shape).astype(np.float32)
    weights = rng.normal(size=mask.shape).astype(np.float32)
    grad = call(jax.grad(lambda v: jnp.sum(weights * run_mean(v, mask)[0])), values)
    want, _ = numpy_run_mean(weights.astype(np.float64), mask)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_per_token_run_mean_gradient_matches_finite_differences_x64(run_mean):
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        mask = (rng.uniform(size=(3, 23)) < 0.7).astype(np.int32)
        values = rng.normal(size=mask.shape)
        weights = rng.normal(size=mask.shape)

        def objective(v):
            return jnp.sum(weights * jnp.sin(run_mean(v, mask)[0]))

        grad = np.asarray(jax.jit(jax.grad(objective))(values))
        eps = 1e-6
        for index in [(0, 0), (0, 7), (1, 12), (2, 22), *zip(*np.nonzero(mask == 0), strict=True)]:
            step = np.zeros_like(values)
            step[index] = eps
            numeric = (objective(values + step) - objective(values - step)) / (2 * eps)
            np.testing.assert_allclose(grad[index], numeric, rtol=1e-6, atol=1e-9)


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
