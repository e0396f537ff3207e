"""A model-free walk through one AT²PO step with the real kernels.

It grows a forest of trees the way the tree search does (initial chains, then entropy-guided expansion
rounds that call :func:`kernels.select_expansion_nodes`), with a random "policy" standing in for the
language model, then runs the credit kernels (leaf z-score, tree values, node advantages, token
write-out) and the turn-level loss on the resulting padded rows. Everything printed is computed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from atpo_jax import kernels


@dataclasses.dataclass
class _Tree:
    parent: list[int]
    is_leaf: list[bool]
    entropy: list[float]
    turn_tokens: list[int]  # generated tokens of the node's turn
    obs_tokens: list[int]  # tool-result tokens before the turn


def _grow_chain(
    tree: _Tree, start_parent: int, rng: np.random.Generator, max_turns: int = 6
) -> None:
    """Adds turns under ``start_parent`` until the random policy answers (a leaf)."""
    parent = start_parent
    for turn in range(max_turns):
        tree.parent.append(parent)
        tree.entropy.append(float(rng.gamma(2.0, 0.3)))
        tree.turn_tokens.append(int(rng.integers(8, 40)))
        tree.obs_tokens.append(0 if parent == 0 else int(rng.integers(10, 30)))
        answers = rng.uniform() < 0.35 or turn == max_turns - 1
        tree.is_leaf.append(answers)
        if answers:
            return
        parent = len(tree.parent) - 1


def _padded(trees: list[_Tree], num_nodes: int):
    def pad(values, fill, dtype):
        out = np.full((len(trees), num_nodes), fill, dtype)
        for b, tree in enumerate(trees):
            out[b, : len(values(tree))] = values(tree)
        return out

    parent = pad(lambda t: t.parent, -1, np.int32)
    is_leaf = pad(lambda t: t.is_leaf, False, bool)
    entropy = pad(lambda t: t.entropy, 0.0, np.float32)
    valid = pad(lambda t: [True] * len(t.parent), False, bool)
    return parent, is_leaf, entropy, valid


def build_forest(config: ml_collections.ConfigDict, rng: np.random.Generator) -> list[_Tree]:
    """Initial chains then expansion rounds; picks come from the selection kernel."""
    roll = config.rollout
    trees = [
        _Tree(parent=[-1], is_leaf=[False], entropy=[0.0], turn_tokens=[0], obs_tokens=[0])
        for _ in range(config.demo.num_trees)
    ]
    for tree in trees:
        for _ in range(roll.initial_rollouts):
            _grow_chain(tree, 0, rng)
    for _ in range(roll.expansion_iterations):
        num_nodes = max(len(t.parent) for t in trees)
        parent, is_leaf, entropy, valid = _padded(trees, num_nodes)
        picks = np.asarray(
            kernels.select_expansion_nodes(
                parent, is_leaf, entropy, valid, k=roll.beam_size, penalty=roll.expansion_penalty
            )
        )
        for tree, tree_picks in zip(trees, picks, strict=True):
            for node in tree_picks:
                # The branch keeps the pick's observation and re-samples its turn: a sibling of the
                # pick (a fresh chain when the pick is the root).
                _grow_chain(tree, 0 if node == 0 else tree.parent[node], rng)
    return trees


def _rows(trees: list[_Tree], response_length: int):
    """One row per leaf: the root->leaf path's observation (mask 0) + turn (mask 1) tokens."""
    token_node, loss_mask, tree_index = [], [], []
    for b, tree in enumerate(trees):
        for leaf in (n for n, is_leaf in enumerate(tree.is_leaf) if is_leaf):
            path, node = [], leaf
            while node > 0:
                path.append(node)
                node = tree.parent[node]
            nodes, mask = [], []
            for n in reversed(path):
                nodes += [n] * (tree.obs_tokens[n] + tree.turn_tokens[n])
                mask += [0] * tree.obs_tokens[n] + [1] * tree.turn_tokens[n]
            pad = response_length - len(nodes)
            token_node.append((nodes + [-1] * pad)[:response_length])
            loss_mask.append((mask + [0] * pad)[:response_length])
            tree_index.append(b)
    return np.array(token_node, np.int32), np.array(loss_mask, np.int32), np.array(tree_index)


def run(config: ml_collections.ConfigDict) -> dict[str, float]:
    """Runs the demo step and prints what it computed; returns the headline numbers."""
    rng = np.random.default_rng(config.seed)
    trees = build_forest(config, rng)
    num_nodes = max(len(t.parent) for t in trees)
    parent, is_leaf, entropy, valid = _padded(trees, num_nodes)
    reward = np.where(is_leaf, rng.choice([-1.0, 0.0, 1.0], is_leaf.shape), 0.0).astype(np.float32)

    credit = config.credit
    leaf_value = (
        kernels.normalize_leaf_rewards(reward, is_leaf, valid) if credit.leaf_value_norm else reward
    )
    values = kernels.tree_node_values(
        parent, is_leaf, leaf_value, entropy, valid, mode=credit.node_value_mode
    )
    node_adv = kernels.tree_node_advantages(values, parent, valid, mode=credit.node_adv_mode)
    token_node, loss_mask, tree_index = _rows(trees, config.demo.response_length)
    advantages = kernels.token_advantages(node_adv, tree_index, token_node)

    old_log_probs = jnp.asarray(-rng.exponential(1.0, loss_mask.shape), jnp.float32)
    log_probs = old_log_probs + jnp.asarray(rng.normal(0, 2e-3, loss_mask.shape), jnp.float32)
    loss_fn = jax.jit(
        lambda lp: kernels.atpo_policy_loss(
            lp,
            old_log_probs,
            advantages,
            loss_mask,
            clip_low=config.loss.clip_low,
            clip_high=config.loss.clip_high,
        ),
    )
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(log_probs)

    leaves = is_leaf.sum(axis=1)
    print(f"AT²PO kernel demo: {len(trees)} trees, up to {num_nodes} nodes, {len(tree_index)} rows")
    roll = config.rollout
    expected = roll.initial_rollouts + roll.expansion_iterations * roll.beam_size
    print(
        f"  leaves per tree: {sorted(set(leaves.tolist()))} (expected {roll.initial_rollouts} + "
        f"{roll.expansion_iterations} x {roll.beam_size} = {expected})"
    )
    print(f"  node values ({credit.node_value_mode}): root mean {float(values[:, 0].mean()):+.4f}")
    print(
        f"  token advantages: mean {float(advantages.mean()):+.4f}, "
        f"std {float(advantages.std()):.4f}"
    )
    print(
        f"  atpo loss {float(loss):+.6f}  clipfrac {float(metrics['clipfrac']):.4f}  "
        f"turns/row {float(metrics['num_turns']):.2f}  |grad| {float(jnp.abs(grad).sum()):.4f}"
    )
    return {"loss": float(loss), "rows": len(tree_index), "leaves_per_tree": int(leaves.max())}
