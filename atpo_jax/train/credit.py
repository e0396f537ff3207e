"""From leaf rewards to per-token advantages: AT²PO tree credit or GRPO outcome advantages.

``tree`` (ALGORITHM.md §3.2): per-tree z-score of the leaf rewards (``credit.leaf_value_norm``),
node values backed up the tree (``credit.node_value_mode``), node advantages
(``credit.node_adv_mode``), written onto the tokens of each leaf's row.

``grpo``: the outcome advantage (r − mean) / (std + ε) over each prompt's leaves (unbiased std, as
the reference's GRPO), broadcast over the row's response tokens. With tree rollouts this is the
paper's "no turn-wise credit" ablation; with chain rollouts it is the GRPO baseline.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from atpo_jax import kernels

CREDIT_MODES = ("tree", "grpo")


@dataclasses.dataclass(frozen=True)
class CreditSettings:
    mode: str = "tree"
    leaf_value_norm: bool = True
    node_value_mode: str = "child_softmax"
    node_adv_mode: str = "node_value"

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("mode", self.mode, CREDIT_MODES),
            ("node_value_mode", self.node_value_mode, kernels.VALUE_MODES),
            ("node_adv_mode", self.node_adv_mode, kernels.ADVANTAGE_MODES),
        ):
            if value not in choices:
                raise ValueError(f"credit.{name}={value!r} is not one of {', '.join(choices)}")


@functools.partial(jax.jit, static_argnames=("settings", "samples_per_tree"))
def assign_credit(
    parent: jax.Array,
    is_leaf: jax.Array,
    valid: jax.Array,
    entropy: jax.Array,
    leaf_reward: jax.Array,
    row_reward: jax.Array,
    tree_index: jax.Array,
    token_node: jax.Array,
    *,
    settings: CreditSettings,
    samples_per_tree: int,
) -> dict[str, jax.Array]:
    """Advantages for every response token.

    Args:
      parent, is_leaf, valid, entropy, leaf_reward: [B, N] tree arrays (rewards at leaves).
      row_reward: [B·S] reward of each row (the same numbers as ``leaf_reward`` at the rows' leaves).
      tree_index: [B·S]; token_node: [B·S, R].
      settings: the credit mode and its options; samples_per_tree: S.

    Returns:
      ``advantages`` [B·S, R] (0 on padding), ``node_values`` and ``node_advantages`` [B, N] (zeros
      in ``grpo`` mode).
    """
    if settings.mode == "grpo":
        grouped = row_reward.reshape(-1, samples_per_tree)
        per_row = kernels.group_normalized_advantages(grouped).reshape(-1)
        advantages = jnp.where(token_node >= 0, per_row[:, None], 0.0)
        zeros = jnp.zeros(parent.shape, jnp.float32)
        return {"advantages": advantages, "node_values": zeros, "node_advantages": zeros}
    if settings.leaf_value_norm:
        leaf_value = kernels.normalize_leaf_rewards(leaf_reward, is_leaf, valid)
    else:
        leaf_value = jnp.where(is_leaf & valid, leaf_reward, 0.0)
    values = kernels.tree_node_values(
        parent, is_leaf, leaf_value, entropy, valid, mode=settings.node_value_mode
    )
    node_adv = kernels.tree_node_advantages(values, parent, valid, mode=settings.node_adv_mode)
    return {
        "advantages": kernels.token_advantages(node_adv, tree_index, token_node),
        "node_values": values,
        "node_advantages": node_adv,
    }
