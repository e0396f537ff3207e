"""Tree kernels: entropy-guided expansion, leaf normalisation, value backup and turn-level credit.

Trees are padded tensors (DESIGN.md §2): for B trees of N node slots,

* ``parent``  [B, N] int32, parent index, -1 for the root (index 0) and for padding;
* ``is_leaf`` [B, N] bool;  ``valid`` [B, N] bool (real node);
* ``entropy`` [B, N] float, the node's branching signal (mean NLL or exact mean entropy of its turn);
* ``leaf_reward`` / ``leaf_value`` [B, N] float, meaningful at leaves.

Invariant: nodes are stored so that ``parent[b, n] < n`` for every valid non-root node (creation
order and BFS order both satisfy it). Every kernel is a fixed-shape computation over these arrays (no
host loop over trees or nodes); the value backup is one batched unit-triangular solve.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from atpo_jax.kernels._common import as_float, check_choice, masked_mean, safe_divide

VALUE_MODES = ("child_mean", "child_softmax", "leaf_mean")
ADVANTAGE_MODES = ("node_value", "diff_parent", "diff_global", "diff_localglobal")


def _check_tree(*arrays: chex.Array) -> None:
    chex.assert_rank(list(arrays), 2)
    chex.assert_equal_shape(list(arrays))


def _child_matrix(parent: chex.Array, valid: chex.Array) -> chex.Array:
    """[B, N, N] bool: ``C[b, p, c]`` is True when valid node c is a child of node p."""
    num_nodes = parent.shape[-1]
    is_child = parent[:, None, :] == jnp.arange(num_nodes, dtype=parent.dtype)[None, :, None]
    return is_child & valid[:, None, :] & (parent[:, None, :] >= 0)


def _parent_values(values: chex.Array, parent: chex.Array) -> chex.Array:
    """values[b, parent[b, n]] ([B, N]); the root and padding read their own slot 0 (callers mask)."""
    return jnp.take_along_axis(values, jnp.maximum(parent, 0), axis=-1)


def expansion_scores(
    parent: chex.Array,
    is_leaf: chex.Array,
    entropy: chex.Array,
    valid: chex.Array,
    *,
    penalty: float = 0.05,
) -> chex.Array:
    """Entropy-guided expansion score of every node (AT²PO §3.2; ALGORITHM.md §2.4).

    Candidates are the valid non-leaf nodes, the root included. For a candidate n with parent p,

        score(n) = entropy(n) − penalty · max(0, c(p) − 1),

    where c(p) is the number of valid children of p (its sibling count plus one); for the root, c is
    the number of the root's own children.

    Args:
      parent: [B, N] int parent index (-1 for the root and padding).
      is_leaf: [B, N] bool.
      entropy: [B, N] float node entropy.
      valid: [B, N] bool.
      penalty: the additive sibling penalty α (reference: 0.05).

    Returns:
      [B, N] float32 scores, ``-inf`` for nodes that are not candidates.
    """
    _check_tree(parent, is_leaf, entropy, valid)
    parent = jnp.asarray(parent)
    valid = jnp.asarray(valid, bool)
    is_leaf = jnp.asarray(is_leaf, bool)
    children = jnp.sum(_child_matrix(parent, valid), axis=-1)  # [B, N] children per node
    is_root = jnp.arange(parent.shape[-1]) == 0
    family = jnp.where(is_root, children, _parent_values(children, parent))
    siblings = jnp.maximum(family - 1, 0).astype(jnp.float32)
    scores = as_float(entropy) - penalty * siblings
    candidate = valid & ~is_leaf
    return jnp.where(candidate, scores, -jnp.inf)


def select_expansion_nodes(
    parent: chex.Array,
    is_leaf: chex.Array,
    entropy: chex.Array,
    valid: chex.Array,
    *,
    k: int,
    penalty: float = 0.05,
) -> chex.Array:
    """Picks the ``k`` nodes of each tree to branch from (ALGORITHM.md §2.4, golden behaviour §9.8).

    Candidates are ranked by :func:`expansion_scores` (descending; equal scores keep the lower node
    index first, as a stable sort does). With m ≥ 1 candidates, pick j is ``ranked[j mod m]``: the top k
    when m ≥ k, otherwise the ranked list repeated from the top. A tree without candidates returns the
    root (index 0) k times.

    Args: as :func:`expansion_scores`, plus ``k``: static int number of picks per tree (beam size).

    Returns:
      int32 [B, k] node indices.
    """
    if int(k) < 1:
        raise ValueError(f"select_expansion_nodes: k (beam_size) must be >= 1, got {k}")
    scores = expansion_scores(parent, is_leaf, entropy, valid, penalty=penalty)
    ranked = jnp.argsort(-scores, axis=-1, stable=True).astype(jnp.int32)
    num_candidates = jnp.sum(jnp.isfinite(scores), axis=-1, keepdims=True)
    picks = jnp.arange(int(k), dtype=jnp.int32)[None, :] % jnp.maximum(num_candidates, 1)
    chosen = jnp.take_along_axis(ranked, picks, axis=-1)
    return jnp.where(num_candidates > 0, chosen, 0).astype(jnp.int32)


def normalize_leaf_rewards(
    leaf_reward: chex.Array, is_leaf: chex.Array, valid: chex.Array, *, eps: float = 1e-6
) -> chex.Array:
    """Per-tree z-score of the leaf rewards (ALGORITHM.md §3.2 step 1; golden behaviour §9.10).

        z(n) = (r(n) − μ_b) / (σ_b + eps)   at the valid leaves n of tree b, 0 elsewhere,

    with μ_b and σ_b the mean and the population (ddof = 0) standard deviation over the tree's leaves.
    A tree with one leaf or with equal leaf rewards gives all zeros.

    Args:
      leaf_reward: [B, N] float (read only at leaves).
      is_leaf, valid: [B, N] bool.
      eps: added to σ.

    Returns:
      [B, N] float32.
    """
    _check_tree(leaf_reward, is_leaf, valid)
    reward = as_float(leaf_reward)
    leaf = (jnp.asarray(is_leaf, bool) & jnp.asarray(valid, bool)).astype(reward.dtype)
    reward = jnp.where(leaf != 0, reward, 0)
    mean = masked_mean(reward, leaf, axis=-1)[:, None]
    centred = jnp.where(leaf != 0, reward - mean, 0)
    std = jnp.sqrt(masked_mean(jnp.square(centred), leaf, axis=-1))[:, None]
    return centred / (std + eps)


def _child_weights(
    children: chex.Array, is_leaf: chex.Array, entropy: chex.Array, mode: str
) -> chex.Array:
    """[B, N, N] weights W[b, p, c] of child c in the value of non-leaf node p (rows sum to 1 or 0)."""
    weight_children = children & ~is_leaf[:, :, None]
    if mode == "child_mean":
        weights = weight_children.astype(jnp.float32)
        return safe_divide(weights, jnp.sum(weights, axis=-1, keepdims=True))
    if mode == "child_softmax":
        logits = jnp.where(weight_children, as_float(entropy)[:, None, :], -jnp.inf)
        peak = jnp.max(logits, axis=-1, keepdims=True)
        peak = jnp.where(jnp.isfinite(peak), peak, 0)  # rows without children stay all-zero
        unnormalised = jnp.where(weight_children, jnp.exp(logits - peak), 0)
        return safe_divide(unnormalised, jnp.sum(unnormalised, axis=-1, keepdims=True))
    # leaf_mean: weight each child by its number of subtree leaves, which makes V(p) the mean of all
    # leaf values under p.
    descendant = _descendant_matrix(children)  # [B, N, N] node n is m or an ancestor of m
    leaves_below = jnp.sum(descendant * is_leaf[:, None, :], axis=-1)  # [B, N]
    weights = jnp.where(weight_children, leaves_below[:, None, :], 0.0)
    return safe_divide(weights, jnp.sum(weights, axis=-1, keepdims=True))


def _descendant_matrix(children: chex.Array) -> chex.Array:
    """[B, N, N] float: D[b, n, m] = 1 if m is n or a descendant of n, i.e. (I − C)^{-1}.

    C (child adjacency) is strictly upper triangular because parent < child, so I − C is unit upper
    triangular and the inverse is one triangular solve.
    """
    num_nodes = children.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(num_nodes, dtype=jnp.float32), children.shape)
    return jax.scipy.linalg.solve_triangular(eye - children.astype(jnp.float32), eye, lower=False)


def tree_node_values(
    parent: chex.Array,
    is_leaf: chex.Array,
    leaf_value: chex.Array,
    entropy: chex.Array,
    valid: chex.Array,
    *,
    mode: str = "child_softmax",
) -> chex.Array:
    """Backs leaf values up the tree (turn-wise credit assignment, ALGORITHM.md §3.2 step 2).

    Leaves keep ``leaf_value``; a valid non-leaf node p gets V(p) = Σ_c W(p, c) V(c) over its valid
    children c, with

    * ``child_mean``:    W(p, c) = 1 / #children(p);
    * ``child_softmax``: W(p, c) = softmax_c(entropy(c)) over p's children (no temperature: children
      whose turns the policy was less sure about weigh more);
    * ``leaf_mean``:     V(p) = mean of the leaf values in p's subtree.

    A non-leaf without valid children gets 0; padding gets 0. The recursion V = W V + v_leaf is solved
    exactly as (I − W) V = v_leaf, a unit upper-triangular system (parent < child), for any depth.

    Args:
      parent: [B, N] int; is_leaf, valid: [B, N] bool; leaf_value: [B, N] float (e.g. the output of
      :func:`normalize_leaf_rewards`); entropy: [B, N] float (used by ``child_softmax``).
      mode: one of ``child_mean``, ``child_softmax``, ``leaf_mean``.

    Returns:
      [B, N] float32 node values.
    """
    _check_tree(parent, is_leaf, leaf_value, entropy, valid)
    check_choice("mode", mode, VALUE_MODES)
    parent = jnp.asarray(parent)
    valid = jnp.asarray(valid, bool)
    is_leaf = jnp.asarray(is_leaf, bool) & valid
    children = _child_matrix(parent, valid)
    weights = _child_weights(children, is_leaf, entropy, mode)
    leaf_values = jnp.where(is_leaf, as_float(leaf_value), 0)
    num_nodes = parent.shape[-1]
    system = jnp.eye(num_nodes, dtype=weights.dtype)[None] - weights
    values = jax.scipy.linalg.solve_triangular(system, leaf_values[..., None], lower=False)[..., 0]
    return jnp.where(valid, values, 0)


def tree_node_advantages(
    values: chex.Array, parent: chex.Array, valid: chex.Array, *, mode: str = "node_value"
) -> chex.Array:
    """Turn-level advantages from node values (ALGORITHM.md §3.2 step 3).

    * ``node_value``:       A(n) = V(n)                                       (paper default)
    * ``diff_parent``:      A(n) = V(n) − V(parent(n))
    * ``diff_global``:      A(n) = V(n) − V(root)
    * ``diff_localglobal``: A(n) = (V(n) − V(root)) + (V(n) − V(parent(n)))   (a sum, as the reference)

    The root's advantage is its value; padding gets 0.

    Args:
      values: [B, N] float node values; parent: [B, N] int; valid: [B, N] bool.
      mode: one of the four above.

    Returns:
      [B, N] float32.
    """
    _check_tree(values, parent, valid)
    check_choice("mode", mode, ADVANTAGE_MODES)
    values = as_float(values)
    parent = jnp.asarray(parent)
    if mode == "node_value":
        advantages = values
    else:
        root_value = values[:, :1]
        parent_value = _parent_values(values, parent)
        advantages = {
            "diff_parent": values - parent_value,
            "diff_global": values - root_value,
            "diff_localglobal": (values - root_value) + (values - parent_value),
        }[mode]
    is_root = (jnp.arange(values.shape[-1]) == 0)[None, :] | (parent < 0)
    advantages = jnp.where(is_root, values, advantages)
    return jnp.where(jnp.asarray(valid, bool), advantages, 0)


def token_advantages(
    node_values: chex.Array, tree_index: chex.Array, token_node: chex.Array
) -> chex.Array:
    """Writes per-node quantities (advantages) onto the tokens of the training rows.

        out[s, t] = node_values[tree_index[s], token_node[s, t]]   (0 where token_node[s, t] == -1)

    Every token of a node's span (its observation and its turn) carries the node's value; tool-result
    tokens are then excluded by the loss mask (golden behaviour §9.12).

    Args:
      node_values: [B, N] float per-node values (e.g. :func:`tree_node_advantages`).
      tree_index: [S] int tree of each row (row r of a tree batch belongs to tree r // samples).
      token_node: [S, L] int node that owns each token, -1 for padding.

    Returns:
      [S, L] float32.
    """
    chex.assert_rank([node_values, tree_index, token_node], [2, 1, 2])
    chex.assert_equal_shape_prefix([tree_index, token_node], 1)
    node_values = as_float(node_values)
    token_node = jnp.asarray(token_node)
    # One flat gather (tree * N + node) is ~2x faster than a per-row take_along_axis on CPU.
    flat = jnp.asarray(tree_index)[:, None] * node_values.shape[-1] + jnp.maximum(token_node, 0)
    return jnp.where(token_node >= 0, node_values.reshape(-1)[flat], 0)
