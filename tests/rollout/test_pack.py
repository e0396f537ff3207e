"""Packing host trees into arrays: both node orders and the leaf rows, against hand-built trees."""

from __future__ import annotations

import numpy as np
import pytest

from atpo_jax.rollout.pack import NodeOrder, pack_rollout, pack_rows, pack_trees
from atpo_jax.rollout.tree import Tree


def small_tree() -> Tree:
    """root -> 1 (tool) -> {3 (leaf), 4 (leaf)};  root -> 2 (leaf), created in index order."""
    tree = Tree(tree_id=7, prompt=[5, 6])
    one = tree.add_child(0, depth=0, entropy=0.5)
    one.append([10, 11], 1, [-0.1, -0.2])
    two = tree.add_child(0, depth=0, entropy=0.2, is_leaf=True, finish="eos")
    two.append([12], 1, [-0.3])
    three = tree.add_child(1, depth=1, entropy=0.7, is_leaf=True, finish="eos", start=2)
    three.append([90], 0)
    three.append([13], 1, [-0.4])
    four = tree.add_child(1, depth=1, entropy=0.9, is_leaf=True, finish="length", start=2)
    four.append([90], 0)
    four.append([14, 15], 1, [-0.5, -0.6])
    return tree


def test_creation_and_bfs_orders():
    tree = small_tree()
    tree.add_child(0, depth=0)  # node 5: a child of the root created last
    tree.nodes[5].is_leaf = True
    creation, orders = pack_trees([tree], node_bucket=4)
    assert orders == [[0, 1, 2, 3, 4, 5]] and creation.parent.shape == (1, 8)
    np.testing.assert_array_equal(creation.parent[0], [-1, 0, 0, 1, 1, 0, -1, -1])
    np.testing.assert_array_equal(creation.valid[0], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_allclose(creation.entropy[0, :5], [0.0, 0.5, 0.2, 0.7, 0.9])
    np.testing.assert_array_equal(creation.depth[0, :6], [0, 0, 0, 1, 1, 0])
    bfs, orders = pack_trees([tree], order=NodeOrder.BFS, node_bucket=4)
    assert orders == [[0, 1, 2, 5, 3, 4]]  # the root's children first, then node 1's
    np.testing.assert_array_equal(bfs.parent[0, :6], [-1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(bfs.is_leaf[0, :6], [0, 0, 1, 1, 1, 1])
    for arrays in (creation, bfs):  # both orders put parents first
        k = np.flatnonzero(arrays.valid[0])[1:]
        assert np.all(arrays.parent[0, k] < k)
    with pytest.raises(ValueError, match="node order"):
        pack_trees([tree], order="dfs")


def test_rows_are_the_paths_tokens_and_pruned_nodes_are_renumbered():
    tree = small_tree()
    tree.remove_leaf(2)  # a pruned leaf: a tombstone the packing drops
    nodes, rows, info = pack_rollout(
        [tree], samples_per_tree=2, max_prompt_len=3, max_response_len=6, pad_id=0, node_bucket=4
    )
    # Live nodes 0, 1, 3, 4 renumbered 0..3 in creation order.
    np.testing.assert_array_equal(nodes.parent[0], [-1, 0, 1, 1])
    np.testing.assert_array_equal(rows.prompt_tokens, [[0, 5, 6]])
    np.testing.assert_array_equal(rows.prompt_mask, [[0, 1, 1]])
    np.testing.assert_array_equal(
        rows.response_tokens, [[10, 11, 90, 13, 0, 0], [10, 11, 90, 14, 15, 0]]
    )
    np.testing.assert_array_equal(rows.loss_mask, [[1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(rows.token_node, [[1, 1, 2, 2, -1, -1], [1, 1, 3, 3, 3, -1]])
    np.testing.assert_allclose(rows.sampled_log_probs[1], [-0.1, -0.2, 0.0, -0.5, -0.6, 0.0])
    np.testing.assert_array_equal(rows.leaf_node, [2, 3])
    assert [(r.length, r.finish) for r in info] == [(4, "eos"), (5, "length")]
    # Rewards land on each row's leaf and come back per row.
    nodes = nodes.with_leaf_rewards(rows, np.array([1.0, -1.0], np.float32))
    np.testing.assert_array_equal(nodes.leaf_reward[0], [0.0, 0.0, 1.0, -1.0])
    np.testing.assert_array_equal(np.asarray(rows.row_rewards(nodes)), [1.0, -1.0])


def test_bad_trees_are_refused_with_the_setting_named():
    tree = small_tree()
    _, orders = pack_trees([tree])
    with pytest.raises(ValueError, match="expected samples_per_tree=2"):
        pack_rows(
            [tree], orders, samples_per_tree=2, max_prompt_len=3, max_response_len=9, pad_id=0
        )
    with pytest.raises(ValueError, match="rollout.max_response_len=4"):
        pack_rows(
            [tree], orders, samples_per_tree=3, max_prompt_len=3, max_response_len=4, pad_id=0
        )
    with pytest.raises(ValueError, match="rollout.max_prompt_len=1"):
        pack_rows(
            [tree], orders, samples_per_tree=3, max_prompt_len=1, max_response_len=9, pad_id=0
        )
