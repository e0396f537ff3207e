"""Padded arrays of a rollout: tree tensors and leaf rows (DESIGN.md §2).

``build_rollout_batch`` turns host trees into a :class:`RolloutBatch`: B trees padded to N node slots
(N rounded up to a multiple of ``node_bucket`` so the credit kernels compile for a few sizes only)
and ``samples_per_tree`` leaf rows per tree, each the exact token sequence the model was fed and
sampled (token-in/token-out: nothing is re-tokenized from text).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct

from atpo_jax.rollout.tree import Tree


@struct.dataclass
class RolloutBatch:
    """Arrays of one rollout (B trees, S = samples per tree rows each, row r belongs to tree r // S).

    Tree arrays, [B, N]: ``parent`` int32 (-1 root/padding), ``valid`` bool, ``is_leaf`` bool,
    ``entropy`` float32 (node branching signal), ``leaf_reward`` float32 (filled by the trainer from the
    rewards; 0 until then), ``depth`` int32.

    Row arrays: ``prompt_tokens``/``prompt_mask`` [B, P] left-padded prompt per tree;
    ``response_tokens`` [B·S, R] right-padded; ``loss_mask`` [B·S, R] 1 on policy-sampled tokens;
    ``token_node`` [B·S, R] node (within the row's tree) owning each token, -1 on padding;
    ``sampled_log_probs`` [B·S, R] sampler log-probs (0 where the mask is 0); ``tree_index`` [B·S]
    and ``leaf_node`` [B·S] the row's tree and leaf node.
    """

    parent: jax.Array
    valid: jax.Array
    is_leaf: jax.Array
    entropy: jax.Array
    leaf_reward: jax.Array
    depth: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    loss_mask: jax.Array
    token_node: jax.Array
    sampled_log_probs: jax.Array
    tree_index: jax.Array
    leaf_node: jax.Array

    @property
    def num_trees(self) -> int:
        return self.parent.shape[0]

    @property
    def num_rows(self) -> int:
        return self.response_tokens.shape[0]

    def with_leaf_rewards(self, row_rewards: np.ndarray) -> RolloutBatch:
        """Places one reward per row at that row's leaf node."""
        reward = np.zeros(self.parent.shape, np.float32)
        reward[np.asarray(self.tree_index), np.asarray(self.leaf_node)] = np.asarray(row_rewards)
        return self.replace(leaf_reward=reward)


@dataclasses.dataclass
class RowInfo:
    """Host-side facts about one leaf row."""

    tree: int
    leaf: int
    length: int  # response tokens
    tool_calls: int
    finish: str


def _renumber(tree: Tree) -> dict[int, int]:
    """Creation-order index of every live node after pruning (tombstones dropped)."""
    return {old: new for new, old in enumerate(tree.live_nodes())}


def build_rollout_batch(
    trees: list[Tree],
    *,
    samples_per_tree: int,
    max_prompt_len: int,
    max_response_len: int,
    pad_id: int,
    node_bucket: int = 16,
) -> tuple[RolloutBatch, list[RowInfo]]:
    """Pads trees and their leaf rows into a :class:`RolloutBatch` (NumPy arrays).

    Every tree must have exactly ``samples_per_tree`` leaves (see ``tree.fix_leaf_count``). Rows are
    grouped by tree, leaves in BFS order (ALGORITHM.md §2.7).
    """
    numbering = [_renumber(t) for t in trees]
    max_nodes = max(len(m) for m in numbering)
    num_nodes = -(-max_nodes // node_bucket) * node_bucket
    shape = (len(trees), num_nodes)
    parent = np.full(shape, -1, np.int32)
    valid = np.zeros(shape, bool)
    is_leaf = np.zeros(shape, bool)
    entropy = np.zeros(shape, np.float32)
    depth = np.zeros(shape, np.int32)
    rows = len(trees) * samples_per_tree
    prompt_tokens = np.full((len(trees), max_prompt_len), pad_id, np.int32)
    prompt_mask = np.zeros((len(trees), max_prompt_len), np.int32)
    response_tokens = np.full((rows, max_response_len), pad_id, np.int32)
    loss_mask = np.zeros((rows, max_response_len), np.int32)
    token_node = np.full((rows, max_response_len), -1, np.int32)
    log_probs = np.zeros((rows, max_response_len), np.float32)
    tree_index = np.repeat(np.arange(len(trees), dtype=np.int32), samples_per_tree)
    leaf_node = np.zeros((rows,), np.int32)
    infos: list[RowInfo] = []
    for b, (tree, new_index) in enumerate(zip(trees, numbering, strict=True)):
        if len(tree.prompt) > max_prompt_len:
            raise ValueError(
                f"prompt of tree {tree.tree_id} has {len(tree.prompt)} tokens > "
                f"rollout.max_prompt_len={max_prompt_len}"
            )
        prompt_tokens[b, max_prompt_len - len(tree.prompt) :] = tree.prompt
        prompt_mask[b, max_prompt_len - len(tree.prompt) :] = 1
        for old, new in new_index.items():
            node = tree.nodes[old]
            parent[b, new] = -1 if node.parent < 0 else new_index[node.parent]
            valid[b, new] = True
            is_leaf[b, new] = node.is_leaf
            entropy[b, new] = node.entropy
            depth[b, new] = node.depth
        leaves = tree.leaves()
        if len(leaves) != samples_per_tree:
            raise ValueError(
                f"tree {tree.tree_id} has {len(leaves)} leaves, expected samples_per_tree="
                f"{samples_per_tree} (call fix_leaf_count first)"
            )
        for k, leaf in enumerate(leaves):
            r = b * samples_per_tree + k
            t = 0
            for index in tree.path(leaf):
                node = tree.nodes[index]
                end = t + len(node.tokens)
                if end > max_response_len:
                    raise ValueError(
                        f"row of tree {tree.tree_id} leaf {leaf} has {end} response tokens > "
                        f"rollout.max_response_len={max_response_len}"
                    )
                response_tokens[r, t:end] = node.tokens
                loss_mask[r, t:end] = node.loss_mask
                log_probs[r, t:end] = node.log_probs
                token_node[r, t:end] = new_index[index]
                t = end
            leaf_node[r] = new_index[leaf]
            leaf_obj = tree.nodes[leaf]
            infos.append(RowInfo(b, new_index[leaf], t, leaf_obj.calls_made, leaf_obj.finish))
    batch = RolloutBatch(
        parent=parent,
        valid=valid,
        is_leaf=is_leaf,
        entropy=entropy,
        leaf_reward=np.zeros(shape, np.float32),
        depth=depth,
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        response_tokens=response_tokens,
        loss_mask=loss_mask,
        token_node=token_node,
        sampled_log_probs=log_probs,
        tree_index=tree_index,
        leaf_node=leaf_node,
    )
    return batch, infos
