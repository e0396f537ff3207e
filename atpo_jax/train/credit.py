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
from atpo_jax.rollout.pack import RowArrays, TreeArrays
from atpo_jax.settings import StrEnum, coerce_choices


class CreditMode(StrEnum):
    TREE = "tree"  # AT²PO: leaf z-scores backed up the tree, one advantage per node
    GRPO = "grpo"  # the outcome advantage of each leaf over its prompt's leaves


class ValueMode(StrEnum):
    """How a node's value comes from its children (``kernels.tree_node_values``)."""

    CHILD_MEAN = "child_mean"
    CHILD_SOFTMAX = "child_softmax"
    LEAF_MEAN = "leaf_mean"


class AdvantageMode(StrEnum):
    """A node's advantage from the values (``kernels.tree_node_advantages``)."""

    NODE_VALUE = "node_value"
    DIFF_PARENT = "diff_parent"
    DIFF_GLOBAL = "diff_global"
    DIFF_LOCALGLOBAL = "diff_localglobal"


CREDIT_MODES = tuple(m.value for m in CreditMode)


@dataclasses.dataclass(frozen=True)
class CreditSettings:
    """Turn-wise credit assignment (the ``credit`` section of a run's config; ALGORITHM.md §3.2).

    Attributes:
      mode: ``tree`` (AT²PO) or ``grpo`` (outcome advantages on the leaves: the paper's "no
        turn-wise credit" ablation with tree rollouts, the GRPO baseline with chains).
      leaf_value_norm: z-score the leaf rewards within each tree before backing them up.
      node_value_mode: ``child_softmax`` (children weighted by softmax of their entropy, the
        paper), ``child_mean`` or ``leaf_mean``.
      node_adv_mode: ``node_value`` (A = V, the paper), ``diff_parent``, ``diff_global`` or
        ``diff_localglobal``.
    """

    mode: CreditMode = CreditMode.TREE
    leaf_value_norm: bool = True
    node_value_mode: ValueMode = ValueMode.CHILD_SOFTMAX
    node_adv_mode: AdvantageMode = AdvantageMode.NODE_VALUE

    def __post_init__(self) -> None:
        coerce_choices(self, "credit")


def assign_credit(
    nodes: TreeArrays,
    rows: RowArrays,
    *,
    settings: CreditSettings,
    samples_per_tree: int,
) -> dict[str, jax.Array]:
    """Advantages for every response token.

    Args:
      nodes: the trees, [B, N] (``leaf_reward`` filled: ``TreeArrays.with_leaf_rewards``).
      rows: the leaf rows, [B·S, R] (only ``tree_index``, ``leaf_node`` and ``token_node`` are read).
      settings: the credit mode and its options; samples_per_tree: S.

    Returns:
      ``advantages`` [B·S, R] (0 on padding), ``node_values`` and ``node_advantages`` [B, N] (zeros
      in ``grpo`` mode).
    """
    return _assign_credit(
        nodes.parent,
        nodes.is_leaf,
        nodes.valid,
        nodes.entropy,
        nodes.leaf_reward,
        rows.tree_index,
        rows.leaf_node,
        rows.token_node,
        settings=settings,
        samples_per_tree=samples_per_tree,
    )


@functools.partial(jax.jit, static_argnames=("settings", "samples_per_tree"))
def _assign_credit(
    parent, is_leaf, valid, entropy, leaf_reward, tree_index, leaf_node, token_node, *,
    settings, samples_per_tree,
):  # fmt: skip
    if settings.mode == CreditMode.GRPO:
        row_reward = leaf_reward[tree_index, leaf_node]
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
