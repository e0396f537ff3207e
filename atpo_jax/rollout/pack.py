"""Host trees -> padded arrays, in one place (DESIGN.md §2).

:func:`pack_trees` lays the nodes of B trees out as :class:`TreeArrays` ([B, N], N rounded up to a
multiple of ``node_bucket`` so the kernels compile for a few sizes only), in creation order (what
credit assignment and traces use) or in BFS order (what expansion uses, so equal scores keep the
reference's BFS order). Both orders put a parent before its children (``parent[b, n] < n``).
:func:`pack_rows` lays out the ``samples_per_tree`` leaf rows of every tree as :class:`RowArrays`,
each the exact token sequence the model was fed and sampled (token-in/token-out: nothing is
re-tokenized from text).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import struct

from atpo_jax.rollout.tree import Tree
from atpo_jax.settings import StrEnum


class NodeOrder(StrEnum):
    CREATION = "creation"  # credit assignment, training rows and traces
    BFS = "bfs"  # expansion: equal scores keep the reference's BFS order


@struct.dataclass
class TreeArrays:
    """The nodes of B trees, [B, N] each (DESIGN.md §2).

    ``parent`` int32 (-1 for the root and padding), ``valid`` bool, ``is_leaf`` bool, ``entropy``
    float32 (the node's branching signal), ``leaf_reward`` float32 (the outcome reward at leaves,
    0 elsewhere and until :meth:`with_leaf_rewards`), ``depth`` int32 (tool results above).
    """

    parent: jax.Array
    valid: jax.Array
    is_leaf: jax.Array
    entropy: jax.Array
    leaf_reward: jax.Array
    depth: jax.Array

    @property
    def num_trees(self) -> int:
        return self.parent.shape[0]

    def with_leaf_rewards(self, rows: RowArrays, row_rewards: np.ndarray) -> TreeArrays:
        """Places one reward per row at that row's leaf node."""
        reward = np.zeros(self.parent.shape, np.float32)
        reward[np.asarray(rows.tree_index), np.asarray(rows.leaf_node)] = np.asarray(row_rewards)
        return self.replace(leaf_reward=reward)


@struct.dataclass
class RowArrays:
    """The leaf rows of B trees, S = samples per tree each (row r belongs to tree r // S).

    ``prompt_tokens``/``prompt_mask`` [B, P]: the left-padded prompt, once per tree.
    ``response_tokens`` [B·S, R] right-padded; ``loss_mask`` [B·S, R] 1 on policy-sampled tokens;
    ``token_node`` [B·S, R] the node (creation order, within the row's tree) owning each token, -1
    on padding; ``sampled_log_probs`` [B·S, R] the sampler's log-probs (0 where the mask is 0);
    ``tree_index`` [B·S] and ``leaf_node`` [B·S] the row's tree and leaf node.
    """

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    loss_mask: jax.Array
    token_node: jax.Array
    sampled_log_probs: jax.Array
    tree_index: jax.Array
    leaf_node: jax.Array

    @property
    def num_rows(self) -> int:
        return self.response_tokens.shape[0]

    def row_rewards(self, nodes: TreeArrays) -> jax.Array:
        """[B·S] the reward at each row's leaf."""
        return nodes.leaf_reward[self.tree_index, self.leaf_node]


@dataclasses.dataclass
class RowInfo:
    """Host-side facts about one leaf row."""

    tree: int
    leaf: int
    length: int  # response tokens
    tool_calls: int
    finish: str


def node_order(tree: Tree, order: str = NodeOrder.CREATION) -> list[int]:
    """The tree's live node indices in creation order (tombstones of pruned nodes dropped) or in
    BFS order (children in creation order)."""
    order = NodeOrder.parse(order, "node order")
    return tree.bfs_order() if order == NodeOrder.BFS else tree.live_nodes()


def pack_trees(
    trees: Sequence[Tree], *, order: str = NodeOrder.CREATION, node_bucket: int = 16
) -> tuple[TreeArrays, list[list[int]]]:
    """The nodes of ``trees`` as :class:`TreeArrays` (NumPy), and per tree the node index at each
    position (``orders[b][k]`` is the creation index of the node at position k)."""
    orders = [node_order(t, order) for t in trees]
    num_nodes = -(-max(len(o) for o in orders) // node_bucket) * node_bucket
    shape = (len(trees), num_nodes)
    parent = np.full(shape, -1, np.int32)
    valid = np.zeros(shape, bool)
    is_leaf = np.zeros(shape, bool)
    entropy = np.zeros(shape, np.float32)
    depth = np.zeros(shape, np.int32)
    for b, (tree, indices) in enumerate(zip(trees, orders, strict=True)):
        position = {index: k for k, index in enumerate(indices)}
        for k, index in enumerate(indices):
            node = tree.nodes[index]
            parent[b, k] = -1 if node.parent < 0 else position[node.parent]
            valid[b, k] = True
            is_leaf[b, k] = node.is_leaf
            entropy[b, k] = node.entropy
            depth[b, k] = node.depth
    arrays = TreeArrays(
        parent=parent,
        valid=valid,
        is_leaf=is_leaf,
        entropy=entropy,
        leaf_reward=np.zeros(shape, np.float32),
        depth=depth,
    )
    return arrays, orders


def pack_rows(
    trees: Sequence[Tree],
    orders: Sequence[Sequence[int]],
    *,
    samples_per_tree: int,
    max_prompt_len: int,
    max_response_len: int,
    pad_id: int,
) -> tuple[RowArrays, list[RowInfo]]:
    """The leaf rows of ``trees`` as :class:`RowArrays` (NumPy), nodes numbered by ``orders``
    (from :func:`pack_trees` in creation order). Every tree must have exactly
    ``samples_per_tree`` leaves (``tree.fix_leaf_count``); rows are grouped by tree, leaves in
    BFS order (ALGORITHM.md §2.7)."""
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
    for b, (tree, indices) in enumerate(zip(trees, orders, strict=True)):
        if len(tree.prompt) > max_prompt_len:
            raise ValueError(
                f"prompt of tree {tree.tree_id} has {len(tree.prompt)} tokens > "
                f"rollout.max_prompt_len={max_prompt_len}"
            )
        number = {index: k for k, index in enumerate(indices)}
        prompt_tokens[b, max_prompt_len - len(tree.prompt) :] = tree.prompt
        prompt_mask[b, max_prompt_len - len(tree.prompt) :] = 1
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
                token_node[r, t:end] = number[index]
                t = end
            leaf_node[r] = number[leaf]
            leaf_obj = tree.nodes[leaf]
            infos.append(RowInfo(b, number[leaf], t, leaf_obj.calls_made, leaf_obj.finish))
    arrays = RowArrays(
        prompt_tokens=prompt_tokens,
        prompt_mask=prompt_mask,
        response_tokens=response_tokens,
        loss_mask=loss_mask,
        token_node=token_node,
        sampled_log_probs=log_probs,
        tree_index=tree_index,
        leaf_node=leaf_node,
    )
    return arrays, infos


def pack_rollout(
    trees: Sequence[Tree],
    *,
    samples_per_tree: int,
    max_prompt_len: int,
    max_response_len: int,
    pad_id: int,
    node_bucket: int = 16,
) -> tuple[TreeArrays, RowArrays, list[RowInfo]]:
    """:func:`pack_trees` (creation order) and :func:`pack_rows` of finished trees."""
    nodes, orders = pack_trees(trees, node_bucket=node_bucket)
    rows, infos = pack_rows(
        trees,
        orders,
        samples_per_tree=samples_per_tree,
        max_prompt_len=max_prompt_len,
        max_response_len=max_response_len,
        pad_id=pad_id,
    )
    return nodes, rows, infos
