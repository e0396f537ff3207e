"""Policy losses against NumPy loops, golden behaviours (ALGORITHM.md §9.1-§9.5), gradients, edges."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from atpo_jax import kernels
from tests.kernels import numpy_reference as ref
from tests.kernels.strategies import loss_inputs

# Module-level functions so the jitted versions are compiled once, not once per example.


def atpo_loss(*args, **kwargs):
    return kernels.atpo_policy_loss(*args, **kwargs)[0]


def atpo_grad(log_probs, *args, **kwargs):
    return jax.grad(atpo_loss)(log_probs, *args, **kwargs)


def gspo_loss(*args, **kwargs):
    return kernels.gspo_policy_loss(*args, **kwargs)[0]


def gspo_grad(log_probs, *args, **kwargs):
    return jax.grad(gspo_loss)(log_probs, *args, **kwargs)


def ppo_loss(*args, **kwargs):
    return kernels.ppo_policy_loss(*args, **kwargs)[0]


def ppo_grad(log_probs, *args, **kwargs):
    return jax.grad(ppo_loss)(log_probs, *args, **kwargs)


def kl_sum(log_probs, ref_log_probs, kind):
    return jnp.sum(kernels.kl_penalty(log_probs, ref_log_probs, kind=kind))


def kl_grad(log_probs, ref_log_probs, kind):
    return jax.grad(kl_sum)(log_probs, ref_log_probs, kind)


def turn_constant(values, mask):
    """Replaces each token's value with its turn's first value (advantages are per node = per turn)."""
    ids = ref.turn_ids(mask)
    out = np.zeros_like(values)
    for s in range(mask.shape[0]):
        for k in range(ids[s].max() + 1):
            members = ids[s] == k
            out[s, members] = values[s, members][0]
    return out


# ---------------------------------------------------------------- against the NumPy loop versions


@given(inputs=loss_inputs())
def test_atpo_loss_and_gradient_match_numpy_loop(call, inputs):
    new, old, adv, mask = inputs
    loss, metrics = call(kernels.atpo_policy_loss, new, old, adv, mask)
    want_loss, want_grad, want_clipfrac = ref.turn_objective(new, old, adv, mask)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["clipfrac"], want_clipfrac, atol=1e-6)
    np.testing.assert_allclose(
        call(atpo_grad, new, old, adv, mask), want_grad, rtol=2e-5, atol=1e-6
    )


@given(inputs=loss_inputs())
def test_gspo_loss_and_gradient_match_numpy_loop(call, inputs):
    new, old, adv, mask = inputs
    loss, metrics = call(kernels.gspo_policy_loss, new, old, adv, mask)
    want_loss, want_grad, want_clipfrac = ref.turn_objective(new, old, adv, mask, whole_row=True)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["clipfrac"], want_clipfrac, atol=1e-6)
    np.testing.assert_allclose(
        call(gspo_grad, new, old, adv, mask), want_grad, rtol=2e-5, atol=1e-6
    )


@given(
    inputs=loss_inputs(scale=0.3),
    agg=st.sampled_from(kernels.LOSS_AGG_MODES),
    dual_clip=st.sampled_from([3.0, None]),
    balanced=st.booleans(),
)
def test_ppo_loss_and_gradient_match_numpy_loop(call, inputs, agg, dual_clip, balanced):
    new, old, adv, mask = inputs
    kwargs = dict(
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=dual_clip,
        loss_agg=agg,
        entropy_balanced_clipping=balanced,
    )
    loss, _ = call(kernels.ppo_policy_loss, new, old, adv, mask, **kwargs)
    want_loss, _, want_grad = ref.ppo_objective(
        new, old, adv, mask, 0.2, 0.28, dual_clip=dual_clip, agg=agg, entropy_balanced=balanced
    )
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        call(ppo_grad, new, old, adv, mask, **kwargs), want_grad, rtol=2e-5, atol=1e-6
    )


@given(inputs=loss_inputs(), agg=st.sampled_from(kernels.LOSS_AGG_MODES))
def test_atpo_aggregation_modes_match_weights(call, inputs, agg):
    new, old, adv, mask = inputs
    # With a huge clip range the per-token loss is -A * turn_ratio; check the aggregation weights.
    kwargs = dict(clip_low=0.99, clip_high=1e3, loss_agg=agg)
    loss, _ = call(kernels.atpo_policy_loss, new, old, adv, mask, **kwargs)
    ids = ref.turn_ids(mask)
    turn_ratio = np.zeros_like(new)
    for s in range(mask.shape[0]):
        for k in range(ids[s].max() + 1):
            members = ids[s] == k
            turn_ratio[s, members] = np.exp(np.mean(new[s, members] - old[s, members]))
    want = np.sum(-adv * turn_ratio * ref.aggregation_weights(mask, agg))
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["kl", "abs", "mse", "low_var_kl", "k1", "k2", "k3"])
def test_kl_penalty_matches_numpy(call, kind):
    rng = np.random.default_rng(1)
    logp = -rng.exponential(1.0, (4, 9))
    ref_lp = logp + rng.normal(0, 0.5, logp.shape)
    ref_lp[0, 0] = logp[0, 0] + 40.0  # beyond the ±20 log-ratio clamp of k3
    canonical = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}.get(kind, kind)
    got = call(kernels.kl_penalty, logp, ref_lp, kind=kind)
    np.testing.assert_allclose(got, ref.kl_penalty(logp, ref_lp, canonical), rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(call(kl_grad, logp, ref_lp, kind=kind))))


# ---------------------------------------------------------------- golden behaviours (ALGORITHM §9)


def test_golden_1_single_turn_rows_equal_gspo(call):
    rng = np.random.default_rng(2)
    mask = np.zeros((4, 20), np.int32)
    for s, (a, b) in enumerate([(0, 20), (3, 11), (5, 6), (2, 19)]):
        mask[s, a:b] = 1
    old = -rng.exponential(1.0, mask.shape)
    adv = np.repeat(rng.normal(size=(4, 1)), 20, axis=1)
    for scale in (1e-3, 0.05):  # unclipped and clipped regimes
        new = old + rng.normal(0, scale, mask.shape)
        np.testing.assert_allclose(
            call(atpo_loss, new, old, adv, mask), call(gspo_loss, new, old, adv, mask), rtol=1e-6
        )
        np.testing.assert_allclose(
            call(atpo_grad, new, old, adv, mask), call(gspo_grad, new, old, adv, mask), atol=1e-7
        )


def test_golden_2_on_policy_value_and_gradient(call):
    rng = np.random.default_rng(3)
    mask = np.array([[0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 1]])
    logp = -rng.exponential(1.0, mask.shape)
    adv = rng.normal(size=mask.shape)
    loss = call(atpo_loss, logp, logp, adv, mask)
    row_means = [adv[s][mask[s] == 1].mean() for s in range(3)]
    np.testing.assert_allclose(loss, -np.mean(row_means), rtol=1e-6)
    grad = call(atpo_grad, logp, logp, adv, mask)
    want = -adv * mask / (3 * mask.sum(1, keepdims=True))
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-8)


def test_golden_3_turn_ratio_value_is_shared_and_turn_local(call):
    mask = np.array([[1, 1, 1, 0, 0, 1, 1, 0]])
    old = np.array([[-1.0, -2.0, -0.5, -3.0, -3.0, -1.5, -0.7, -9.0]])
    new = old + np.array([[0.3, -0.1, 0.1, 5.0, 5.0, 0.2, 0.6, 5.0]])
    wide = dict(clip_low=0.99, clip_high=1e3)  # never clip, so loss = -A·s / |m|
    for t in np.flatnonzero(mask[0]):
        onehot = np.zeros_like(new)
        onehot[0, t] = 1.0
        ratio = -call(atpo_loss, new, old, onehot, mask, **wide) * mask.sum()
        turn = [0, 1, 2] if t < 3 else [5, 6]
        np.testing.assert_allclose(ratio, np.exp(np.mean((new - old)[0, turn])), rtol=1e-6)
    # Changing a token of turn 1 leaves every ratio of turn 2 (hence a turn-2-only loss) unchanged.
    turn2_adv = np.array([[0, 0, 0, 0, 0, 1.0, -2.0, 0]])
    moved = new.copy()
    moved[0, 1] += 0.7
    np.testing.assert_allclose(
        call(atpo_loss, moved, old, turn2_adv, mask, **wide),
        call(atpo_loss, new, old, turn2_adv, mask, **wide),
        rtol=1e-7,
    )


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_golden_4_clipped_turn_gets_zero_gradient(call, sign):
    mask = np.array([[1, 1, 1, 0, 1, 1]])
    old = np.full((1, 6), -1.0)
    # Turn 1 moves by +0.01 (ratio 1.01 > 1 + 4e-3) for A > 0, or -0.01 (< 1 - 3e-3) for A < 0;
    # turn 2 moves by 1e-4 (inside the clip range).
    shift = np.array([[0.01, 0.01, 0.01, 0.0, 1e-4, 1e-4]]) * sign
    new = old + shift
    adv = np.full((1, 6), sign)
    grad = np.asarray(call(atpo_grad, new, old, adv, mask))
    np.testing.assert_array_equal(grad[0, :3], 0.0)
    assert np.all(grad[0, 4:] != 0.0)
    _, metrics = call(kernels.atpo_policy_loss, new, old, adv, mask)
    np.testing.assert_allclose(metrics["clipfrac"], 3 / 5)
    side = "clipfrac_high" if sign > 0 else "clipfrac_low"
    np.testing.assert_allclose(metrics[side], 3 / 5)


def test_golden_4_log_ratio_clamps_at_ten(call):
    mask = np.ones((1, 3), np.int32)
    old = np.full((1, 3), -20.0)
    new = np.full((1, 3), -5.0)  # log-ratio 15 > 10
    adv = np.full((1, 3), -1.0)  # A < 0: the unclipped branch -A·s = e^10 is the max
    loss, metrics = call(kernels.atpo_policy_loss, new, old, adv, mask)
    np.testing.assert_allclose(loss, np.exp(10.0), rtol=1e-6)
    np.testing.assert_allclose(metrics["ratio_mean"], np.exp(10.0), rtol=1e-6)
    np.testing.assert_array_equal(call(atpo_grad, new, old, adv, mask), 0.0)
    loss = call(atpo_loss, new, old, adv, mask, max_log_ratio=2.0)
    np.testing.assert_allclose(loss, np.exp(2.0), rtol=1e-6)


@pytest.mark.parametrize("grad_fn", [atpo_grad, gspo_grad, ppo_grad])
def test_golden_5_masked_tokens_get_zero_gradient_whatever_they_hold(call, grad_fn):
    # Row: turn, tool result (mask 0), turn, EOS, then padding after the first EOS (mask 0).
    mask = np.array([[1, 1, 0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0]])
    rng = np.random.default_rng(4)
    old = -rng.exponential(1.0, mask.shape)
    new = old + rng.normal(0, 1e-3, mask.shape)
    adv = rng.normal(size=mask.shape)
    # Garbage where the mask is 0 must not leak into value or gradient.
    for arr, junk in ((new, -np.inf), (old, np.nan), (adv, np.inf)):
        arr[mask == 0] = junk
    grad = np.asarray(call(grad_fn, new, old, adv, mask))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[mask == 0], 0.0)
    assert np.all(grad[mask == 1] != 0.0)


def test_entropy_balanced_clipping_keeps_the_gradient_of_upper_clipped_tokens(call):
    # Ratios e^0.5 ≈ 1.65 (above 1 + 0.2), 1.0 and e^-0.5 ≈ 0.61 (below 1 - 0.2), for A = +1 and -1.
    shift = np.array([0.5, 0.0, -0.5])
    old = np.full((2, 3), -1.0)
    new = old + shift
    adv = np.array([[1.0] * 3, [-1.0] * 3])
    mask = np.ones((2, 3), np.int32)
    kwargs = dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    hard, hard_metrics = call(kernels.ppo_policy_loss, new, old, adv, mask, **kwargs)
    soft, soft_metrics = call(
        kernels.ppo_policy_loss, new, old, adv, mask, entropy_balanced_clipping=True, **kwargs
    )
    # The value does not change: row 1 = -(1.2 + 1 + e^-0.5), row 2 = e^0.5 + 1 + 0.8, / 6.
    want = (-(1.2 + 1.0 + np.exp(-0.5)) + (np.exp(0.5) + 1.0 + 0.8)) / 6
    np.testing.assert_allclose([hard, soft], [want, want], rtol=1e-6)
    assert hard_metrics["clipfrac"] == soft_metrics["clipfrac"] == pytest.approx(2 / 6)
    # Gradients (token-mean over 6 tokens): only the A > 0, r > 1.2 token differs: -1.2/6, not 0.
    hard_grad = np.asarray(call(ppo_grad, new, old, adv, mask, **kwargs))
    soft_grad = np.asarray(
        call(ppo_grad, new, old, adv, mask, entropy_balanced_clipping=True, **kwargs)
    )
    ratio = np.exp(shift)
    want_hard = np.array([[0.0, -1.0, -ratio[2]], [ratio[0], 1.0, 0.0]]) / 6
    np.testing.assert_allclose(hard_grad, want_hard, rtol=1e-6)
    want_soft = want_hard.copy()
    want_soft[0, 0] = -1.2 / 6
    np.testing.assert_allclose(soft_grad, want_soft, rtol=1e-6)


# ---------------------------------------------------------------- gradients vs finite differences


def _central_differences(fn, x, eps=1e-6):
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[idx] += eps
        down[idx] -= eps
        grad[idx] = (float(fn(up)) - float(fn(down))) / (2 * eps)
    return grad


def _far_from_clip_boundaries(new, old, mask, lo, hi, whole_row):
    """True when every group's ratio is at least 1e-4 away from the clip bounds (FD-safe)."""
    for s in range(mask.shape[0]):
        groups = [(0, mask.shape[1])] if whole_row else ref.turns_of_row(mask[s])
        for a, b in groups:
            members = mask[s, a:b] == 1
            if members.any():
                ratio = np.exp(np.mean((new - old)[s, a:b][members]))
                if min(abs(ratio - (1 - lo)), abs(ratio - (1 + hi))) < 1e-4:
                    return False
    return True


@pytest.mark.parametrize("loss_fn", [atpo_loss, gspo_loss])
@pytest.mark.parametrize("scale", [1e-3, 3e-2])
def test_turn_losses_gradient_matches_finite_differences_x64(loss_fn, scale):
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        mask = np.array(
            [
                [0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1],
                [1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0],
            ]
        )
        old = -rng.exponential(1.0, mask.shape)
        while True:
            new = old + rng.normal(0, scale, mask.shape)
            if _far_from_clip_boundaries(new, old, mask, 3e-3, 4e-3, loss_fn is gspo_loss):
                break
        # Advantages are constant within each turn (for GSPO: within each row), as tree credit gives.
        adv = turn_constant(rng.normal(size=mask.shape), mask)
        if loss_fn is gspo_loss:
            adv = np.repeat(adv.max(axis=1, keepdims=True), mask.shape[1], axis=1)
        loss = jax.jit(
            functools.partial(loss_fn, old_log_probs=old, advantages=adv, loss_mask=mask)
        )
        grad = jax.grad(loss)(jnp.asarray(new))
        assert grad.dtype == jnp.float64
        np.testing.assert_allclose(grad, _central_differences(loss, new), atol=1e-8)


@pytest.mark.parametrize("agg", kernels.LOSS_AGG_MODES)
def test_ppo_gradient_matches_finite_differences_x64(agg):
    with jax.enable_x64(True):
        rng = np.random.default_rng(6)
        mask = (rng.uniform(size=(3, 10)) < 0.7).astype(np.int32)
        old = -rng.exponential(1.0, mask.shape)
        new = old + rng.normal(0, 0.5, mask.shape)
        ratio = np.exp(new - old)
        assert np.min(np.abs(ratio[:, :, None] - np.array([0.8, 1.2, 3.0]))) > 1e-4
        adv = rng.normal(size=mask.shape)
        loss = jax.jit(
            functools.partial(
                ppo_loss, old_log_probs=old, advantages=adv, loss_mask=mask, loss_agg=agg
            )
        )
        grad = jax.grad(loss)(jnp.asarray(new))
        np.testing.assert_allclose(grad, _central_differences(loss, new), atol=1e-8)


@pytest.mark.parametrize("kind", kernels.KL_KINDS)
def test_kl_gradient_matches_finite_differences_x64(kind):
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        logp = -rng.exponential(1.0, (2, 6))
        ref_lp = logp + rng.normal(0, 0.5, logp.shape)
        total = jax.jit(functools.partial(kl_sum, ref_log_probs=ref_lp, kind=kind))
        grad = jax.grad(total)(jnp.asarray(logp))
        np.testing.assert_allclose(grad, _central_differences(total, logp), atol=1e-7)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("loss_fn", [atpo_loss, gspo_loss, ppo_loss])
def test_empty_rows_are_excluded_and_all_empty_is_zero(call, loss_fn):
    rng = np.random.default_rng(8)
    mask = np.array([[1, 1, 0, 1], [0, 0, 0, 0]])
    old = -rng.exponential(1.0, mask.shape)
    new = old + 1e-4
    adv = rng.normal(size=mask.shape)
    with_empty = call(loss_fn, new, old, adv, mask)
    without = call(loss_fn, new[:1], old[:1], adv[:1], mask[:1])
    np.testing.assert_allclose(with_empty, without, rtol=1e-6)
    zero_mask = np.zeros_like(mask)
    assert float(call(loss_fn, new, old, adv, zero_mask)) == 0.0
    grad_fn = {atpo_loss: atpo_grad, gspo_loss: gspo_grad, ppo_loss: ppo_grad}[loss_fn]
    np.testing.assert_array_equal(call(grad_fn, new, old, adv, zero_mask), 0.0)


def test_metrics_are_finite_for_an_all_empty_batch(call):
    zeros = np.zeros((2, 5))
    for fn in (kernels.atpo_policy_loss, kernels.gspo_policy_loss, kernels.ppo_policy_loss):
        loss, metrics = call(fn, zeros, zeros, zeros, zeros.astype(np.int32))
        assert np.isfinite(float(loss))
        assert all(np.isfinite(float(v)) for v in metrics.values())


def test_atpo_metrics_hand_case(call):
    mask = np.array([[1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    zeros = np.zeros(mask.shape)
    _, metrics = call(kernels.atpo_policy_loss, zeros - 0.5, zeros, zeros, mask)
    np.testing.assert_allclose(metrics["num_turns"], 1.5)  # rows with 2 and 1 turns
    np.testing.assert_allclose(metrics["single_turn_frac"], 0.5)
    np.testing.assert_allclose(metrics["ppo_kl"], 0.5)
    np.testing.assert_allclose(metrics["ratio_mean"], np.exp(-0.5), rtol=1e-6)


def test_explicit_turn_ids_match_numpy_and_default(call):
    rng = np.random.default_rng(9)
    mask = np.array([[1, 1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1, 0]])
    old = -rng.exponential(1.0, mask.shape)
    new = old + rng.normal(0, 3e-3, mask.shape)
    adv = rng.normal(size=mask.shape)
    default = call(atpo_loss, new, old, adv, mask)
    derived = np.asarray(ref.turn_ids(mask), np.int32)
    np.testing.assert_allclose(call(atpo_loss, new, old, adv, mask, turn_ids=derived), default)
    # Custom turns (e.g. one turn per tree node) that split a contiguous run of the mask.
    custom = np.array([[0, 0, 1, 1, -1, 2, 2], [-1, 0, 1, 1, 1, 3, -1]], np.int32)
    want_loss, want_grad, _ = ref.turn_objective(new, old, adv, mask, ids=custom)
    np.testing.assert_allclose(call(atpo_loss, new, old, adv, mask, turn_ids=custom), want_loss)
    np.testing.assert_allclose(
        call(atpo_grad, new, old, adv, mask, turn_ids=custom), want_grad, atol=1e-7
    )
    # Garbage where the mask is 0 stays out of the explicit-turn path too, even on tokens that
    # carry a turn id (token 0 of row 1 is numbered but masked).
    custom[1, 0] = 0
    junk_new, junk_old, junk_adv = new.copy(), old.copy(), adv.copy()
    for arr, junk in ((junk_new, -np.inf), (junk_old, np.nan), (junk_adv, np.inf)):
        arr[mask == 0] = junk
    np.testing.assert_allclose(
        call(atpo_loss, junk_new, junk_old, junk_adv, mask, turn_ids=custom), want_loss
    )
    np.testing.assert_allclose(
        call(atpo_grad, junk_new, junk_old, junk_adv, mask, turn_ids=custom), want_grad, atol=1e-7
    )


def test_bfloat16_inputs_compute_in_float32():
    mask = jnp.ones((2, 4), jnp.int32)
    lp = jnp.full((2, 4), -1.0, jnp.bfloat16)
    loss, _ = kernels.atpo_policy_loss(lp, lp, jnp.ones((2, 4), jnp.bfloat16), mask)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, -1.0)


# ---------------------------------------------------------------- errors


def test_shape_and_rank_errors_at_trace_time():
    good = jnp.zeros((2, 5))
    with pytest.raises(AssertionError):
        jax.jit(atpo_loss)(good, good, jnp.zeros((2, 4)), good)
    with pytest.raises(AssertionError, match="rank"):
        jax.jit(ppo_loss)(jnp.zeros((2, 5, 1)), good, good, good)
    with pytest.raises(AssertionError):
        kernels.atpo_policy_loss(good, good, good, good, turn_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(AssertionError):
        kernels.atpo_policy_loss(good, good, good, good, turn_ids=jnp.zeros((2, 5)))  # not int
    with pytest.raises(AssertionError):
        kernels.kl_penalty(good, jnp.zeros((5, 2)))


def test_bad_settings_name_the_setting():
    good = jnp.zeros((2, 5))
    with pytest.raises(ValueError, match="loss_agg='sum'"):
        kernels.atpo_policy_loss(good, good, good, good, loss_agg="sum")
    with pytest.raises(ValueError, match="clip_low"):
        kernels.atpo_policy_loss(good, good, good, good, clip_low=-0.1)
    with pytest.raises(ValueError, match="max_log_ratio"):
        kernels.gspo_policy_loss(good, good, good, good, max_log_ratio=0.0)
    with pytest.raises(ValueError, match="dual_clip"):
        kernels.ppo_policy_loss(good, good, good, good, dual_clip=0.5)
    with pytest.raises(ValueError, match="kind='k4'"):
        kernels.kl_penalty(good, good, kind="k4")
