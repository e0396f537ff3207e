"""Outcome-level (GRPO) advantages: rewards normalised within each prompt's group of samples."""

from __future__ import annotations

import chex
import jax.numpy as jnp

from atpo_jax.kernels._common import as_float


def group_normalized_advantages(
    rewards: chex.Array, valid: chex.Array | None = None, *, eps: float = 1e-6, ddof: int = 1
) -> chex.Array:
    """GRPO outcome advantage: (r − mean_g) / (std_g + eps) within each group g (a row of ``rewards``).

    Args:
      rewards: [G, S] float, S samples of each of G prompts (e.g. the leaves of a tree).
      valid: optional [G, S] bool; invalid entries are ignored and get 0.
      eps: added to the standard deviation.
      ddof: 1 for the unbiased std (the reference's torch.std in GRPO, ALGORITHM.md §3.2), 0 for the
        population std. A group with fewer than ``ddof + 1`` samples, or equal rewards, gets 0.

    Returns:
      [G, S] float32 advantages.
    """
    chex.assert_rank(rewards, 2)
    rewards = as_float(rewards)
    valid = jnp.ones(rewards.shape, bool) if valid is None else jnp.asarray(valid, bool)
    chex.assert_equal_shape([rewards, valid])
    count = jnp.sum(valid, axis=-1, keepdims=True).astype(rewards.dtype)
    mean = jnp.sum(jnp.where(valid, rewards, 0), axis=-1, keepdims=True) / jnp.maximum(count, 1)
    centred = jnp.where(valid, rewards - mean, 0)
    dof = count - ddof
    var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / jnp.maximum(dof, 1)
    std = jnp.where(dof > 0, jnp.sqrt(var), 0)
    return jnp.where(valid & (dof > 0), centred / (std + eps), 0)
