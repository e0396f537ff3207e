"""Policy-gradient losses: AT²PO's turn-level clipped objective, GSPO, PPO (dual clip) and KL penalties.

All losses take per-token arrays of shape [S, L] (S rows = trajectories, L = padded response length):

* ``log_probs``: log π_θ(y_t | ·) of the sampled tokens under the current policy (carries gradient);
* ``old_log_probs``: the same under the behaviour policy (treated as constants);
* ``advantages``: per-token advantages (constant within a turn for tree credit);
* ``loss_mask``: 1 for policy-sampled tokens, 0 for tool results, inserted text and padding.

Masked positions never influence the loss, its gradient or its metrics, whatever they hold (even
``-inf`` or NaN). Each loss returns ``(loss, metrics)`` with a float scalar loss and a dict of float
scalar diagnostics, and is safe under ``jax.jit`` and ``jax.grad`` (gradient w.r.t. ``log_probs``).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from atpo_jax.kernels._common import as_float, as_mask, check_choice, masked_mean, safe_divide
from atpo_jax.kernels.turns import per_token_run_mean, per_token_turn_mean

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_KINDS = ("kl", "abs", "mse", "low_var_kl")
_KL_ALIASES = {"k1": "kl", "k2": "mse", "k3": "low_var_kl"}

# exp() of a per-token PPO log-ratio is computed on values clamped to this range (as the reference).
_PPO_LOG_RATIO_RANGE = 20.0
# k3 KL: the log-ratio is clamped to ±20 and the per-token KL to ±10 (as the reference).
_KL_LOG_RATIO_RANGE = 20.0
_KL_VALUE_RANGE = 10.0


def aggregate_loss(loss_per_token: chex.Array, loss_mask: chex.Array, mode: str) -> chex.Array:
    """Reduces a [S, L] per-token loss to a scalar.

    Modes (m = loss mask, ℓ = per-token loss, rows counted only when they hold a masked token):

    * ``token-mean``: Σ_{s,t} m ℓ / Σ_{s,t} m.
    * ``seq-mean-token-mean``: mean over rows of (Σ_t m ℓ / Σ_t m).
    * ``seq-mean-token-sum``: mean over rows of Σ_t m ℓ.
    * ``seq-mean-token-sum-norm``: Σ_{s,t} m ℓ / L (a constant normaliser, Dr. GRPO style).

    An all-zero mask gives 0, never NaN.
    """
    check_choice("loss_agg", mode, LOSS_AGG_MODES)
    loss_per_token = jnp.where(loss_mask != 0, loss_per_token, 0)
    if mode == "token-mean":
        return masked_mean(loss_per_token, loss_mask)
    row_sum = jnp.sum(loss_per_token * loss_mask, axis=-1)
    row_count = jnp.sum(loss_mask, axis=-1)
    row_has_tokens = (row_count > 0).astype(row_sum.dtype)
    if mode == "seq-mean-token-mean":
        return masked_mean(safe_divide(row_sum, row_count), row_has_tokens)
    if mode == "seq-mean-token-sum":
        return masked_mean(row_sum, row_has_tokens)
    return jnp.sum(row_sum) / loss_mask.shape[-1]


def atpo_policy_loss(
    log_probs: chex.Array,
    old_log_probs: chex.Array,
    advantages: chex.Array,
    loss_mask: chex.Array,
    *,
    clip_low: float = 3e-3,
    clip_high: float = 4e-3,
    turn_ids: chex.Array | None = None,
    max_log_ratio: float = 10.0,
    loss_agg: str = "seq-mean-token-mean",
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """AT²PO's turn-level clipped policy objective ("GSPO-turn", ALGORITHM.md §4.2).

    For each turn τ of a row (a maximal run of ``loss_mask == 1``, or the tokens sharing a ``turn_ids``
    value), with masked tokens T_τ:

        ℓ_τ = (1/|T_τ|) Σ_{t∈T_τ} (log π_θ(y_t) − log π_old(y_t))
        s_t = exp(min(sg(ℓ_τ) + log π_θ(y_t) − sg(log π_θ(y_t)), max_log_ratio))      t ∈ T_τ
        L_t = max(−A_t s_t, −A_t clip(s_t, 1 − clip_low, 1 + clip_high))

    so every token of a turn carries the turn's ratio value exp(ℓ_τ), but the gradient of token t is
    s_t ∇ log π_θ(y_t) (value from the turn, gradient from the token); when the clipped branch is active
    the whole turn gets zero gradient, and a clamped log-ratio gets zero gradient. With advantages that
    are constant within each turn, the gradient equals that of Σ_τ |T_τ| · max(−A_τ e^{ℓ_τ}, …). A row
    with one turn gives exactly the GSPO value and gradient (:func:`gspo_policy_loss`). The per-token
    losses are aggregated with ``loss_agg`` (paper: ``seq-mean-token-mean``, i.e. the mean over rows that
    hold at least one masked token of each row's masked token mean).

    Args:
      log_probs: [S, L] current-policy log-probs (gradients flow through these).
      old_log_probs: [S, L] behaviour-policy log-probs.
      advantages: [S, L] per-token advantages.
      loss_mask: [S, L] 1 for trained tokens.
      clip_low, clip_high: ε_low, ε_high of the ratio clip (paper: 3e-3, 4e-3).
      turn_ids: optional [S, L] int turn index in [0, L) per token (-1 outside turns); ``None`` derives
        the turns from ``loss_mask`` (:func:`turn_ids_from_mask`).
      max_log_ratio: upper clamp of the log-ratio exponent (reference: 10).
      loss_agg: aggregation mode, see :func:`aggregate_loss`.

    Returns:
      ``(loss, metrics)``; metrics: ``clipfrac`` (masked fraction of tokens whose clipped branch is
      active), ``clipfrac_low`` / ``clipfrac_high`` (split by side), ``ppo_kl`` (masked mean of
      old − new), ``ratio_mean`` (masked mean of the turn ratio), ``num_turns`` (mean turns per non-empty
      row), ``single_turn_frac`` (fraction of non-empty rows with one turn).

    Reference: AT²PO (arXiv 2601.04767) §3.4; GSPO (arXiv 2507.18071) for the sequence-level case.
    """
    _validate_clip(clip_low, clip_high)
    _validate_max_log_ratio(max_log_ratio)
    unmasked_log_probs, unmasked_old_log_probs = log_probs, old_log_probs
    log_probs, old_log_probs, advantages, mask = _prepare(
        log_probs, old_log_probs, advantages, loss_mask
    )
    # Both turn means read only masked entries, so they take the caller's arrays as they are: on CPU
    # that spares XLA materialising masked copies as inputs of the native kernel (one fused
    # subtraction instead of three passes).
    log_ratio = jax.lax.stop_gradient(
        as_float(unmasked_log_probs) - as_float(unmasked_old_log_probs)
    )
    if turn_ids is None:
        # Turns are the runs of the mask.
        turn_log_ratio, turns_per_row = per_token_run_mean(log_ratio, loss_mask)
    else:
        chex.assert_shape(turn_ids, log_probs.shape)
        chex.assert_type(turn_ids, int)
        turn_log_ratio, turns_per_row = per_token_turn_mean(log_ratio, mask, jnp.asarray(turn_ids))
    loss_per_token, metrics = _clipped_sequence_objective(
        turn_log_ratio,
        log_probs,
        old_log_probs,
        advantages,
        mask,
        clip_low,
        clip_high,
        max_log_ratio,
    )
    row_has_tokens = (jnp.sum(mask, axis=-1) > 0).astype(mask.dtype)
    metrics["num_turns"] = masked_mean(turns_per_row.astype(mask.dtype), row_has_tokens)
    metrics["single_turn_frac"] = masked_mean(
        (turns_per_row == 1).astype(mask.dtype), row_has_tokens
    )
    return aggregate_loss(loss_per_token, mask, loss_agg), metrics


def gspo_policy_loss(
    log_probs: chex.Array,
    old_log_probs: chex.Array,
    advantages: chex.Array,
    loss_mask: chex.Array,
    *,
    clip_low: float = 3e-3,
    clip_high: float = 4e-3,
    max_log_ratio: float = 10.0,
    loss_agg: str = "seq-mean-token-mean",
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """GSPO: the sequence-level clipped objective (GSPO-token form, ALGORITHM.md §4.3).

    Identical to :func:`atpo_policy_loss` with the whole masked row as one turn:

        ℓ_s = (1/|m_s|) Σ_t m_t (log π_θ(y_t) − log π_old(y_t)),
        s_t = exp(min(sg(ℓ_s) + log π_θ(y_t) − sg(log π_θ(y_t)), max_log_ratio)),
        L_t = max(−A_t s_t, −A_t clip(s_t, 1 − clip_low, 1 + clip_high)).

    Args and returns as :func:`atpo_policy_loss` (shapes [S, L]); metrics: ``clipfrac``,
    ``clipfrac_low``, ``clipfrac_high``, ``ppo_kl``, ``ratio_mean``.

    Reference: GSPO (arXiv 2507.18071), eq. (7) and the GSPO-token variant.
    """
    _validate_clip(clip_low, clip_high)
    _validate_max_log_ratio(max_log_ratio)
    log_probs, old_log_probs, advantages, mask = _prepare(
        log_probs, old_log_probs, advantages, loss_mask
    )
    log_ratio = jax.lax.stop_gradient(log_probs - old_log_probs)
    row_log_ratio = masked_mean(log_ratio, mask, axis=-1)[:, None]
    loss_per_token, metrics = _clipped_sequence_objective(
        jnp.broadcast_to(row_log_ratio, log_probs.shape),
        log_probs,
        old_log_probs,
        advantages,
        mask,
        clip_low,
        clip_high,
        max_log_ratio,
    )
    return aggregate_loss(loss_per_token, mask, loss_agg), metrics


def ppo_policy_loss(
    log_probs: chex.Array,
    old_log_probs: chex.Array,
    advantages: chex.Array,
    loss_mask: chex.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
    loss_agg: str = "token-mean",
    entropy_balanced_clipping: bool = False,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """Token-level PPO clipped objective with dual clip (GRPO / DAPO style; ALGORITHM.md §4.3).

        r_t = exp(clip(log π_θ(y_t) − log π_old(y_t), −20, 20))
        L_t = max(−A_t r_t, −A_t clip(r_t, 1 − clip_low, u_t))
        L_t = min(L_t, −A_t · dual_clip)              where A_t < 0 (if ``dual_clip`` is not None)

    with the upper bound u_t = 1 + clip_high, or, with ``entropy_balanced_clipping`` (AEPO),
    u_t = (1 + clip_high) · r_t / sg(r_t): the same value 1 + clip_high, but it carries the
    gradient (1 + clip_high) ∇ log π_θ(y_t). The loss VALUE is unchanged; only tokens with
    A_t > 0 and r_t > 1 + clip_high (the upper clip active) see a difference: their gradient is
    −A_t (1 + clip_high) ∇ log π_θ(y_t) instead of 0, so high-probability-gain tokens (typically
    high-entropy exploration tokens) keep a bounded learning signal. The lower bound stays a
    constant (a clipped A_t < 0 token still gets no gradient). As the reference's
    ``compute_policy_loss_entropy_balanced_clipping`` (AEPO/verl_aepo_entropy/verl/trainer/ppo/
    core_algos.py L571-683, ``max_bound = (1 + cliprange_high) / ratio.detach() * ratio`` inside
    ``torch.clamp``), whose "entropy-balanced advantage" part is not included (it is a no-op in the
    AEPO baseline: ALGORITHM.md §5, §8 item 22). Reference: AEPO, "Agentic Entropy-Balanced Policy
    Optimization" (Dong et al., 2025), entropy-balanced policy optimization.

    Args:
      log_probs, old_log_probs, advantages, loss_mask: [S, L] as in the module docstring.
      clip_low, clip_high: ε_low, ε_high.
      dual_clip: the dual-clip constant c > 1 (Ye et al. 2020) or ``None`` to disable it.
      loss_agg: aggregation mode, see :func:`aggregate_loss`.
      entropy_balanced_clipping: the gradient-carrying upper bound above (static Python bool).

    Returns:
      ``(loss, metrics)``; metrics: ``clipfrac`` (masked fraction where the clipped branch is active),
      ``clipfrac_lower`` (masked fraction where the dual clip is active), ``ppo_kl``, ``ratio_mean``.

    Example::

        lp = jnp.log(jnp.array([[0.9, 0.5]]))          # current policy
        old = jnp.log(jnp.array([[0.6, 0.5]]))         # r = [1.5, 1.0]
        adv, mask = jnp.ones((1, 2)), jnp.ones((1, 2))
        loss, _ = ppo_policy_loss(lp, old, adv, mask)  # -(1.2 + 1.0) / 2 = -1.1 either way
        g = jax.grad(lambda x: ppo_policy_loss(x, old, adv, mask,
                                               entropy_balanced_clipping=True)[0])(lp)
        # g = [[-0.6, -0.5]]: -(1 + 0.2) / 2 on the clipped token (0 without the option)
    """
    _validate_clip(clip_low, clip_high)
    log_probs, old_log_probs, advantages, mask = _prepare(
        log_probs, old_log_probs, advantages, loss_mask
    )
    if dual_clip is not None and _is_static_number(dual_clip) and not dual_clip > 1.0:
        raise ValueError(f"ppo_policy_loss: dual_clip must be > 1 or None, got {dual_clip}")
    log_ratio = jnp.clip(log_probs - old_log_probs, -_PPO_LOG_RATIO_RANGE, _PPO_LOG_RATIO_RANGE)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    if entropy_balanced_clipping:
        # Above the upper bound the bound itself is the tensor (1 + ε_h)·r/sg(r): value 1 + ε_h,
        # gradient (1 + ε_h)·∇log π (torch.clamp with a tensor max routes the gradient to it).
        upper = (1.0 + clip_high) * ratio / jax.lax.stop_gradient(ratio)
        clipped_ratio = jnp.where(ratio > 1.0 + clip_high, upper, clipped_ratio)
    clipped = -advantages * clipped_ratio
    loss_per_token = jnp.maximum(unclipped, clipped)
    dual_active = jnp.zeros_like(mask)
    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        negative = advantages < 0
        dual_active = (negative & (loss_per_token > dual_bound)).astype(mask.dtype)
        loss_per_token = jnp.where(
            negative, jnp.minimum(loss_per_token, dual_bound), loss_per_token
        )
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).astype(mask.dtype), mask),
        "clipfrac_lower": masked_mean(dual_active, mask),
        "ppo_kl": masked_mean(-log_ratio, mask),
        "ratio_mean": masked_mean(ratio, mask),
    }
    metrics = jax.tree.map(jax.lax.stop_gradient, metrics)
    return aggregate_loss(loss_per_token, mask, loss_agg), metrics


def kl_penalty(log_probs: chex.Array, ref_log_probs: chex.Array, kind: str = "low_var_kl"):
    """Per-token KL estimate between the policy and a reference policy (Schulman's k1/k2/k3).

    With d = log π_θ − log π_ref:

    * ``kl`` (k1): d
    * ``abs``: |d|
    * ``mse`` (k2): ½ d²
    * ``low_var_kl`` (k3): e^{−d'} + d' − 1 with d' = clip(d, −20, 20), clamped to [−10, 10]
      (unbiased, non-negative, low variance; the reference's default).

    Args:
      log_probs: [S, L] current-policy log-probs (gradients flow through these).
      ref_log_probs: [S, L] reference-policy log-probs.
      kind: one of ``kl``, ``abs``, ``mse``, ``low_var_kl`` (aliases ``k1``, ``k2``, ``k3``).

    Returns:
      [S, L] float per-token penalty; aggregate it with the loss mask (e.g. :func:`aggregate_loss`).
      Entries at masked positions are whatever the inputs give there: mask them.
    """
    chex.assert_rank([log_probs, ref_log_probs], 2)
    chex.assert_equal_shape([log_probs, ref_log_probs])
    kind = _KL_ALIASES.get(kind, kind)
    check_choice("kind", kind, KL_KINDS)
    diff = as_float(log_probs) - jax.lax.stop_gradient(as_float(ref_log_probs))
    if kind == "kl":
        return diff
    if kind == "abs":
        return jnp.abs(diff)
    if kind == "mse":
        return 0.5 * jnp.square(diff)
    ref_minus_policy = jnp.clip(-diff, -_KL_LOG_RATIO_RANGE, _KL_LOG_RATIO_RANGE)
    k3 = jnp.exp(ref_minus_policy) - ref_minus_policy - 1.0
    return jnp.clip(k3, -_KL_VALUE_RANGE, _KL_VALUE_RANGE)


def _clipped_sequence_objective(
    group_log_ratio: chex.Array,
    log_probs: chex.Array,
    old_log_probs: chex.Array,
    advantages: chex.Array,
    mask: chex.Array,
    clip_low: float,
    clip_high: float,
    max_log_ratio: float,
) -> tuple[chex.Array, dict[str, chex.Array]]:
    """Per-token loss of the GSPO-style objective given each token's group (turn/row) log-ratio."""
    group_log_ratio = jax.lax.stop_gradient(group_log_ratio)
    log_ratio = group_log_ratio + log_probs - jax.lax.stop_gradient(log_probs)
    # A clamped exponent carries no gradient, as torch.clamp in the reference.
    log_ratio = jnp.where(log_ratio > max_log_ratio, max_log_ratio, log_ratio)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss_per_token = jnp.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    ratio_value = jax.lax.stop_gradient(ratio)
    metrics = {
        "clipfrac": masked_mean(clip_active.astype(mask.dtype), mask),
        "clipfrac_low": masked_mean((clip_active & (ratio_value < 1.0)).astype(mask.dtype), mask),
        "clipfrac_high": masked_mean((clip_active & (ratio_value > 1.0)).astype(mask.dtype), mask),
        "ppo_kl": masked_mean(old_log_probs - log_probs, mask),
        "ratio_mean": masked_mean(ratio_value, mask),
    }
    return loss_per_token, jax.tree.map(jax.lax.stop_gradient, metrics)


def _validate_clip(clip_low, clip_high) -> None:
    """Rejects clip ranges that make the objective meaningless (checked when given as Python numbers)."""
    if _is_static_number(clip_low) and not 0.0 <= clip_low < 1.0:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if _is_static_number(clip_high) and not clip_high >= 0.0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")


def _prepare(log_probs, old_log_probs, advantages, loss_mask):
    """Shape checks, float casting and zeroing of masked entries."""
    chex.assert_rank([log_probs, old_log_probs, advantages, loss_mask], 2)
    chex.assert_equal_shape([log_probs, old_log_probs, advantages, loss_mask])
    log_probs = as_float(log_probs)
    mask = as_mask(loss_mask, log_probs.dtype)
    inside = mask != 0
    # Masked entries may hold anything (-inf log-probs at padding, NaN): replace them before any math
    # so neither the value nor the gradient can pick them up.
    log_probs = jnp.where(inside, log_probs, 0)
    old_log_probs = jnp.where(inside, jax.lax.stop_gradient(as_float(old_log_probs)), 0)
    advantages = jnp.where(inside, jax.lax.stop_gradient(as_float(advantages)), 0)
    return log_probs, old_log_probs, advantages, mask


def _validate_max_log_ratio(max_log_ratio) -> None:
    if _is_static_number(max_log_ratio) and not max_log_ratio > 0:
        raise ValueError(f"max_log_ratio must be > 0, got {max_log_ratio}")


def _is_static_number(value) -> bool:
    return isinstance(value, int | float)
