"""Tree kernels against recursive NumPy implementations and golden behaviours §9.8, §9.10, §9.11."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from atpo_jax import kernels
from tests.kernels import numpy_reference as ref
from tests.kernels.strategies import padded_trees


def chain_tree():
    """root(0) -> a(1) -> b(2, leaf), padded to 4 slots."""
    parent = np.array([[-1, 0, 1, -1]])
    is_leaf = np.array([[False, False, True, False]])
    valid = np.array([[True, True, True, False]])
    return parent, is_leaf, valid


def reference_example():
    """The default tree shape in miniature: root with 3 first turns, one with a deeper chain.

    0 root
    ├─ 1 (tool call) ─ 4 (tool call) ─ 6 (leaf)
    │                └ 7 (leaf, a branch re-sampled from 4's observation)
    ├─ 2 (leaf)
    └─ 3 (tool call) ─ 5 (leaf)
    """
    parent = np.array([[-1, 0, 0, 0, 1, 3, 4, 4]])
    is_leaf = np.array([[0, 0, 1, 0, 0, 1, 1, 1]], bool)
    valid = np.ones((1, 8), bool)
    return parent, is_leaf, valid


# ---------------------------------------------------------------- random trees vs NumPy recursion


@given(tree=padded_trees(), penalty=st.sampled_from([0.0, 0.05, 0.3]))
def test_expansion_scores_match_numpy(call, tree, penalty):
    parent, is_leaf, valid, entropy, _ = tree
    got = call(kernels.expansion_scores, parent, is_leaf, entropy, valid, penalty=penalty)
    want = ref.expansion_scores(parent, is_leaf, entropy, valid, penalty)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@given(tree=padded_trees(), k=st.sampled_from([1, 6, 40]), penalty=st.sampled_from([0.0625, 0.25]))
def test_selection_matches_reference_procedure(call, tree, k, penalty):
    # Dyadic entropies and penalties make every score exact, so ties are real ties everywhere.
    parent, is_leaf, valid, entropy, _ = tree
    got = call(
        kernels.select_expansion_nodes, parent, is_leaf, entropy, valid, k=k, penalty=penalty
    )
    assert got.shape == (parent.shape[0], k) and got.dtype == jnp.int32
    np.testing.assert_array_equal(
        got, ref.select_expansion_nodes(parent, is_leaf, entropy, valid, k, penalty)
    )


@given(tree=padded_trees())
def test_leaf_normalisation_matches_numpy(call, tree):
    parent, is_leaf, valid, _, reward = tree
    got = call(kernels.normalize_leaf_rewards, reward, is_leaf, valid)
    np.testing.assert_allclose(got, ref.normalize_leaf_rewards(reward, is_leaf, valid), atol=1e-5)


@given(tree=padded_trees(), mode=st.sampled_from(kernels.VALUE_MODES))
def test_node_values_match_numpy_recursion(call, tree, mode):
    parent, is_leaf, valid, entropy, reward = tree
    leaf_value = ref.normalize_leaf_rewards(reward, is_leaf, valid)
    got = call(kernels.tree_node_values, parent, is_leaf, leaf_value, entropy, valid, mode=mode)
    want = ref.tree_node_values(parent, is_leaf, leaf_value, entropy, valid, mode)
    np.testing.assert_allclose(got, want, atol=1e-5)


@given(tree=padded_trees(), mode=st.sampled_from(kernels.ADVANTAGE_MODES))
def test_node_advantages_match_numpy(call, tree, mode):
    parent, is_leaf, valid, entropy, reward = tree
    values = ref.tree_node_values(parent, is_leaf, reward, entropy, valid, "child_softmax")
    got = call(kernels.tree_node_advantages, values, parent, valid, mode=mode)
    np.testing.assert_allclose(
        got, ref.tree_node_advantages(values, parent, valid, mode), atol=1e-5
    )


@given(tree=padded_trees(), seed=st.integers(0, 2**31 - 1))
def test_token_advantages_match_numpy(call, tree, seed):
    parent, is_leaf, valid, entropy, reward = tree
    rng = np.random.default_rng(seed)
    num_trees, num_nodes = parent.shape
    tree_index = np.repeat(np.arange(num_trees), 4)
    token_node = rng.integers(-1, num_nodes, (tree_index.size, 30))
    got = call(kernels.token_advantages, reward, tree_index, token_node)
    np.testing.assert_allclose(got, ref.token_advantages(reward, tree_index, token_node))


# ---------------------------------------------------------------- golden behaviours


def test_golden_8_selection_scores_ties_and_repeats(call):
    parent, is_leaf, valid = reference_example()
    # Candidates: 0 (root), 1, 3, 4. Sibling counts: root has 3 children -> penalty 2·0.05 for the
    # root, 1 and 3; node 4's parent (1) has one child -> no penalty.
    entropy = np.array([[0.0, 0.5, 0.9, 0.5, 0.3, 0.1, 0.7, 0.2]])
    scores = call(kernels.expansion_scores, parent, is_leaf, entropy, valid)
    np.testing.assert_allclose(
        scores, [[-0.1, 0.4, -np.inf, 0.4, 0.3, -np.inf, -np.inf, -np.inf]], rtol=1e-6
    )
    # Nodes 1 and 3 tie at 0.4: the lower index (BFS order here) comes first; fewer candidates (4)
    # than picks (6) -> the ranked list repeats from the top.
    picks = call(kernels.select_expansion_nodes, parent, is_leaf, entropy, valid, k=6)
    np.testing.assert_array_equal(picks, [[1, 3, 4, 0, 1, 3]])
    picks = call(kernels.select_expansion_nodes, parent, is_leaf, entropy, valid, k=2)
    np.testing.assert_array_equal(picks, [[1, 3]])


def test_golden_8_root_only_tree_and_tree_without_candidates(call):
    # A tree where no chain used the tool: root + 3 leaves. Only the root is a candidate, so every
    # pick is the root (a fresh chain from the prompt).
    parent = np.array([[-1, 0, 0, 0], [-1, -1, -1, -1]])
    is_leaf = np.array([[0, 1, 1, 1], [0, 0, 0, 0]], bool)
    valid = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)  # second tree: all padding
    entropy = np.zeros((2, 4))
    picks = call(kernels.select_expansion_nodes, parent, is_leaf, entropy, valid, k=3)
    np.testing.assert_array_equal(picks, [[0, 0, 0], [0, 0, 0]])


def test_golden_10_equal_rewards_give_zero_advantages_in_every_mode(call):
    parent, is_leaf, valid = reference_example()
    entropy = np.array([[0.0, 0.5, 0.9, 0.5, 0.3, 0.1, 0.7, 0.2]])
    reward = np.where(is_leaf, 1.0, 0.0)
    z = call(kernels.normalize_leaf_rewards, reward, is_leaf, valid)
    np.testing.assert_array_equal(z, 0.0)
    for value_mode in kernels.VALUE_MODES:
        values = call(kernels.tree_node_values, parent, is_leaf, z, entropy, valid, mode=value_mode)
        for adv_mode in kernels.ADVANTAGE_MODES:
            adv = call(kernels.tree_node_advantages, values, parent, valid, mode=adv_mode)
            np.testing.assert_array_equal(adv, 0.0)


def test_golden_10_population_std_hand_case(call):
    parent, is_leaf, valid = reference_example()
    reward = np.array([[9.0, 9.0, 1.0, 9.0, 9.0, 0.0, -1.0, 0.0]])  # leaves 2, 5, 6, 7
    z = np.asarray(call(kernels.normalize_leaf_rewards, reward, is_leaf, valid))
    leaves = np.array([1.0, 0.0, -1.0, 0.0])
    want = (leaves - 0.0) / (np.sqrt(0.5) + 1e-6)  # population variance (1+0+1+0)/4
    np.testing.assert_allclose(z[0, [2, 5, 6, 7]], want, rtol=1e-6)
    np.testing.assert_array_equal(z[0, [0, 1, 3, 4]], 0.0)


def test_golden_11_chain_child_mean_and_equal_entropy_softmax(call):
    parent, is_leaf, valid = chain_tree()
    leaf_value = np.array([[0.0, 0.0, 1.7, 0.0]])
    entropy = np.array([[0.0, 0.4, 0.9, 0.0]])
    values = call(
        kernels.tree_node_values, parent, is_leaf, leaf_value, entropy, valid, mode="child_mean"
    )
    np.testing.assert_allclose(values, [[1.7, 1.7, 1.7, 0.0]])
    # child_softmax with equal child entropies equals child_mean.
    parent, is_leaf, valid = reference_example()
    leaf_value = np.array([[0.0, 0.0, 1.0, 0.0, 0.0, -2.0, 3.0, 0.5]])
    flat_entropy = np.full((1, 8), 0.6)
    mean = call(
        kernels.tree_node_values,
        parent,
        is_leaf,
        leaf_value,
        flat_entropy,
        valid,
        mode="child_mean",
    )
    soft = call(
        kernels.tree_node_values,
        parent,
        is_leaf,
        leaf_value,
        flat_entropy,
        valid,
        mode="child_softmax",
    )
    np.testing.assert_allclose(soft, mean, rtol=1e-6)
    # Hand values: V4 = (3 + 0.5)/2, V1 = V4, V3 = -2, V0 = (V1 + 1 + V3)/3.
    np.testing.assert_allclose(mean[0, [4, 1, 3, 0]], [1.75, 1.75, -2.0, 0.75 / 3], rtol=1e-6)


def test_child_softmax_and_leaf_mean_hand_values(call):
    parent, is_leaf, valid = reference_example()
    leaf_value = np.array([[0.0, 0.0, 1.0, 0.0, 0.0, -2.0, 3.0, 0.5]])
    entropy = np.array([[0.0, 0.2, 0.9, 0.4, 0.3, 0.1, 1.0, 0.0]])
    soft = np.asarray(
        call(
            kernels.tree_node_values,
            parent,
            is_leaf,
            leaf_value,
            entropy,
            valid,
            mode="child_softmax",
        )
    )
    w6, w7 = np.exp(1.0), np.exp(0.0)
    v4 = (w6 * 3.0 + w7 * 0.5) / (w6 + w7)
    w = np.exp([0.2, 0.9, 0.4])
    v0 = (w[0] * v4 + w[1] * 1.0 + w[2] * -2.0) / w.sum()
    np.testing.assert_allclose(soft[0, [4, 1, 3, 0]], [v4, v4, -2.0, v0], rtol=1e-6)
    leaf_mean = np.asarray(
        call(
            kernels.tree_node_values, parent, is_leaf, leaf_value, entropy, valid, mode="leaf_mean"
        )
    )
    # Root: mean of all four leaves, not the mean of its children's means.
    np.testing.assert_allclose(leaf_mean[0, [0, 1, 3, 4]], [2.5 / 4, 1.75, -2.0, 1.75], rtol=1e-6)


def test_golden_12_token_layout_carries_node_advantages(call):
    # Path root -> n1 -> n2 -> leaf n3 with spans [0,3), [3,7), [7,9); n2's span starts with 2 tool
    # result tokens (mask 0) that still carry A(n2).
    advantages = np.array([[0.0, 0.5, -1.0, 2.0]])
    token_node = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, -1, -1]])
    got = call(kernels.token_advantages, advantages, np.array([0]), token_node)
    np.testing.assert_allclose(got, [[0.5, 0.5, 0.5, -1, -1, -1, -1, 2, 2, 0, 0]])


def test_advantage_modes_hand_values(call):
    parent, _, valid = reference_example()
    values = np.array([[1.0, 2.0, -1.0, 0.5, 4.0, 3.0, 7.0, -2.0]])
    expect = {
        "node_value": values[0],
        "diff_parent": [1.0, 1.0, -2.0, -0.5, 2.0, 2.5, 3.0, -6.0],
        "diff_global": [1.0, 1.0, -2.0, -0.5, 3.0, 2.0, 6.0, -3.0],
        "diff_localglobal": [1.0, 2.0, -4.0, -1.0, 5.0, 4.5, 9.0, -9.0],
    }
    for mode, want in expect.items():
        got = call(kernels.tree_node_advantages, values, parent, valid, mode=mode)
        np.testing.assert_allclose(got[0], want, err_msg=mode)


# ---------------------------------------------------------------- edge cases and errors


def test_one_leaf_tree_padding_and_childless_inner_nodes_are_finite(call):
    parent = np.array([[-1, 0, -1, -1], [-1, 0, 0, -1]])
    is_leaf = np.array([[0, 1, 0, 0], [0, 0, 1, 0]], bool)  # tree 2: node 1 is a childless non-leaf
    valid = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)
    reward = np.array([[5.0, 1.0, 7.0, 7.0], [0.0, 0.0, 1.0, 0.0]])
    entropy = np.zeros((2, 4))
    z = np.asarray(call(kernels.normalize_leaf_rewards, reward, is_leaf, valid))
    np.testing.assert_array_equal(z, 0.0)  # one leaf per tree -> z = 0
    for mode in kernels.VALUE_MODES:
        v = np.asarray(
            call(kernels.tree_node_values, parent, is_leaf, reward, entropy, valid, mode=mode)
        )
        assert np.all(np.isfinite(v))
        np.testing.assert_array_equal(v[:, 2:][~valid[:, 2:]], 0.0)  # padding
        assert v[1, 1] == 0.0  # non-leaf without children
        np.testing.assert_allclose(v[0, :2], [1.0, 1.0])


def test_value_backup_handles_depth_equal_to_padded_size(call):
    # A single chain that uses every slot: depth N-1, no hard-coded cap.
    n = 96
    parent = np.arange(-1, n - 1)[None]
    is_leaf = (np.arange(n) == n - 1)[None]
    valid = np.ones((1, n), bool)
    leaf_value = np.where(is_leaf, 2.5, 0.0)
    for mode in kernels.VALUE_MODES:
        v = call(
            kernels.tree_node_values,
            parent,
            is_leaf,
            leaf_value,
            np.zeros((1, n)),
            valid,
            mode=mode,
        )
        np.testing.assert_allclose(v, 2.5, rtol=1e-6)


def test_tree_shape_errors_at_trace_time():
    parent, is_leaf, valid = reference_example()
    entropy = np.zeros((1, 8))
    with pytest.raises(AssertionError):
        jax.jit(kernels.expansion_scores)(parent, is_leaf, entropy[:, :5], valid)
    with pytest.raises(AssertionError, match="rank"):
        kernels.tree_node_values(parent[0], is_leaf[0], entropy[0], entropy[0], valid[0])
    with pytest.raises(AssertionError):
        kernels.token_advantages(entropy, np.zeros(3, np.int32), np.zeros((2, 5), np.int32))


def test_bad_modes_name_the_setting():
    parent, is_leaf, valid = reference_example()
    z = np.zeros((1, 8))
    with pytest.raises(ValueError, match="mode='softmax'"):
        kernels.tree_node_values(parent, is_leaf, z, z, valid, mode="softmax")
    with pytest.raises(ValueError, match="mode='diff'"):
        kernels.tree_node_advantages(z, parent, valid, mode="diff")
    with pytest.raises(ValueError, match="beam_size"):
        kernels.select_expansion_nodes(parent, is_leaf, z, valid, k=0)
