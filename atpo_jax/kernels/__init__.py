"""Pure, jitted AT²PO array math: turns, entropy, tree selection, credit assignment and losses.

This is the stable public surface (DESIGN.md §3). Every function is a pure function of arrays, works
under ``jax.jit`` with static shapes, computes in float32 (float64 in x64 mode), checks shapes with chex
at trace time and returns finite values for empty masks, one-leaf trees and equal rewards.

    from atpo_jax import kernels
    loss, metrics = kernels.atpo_policy_loss(log_probs, old_log_probs, advantages, loss_mask)
"""

from atpo_jax.kernels.losses import (
    KL_KINDS,
    LOSS_AGG_MODES,
    aggregate_loss,
    atpo_policy_loss,
    gspo_policy_loss,
    kl_penalty,
    ppo_policy_loss,
)
from atpo_jax.kernels.outcome import group_normalized_advantages
from atpo_jax.kernels.tree import (
    ADVANTAGE_MODES,
    VALUE_MODES,
    expansion_scores,
    normalize_leaf_rewards,
    select_expansion_nodes,
    token_advantages,
    tree_node_advantages,
    tree_node_values,
)
from atpo_jax.kernels.turns import segment_mean, token_entropy, turn_ids_from_mask

__all__ = [
    "ADVANTAGE_MODES",
    "KL_KINDS",
    "LOSS_AGG_MODES",
    "VALUE_MODES",
    "aggregate_loss",
    "atpo_policy_loss",
    "expansion_scores",
    "group_normalized_advantages",
    "gspo_policy_loss",
    "kl_penalty",
    "normalize_leaf_rewards",
    "ppo_policy_loss",
    "segment_mean",
    "select_expansion_nodes",
    "token_advantages",
    "token_entropy",
    "tree_node_advantages",
    "tree_node_values",
    "turn_ids_from_mask",
]
