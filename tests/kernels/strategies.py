"""Hypothesis strategies for random loss masks and random padded trees (fixed padded shapes)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

ROWS, LENGTH = 5, 64
TREES, NODES = 3, 48
MAX_DEPTH, MAX_CHILDREN = 7, 12


@st.composite
def row_masks(draw, rows: int = ROWS, length: int = LENGTH, max_turns: int = 8):
    """[rows, length] 0/1 masks; each row has 0-8 turns (runs of 1s) separated by gaps of 0s."""
    mask = np.zeros((rows, length), np.int32)
    for s in range(rows):
        n_turns = draw(st.integers(0, max_turns) if s == rows - 1 else st.integers(1, max_turns))
        t = draw(st.integers(0, 3))
        for _ in range(n_turns):
            run = draw(st.integers(1, 4))
            mask[s, t : t + run] = 1
            t += run + draw(st.integers(1, 3))
    return mask


@st.composite
def loss_inputs(draw, scale: float = 0.01):
    """(log_probs, old_log_probs, advantages, mask) with turn-constant or token-varying advantages."""
    mask = draw(row_masks())
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    old = -rng.exponential(1.0, mask.shape)
    # Mix small (unclipped) and larger (clipped) policy changes.
    log_ratio_scale = draw(st.sampled_from([scale * 0.1, scale, 10 * scale]))
    new = old + rng.normal(0.0, log_ratio_scale, mask.shape)
    adv = rng.normal(0.0, 1.0, mask.shape)
    return new, old, adv, mask


@st.composite
def padded_trees(draw, trees: int = TREES, nodes: int = NODES):
    """Random trees in creation order (parent < child), depth <= 7, 1-12 children per inner node.

    Returns parent, is_leaf, valid, entropy, leaf_reward ([trees, nodes] each). Entropies are
    multiples of 1/8 so that equal scores (ties) are common and, with dyadic penalties, exact in any
    float arithmetic (eager, fused/FMA under jit, or NumPy); rewards are in {-1, 0, 1}.
    """
    parent = -np.ones((trees, nodes), np.int32)
    valid = np.zeros((trees, nodes), bool)
    is_leaf = np.zeros((trees, nodes), bool)
    for b in range(trees):
        size = draw(st.integers(1, nodes))
        depth = [0]
        n_children = [0]
        valid[b, 0] = True
        for n in range(1, size):
            eligible = [
                m for m in range(n) if depth[m] < MAX_DEPTH and n_children[m] < MAX_CHILDREN
            ]
            # Favour recent nodes so that deep chains appear, as in real rollouts.
            pick = draw(st.integers(0, len(eligible) - 1))
            if draw(st.booleans()):
                pick = len(eligible) - 1 - pick // 4
            p = eligible[pick]
            parent[b, n] = p
            valid[b, n] = True
            depth.append(depth[p] + 1)
            n_children.append(0)
            n_children[p] += 1
        for n in range(1, size):
            # Childless nodes are leaves, except now and then a non-leaf whose tool child was cut.
            is_leaf[b, n] = n_children[n] == 0 and draw(st.integers(0, 9)) > 0
    entropy = np.round(draw(arrays_in((trees, nodes), 0.0, 3.0)) * 8) / 8
    reward = draw(arrays_in((trees, nodes), -1.0, 1.0, integers=True))
    return parent, is_leaf, valid, entropy, reward


def arrays_in(shape, low, high, integers=False):
    seeds = st.integers(0, 2**31 - 1)
    if integers:
        return seeds.map(
            lambda s: (
                np.random.default_rng(s).integers(int(low), int(high) + 1, shape).astype(float)
            )
        )
    return seeds.map(lambda s: np.random.default_rng(s).uniform(low, high, shape))
