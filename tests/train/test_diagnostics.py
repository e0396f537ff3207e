"""The ``tree/*`` diagnostics on hand-built trees: leaves that disagree, entropy by depth, and how
often expansion picked the decisive turn."""

from __future__ import annotations

import numpy as np
import pytest

from atpo_jax.rollout.tree import Tree
from atpo_jax.train.diagnostics import diagnostic_counts, diagnostic_metrics


def _tree(tree_id: int) -> Tree:
    """root -> a (depth 0) -> b (depth 1, leaf); root -> c (depth 0, leaf); a -> d (depth 1, leaf)."""
    tree = Tree(tree_id=tree_id, prompt=[1, 2])
    a = tree.add_child(0, depth=0)
    a.append([5, 6], 1, entropies=[1.0, 3.0])
    b = tree.add_child(a.index, depth=1, obs_len=2)
    b.append([7, 8], 0)  # the observation: not sampled, its entropies (0) do not count
    b.append([9], 1, entropies=[0.5])
    b.is_leaf = True
    c = tree.add_child(0, depth=0)
    c.append([5], 1, entropies=[2.0])
    c.is_leaf = True
    d = tree.add_child(a.index, depth=1, obs_len=1)
    d.append([7], 0)
    d.append([4, 4], 1, entropies=[1.5, 2.5])
    d.is_leaf = True
    return tree


def test_counts_and_metrics_on_hand_built_trees():
    first, second, third = _tree(0), _tree(1), _tree(2)
    first.picks = [[1], [0]]  # node a (depth 0) then the root (re-samples the first turn)
    second.picks = [[3]]  # node c (depth 0)
    third.picks = [[1, 2]]  # no decisive hop recorded: not counted
    scores = np.array([1, 0, 0, 1, 1, 1, 0, 0, 0], np.float32)  # disagree, agree, agree
    counts = diagnostic_counts([first, second, third], scores, 3, [0, 1, None])
    metrics = diagnostic_metrics([counts])
    assert metrics["tree/leaves_disagree"] == pytest.approx(1 / 3)
    # Depth 0: a's 1, 3 and c's 2 in every tree; depth 1: b's 0.5 and d's 1.5, 2.5.
    assert metrics["tree/entropy_depth_0"] == pytest.approx(2.0)
    assert metrics["tree/entropy_depth_1"] == pytest.approx(1.5)
    # Tree 0 (decisive hop 0): a and the root hit; tree 1 (hop 1): c misses.
    assert metrics["tree/decisive_picks"] == 3
    assert metrics["tree/decisive_pick_rate"] == pytest.approx(2 / 3)


def test_removed_nodes_do_not_count_and_processes_sum():
    tree = _tree(0)
    tree.remove_leaf(4)  # d
    counts = diagnostic_counts([tree], np.array([1.0, 1.0]), 2, [None])
    metrics = diagnostic_metrics([counts])
    assert metrics["tree/leaves_disagree"] == 0.0
    assert metrics["tree/entropy_depth_1"] == pytest.approx(0.5)
    assert "tree/decisive_pick_rate" not in metrics  # no decisive hop: no picks to score
    other = diagnostic_counts([_tree(1)], np.array([0.0, 1.0, 1.0]), 3, [None])
    merged = diagnostic_metrics([counts, other])
    assert merged["tree/leaves_disagree"] == pytest.approx(1 / 2)
    assert merged["tree/entropy_depth_1"] == pytest.approx((0.5 + 0.5 + 1.5 + 2.5) / 4)
