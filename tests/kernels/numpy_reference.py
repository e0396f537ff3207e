"""Straightforward NumPy loop implementations of the kernels, written from ALGORITHM.md.

They mirror how the reference code computes things (per row, per turn, per node, recursively) and are
deliberately naive: they are the ground truth the jitted kernels are compared against.
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------- turns


def turns_of_row(mask_row) -> list[tuple[int, int]]:
    """Maximal runs of non-zero entries as [start, end) pairs."""
    runs, start = [], None
    for t, m in enumerate(mask_row):
        if m and start is None:
            start = t
        if not m and start is not None:
            runs.append((start, t))
            start = None
    if start is not None:
        runs.append((start, len(mask_row)))
    return runs


def turn_ids(mask) -> np.ndarray:
    out = -np.ones(mask.shape, np.int64)
    for s, row in enumerate(mask):
        for k, (a, b) in enumerate(turns_of_row(row)):
            out[s, a:b] = k
    return out


def segment_mean(values, ids, num_turns) -> np.ndarray:
    out = np.zeros((values.shape[0], num_turns))
    for s in range(values.shape[0]):
        for k in range(num_turns):
            members = [values[s, t] for t in range(values.shape[1]) if ids[s, t] == k]
            out[s, k] = sum(members) / len(members) if members else 0.0
    return out


def token_entropy(logits) -> np.ndarray:
    flat = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    out = []
    for row in flat:
        finite = row[np.isfinite(row)]
        peak = finite.max()
        z = sum(math.exp(x - peak) for x in finite)
        h = 0.0
        for x in finite:
            p = math.exp(x - peak) / z
            if p > 0:
                h -= p * math.log(p)
        out.append(h)
    return np.array(out).reshape(logits.shape[:-1])


# --------------------------------------------------------------------------------------- losses


def _clip_objective(a, s, clip_low, clip_high):
    """Value of max(-A s, -A clip(s)) and whether the gradient flows (unclipped branch chosen)."""
    unclipped = -a * s
    clipped = -a * min(max(s, 1 - clip_low), 1 + clip_high)
    return max(unclipped, clipped), not clipped > unclipped


def turn_objective(
    logp,
    old,
    adv,
    mask,
    clip_low=3e-3,
    clip_high=4e-3,
    max_log_ratio=10.0,
    whole_row=False,
    ids=None,
):
    """ATPO (or GSPO with whole_row=True) loss, its gradient w.r.t. logp and clipfrac.

    Loops over rows and turns like the reference's compute_policy_loss_gspo_turn. Aggregation is
    seq-mean-token-mean over rows with at least one masked token.
    """
    rows, length = logp.shape
    grad = np.zeros_like(logp, dtype=np.float64)
    row_losses, row_token_counts, clipped_tokens, masked_tokens = [], [], 0, 0
    for s in range(rows):
        if whole_row:
            groups = [[t for t in range(length) if mask[s, t]]]
        elif ids is not None:
            groups = [
                [t for t in range(length) if mask[s, t] and ids[s, t] == k] for k in range(length)
            ]
        else:
            groups = [list(range(a, b)) for a, b in turns_of_row(mask[s])]
        groups = [g for g in groups if g]
        n_tokens = int(sum(len(g) for g in groups))
        if n_tokens == 0:
            continue
        total, row_grad = 0.0, {}
        for g in groups:
            ell = sum(logp[s, t] - old[s, t] for t in g) / len(g)
            clamped = ell > max_log_ratio
            s_val = math.exp(min(ell, max_log_ratio))
            for t in g:
                value, flows = _clip_objective(adv[s, t], s_val, clip_low, clip_high)
                total += value
                masked_tokens += 1
                clipped_tokens += not flows
                row_grad[t] = 0.0 if (clamped or not flows) else -adv[s, t] * s_val
        row_losses.append(total / n_tokens)
        row_token_counts.append(n_tokens)
        for t, g_t in row_grad.items():
            grad[s, t] = g_t / n_tokens
    if not row_losses:
        return 0.0, grad, 0.0
    grad /= len(row_losses)
    return (
        sum(row_losses) / len(row_losses),
        grad,
        clipped_tokens / masked_tokens,
    )


def ppo_objective(
    logp,
    old,
    adv,
    mask,
    clip_low=0.2,
    clip_high=0.2,
    dual_clip=3.0,
    agg="token-mean",
    entropy_balanced=False,
):
    """Token-level PPO with dual clip: (loss, per-token loss matrix, per-token gradient of loss_t).

    ``entropy_balanced``: AEPO's clipping, whose upper bound (1+ε_h)·r/sg(r) carries the gradient
    (1+ε_h)·∇logp, so a token clipped at the top keeps that gradient instead of none.
    """
    rows, length = logp.shape
    loss_mat = np.zeros((rows, length))
    dloss = np.zeros((rows, length))
    for s in range(rows):
        for t in range(length):
            if not mask[s, t]:
                continue
            lr = min(max(logp[s, t] - old[s, t], -20.0), 20.0)
            r = math.exp(lr)
            a = adv[s, t]
            value, flows = _clip_objective(a, r, clip_low, clip_high)
            grad = -a * r if flows else 0.0
            if entropy_balanced and not flows and r > 1 + clip_high:
                grad = -a * (1 + clip_high)
            if dual_clip is not None and a < 0 and value > -a * dual_clip:
                value, grad = -a * dual_clip, 0.0
            loss_mat[s, t] = value
            dloss[s, t] = grad
    weights = aggregation_weights(mask, agg)
    return float(np.sum(loss_mat * weights)), loss_mat, dloss * weights


def aggregation_weights(mask, agg) -> np.ndarray:
    """Weight of each token's loss in the scalar loss, per aggregation mode."""
    mask = mask.astype(np.float64)
    rows, length = mask.shape
    counts = mask.sum(1)
    non_empty = int((counts > 0).sum())
    w = np.zeros_like(mask)
    for s in range(rows):
        for t in range(length):
            if not mask[s, t]:
                continue
            if agg == "token-mean":
                w[s, t] = 1.0 / mask.sum()
            elif agg == "seq-mean-token-mean":
                w[s, t] = 1.0 / (counts[s] * non_empty)
            elif agg == "seq-mean-token-sum":
                w[s, t] = 1.0 / non_empty
            elif agg == "seq-mean-token-sum-norm":
                w[s, t] = 1.0 / length
    return w


def kl_penalty(logp, ref, kind):
    out = np.zeros_like(logp, dtype=np.float64)
    for idx in np.ndindex(logp.shape):
        d = logp[idx] - ref[idx]
        if kind == "kl":
            out[idx] = d
        elif kind == "abs":
            out[idx] = abs(d)
        elif kind == "mse":
            out[idx] = 0.5 * d * d
        else:
            k = min(max(ref[idx] - logp[idx], -20.0), 20.0)
            out[idx] = min(max(math.exp(k) - k - 1.0, -10.0), 10.0)
    return out


# --------------------------------------------------------------------------------------- trees


class Tree:
    """One tree from padded arrays, with explicit children lists (like the reference's node objects)."""

    def __init__(self, parent, is_leaf, valid):
        self.n = len(parent)
        self.parent = [int(p) for p in parent]
        self.is_leaf = [bool(x) for x in is_leaf]
        self.valid = [bool(x) for x in valid]
        self.children = [[] for _ in range(self.n)]
        for c in range(self.n):
            if self.valid[c] and self.parent[c] >= 0:
                self.children[self.parent[c]].append(c)

    def bfs(self):
        order, queue = [], [0]
        while queue:
            node = queue.pop(0)
            order.append(node)
            queue.extend(self.children[node])
        return order


def expansion_scores(parent, is_leaf, entropy, valid, penalty=0.05):
    """Scores in float32 arithmetic (like the kernel), so that equal scores tie identically."""
    out = np.full(parent.shape, -np.inf, np.float32)
    entropy = np.asarray(entropy, np.float32)
    for b in range(parent.shape[0]):
        tree = Tree(parent[b], is_leaf[b], valid[b])
        for n in range(tree.n):
            if not tree.valid[n] or tree.is_leaf[n]:
                continue
            family = len(tree.children[n if n == 0 else tree.parent[n]])
            out[b, n] = entropy[b, n] - np.float32(penalty) * np.float32(max(0, family - 1))
    return out


def select_expansion_nodes(parent, is_leaf, entropy, valid, k, penalty=0.05):
    """The reference's procedure: stable sort by score, take top k, repeat the list if too short."""
    scores = expansion_scores(parent, is_leaf, entropy, valid, penalty)
    out = np.zeros((parent.shape[0], k), np.int64)
    for b in range(parent.shape[0]):
        candidates = [n for n in range(parent.shape[1]) if np.isfinite(scores[b, n])]
        if not candidates:
            continue  # the root, k times
        ranked = sorted(candidates, key=lambda n: -scores[b, n])  # Python's sort is stable
        picks = list(ranked)
        while len(picks) < k:
            picks.extend(ranked)
        out[b] = picks[:k]
    return out


def normalize_leaf_rewards(reward, is_leaf, valid, eps=1e-6):
    out = np.zeros(reward.shape)
    for b in range(reward.shape[0]):
        leaves = [n for n in range(reward.shape[1]) if is_leaf[b, n] and valid[b, n]]
        if not leaves:
            continue
        values = np.array([reward[b, n] for n in leaves], np.float64)
        mean, std = values.mean(), values.std()  # numpy's default std is the population std
        for n in leaves:
            out[b, n] = (reward[b, n] - mean) / (std + eps)
    return out


def tree_node_values(parent, is_leaf, leaf_value, entropy, valid, mode):
    out = np.zeros(leaf_value.shape)
    for b in range(parent.shape[0]):
        tree = Tree(parent[b], is_leaf[b], valid[b])

        def leaves_under(n, tree=tree):
            if tree.is_leaf[n]:
                return [n]
            return [leaf for c in tree.children[n] for leaf in leaves_under(c)]

        def value(n, tree=tree, b=b):
            if tree.is_leaf[n]:
                return float(leaf_value[b, n])
            kids = tree.children[n]
            if mode == "leaf_mean":
                under = leaves_under(n)
                return float(np.mean([leaf_value[b, m] for m in under])) if under else 0.0
            if not kids:
                return 0.0
            child_values = [value(c) for c in kids]
            if mode == "child_mean":
                return sum(child_values) / len(child_values)
            logits = [float(entropy[b, c]) for c in kids]
            peak = max(logits)
            weights = [math.exp(x - peak) for x in logits]
            return sum(w * v for w, v in zip(weights, child_values, strict=True)) / sum(weights)

        for n in range(tree.n):
            if tree.valid[n]:
                out[b, n] = value(n)
    return out


def tree_node_advantages(values, parent, valid, mode):
    out = np.zeros(values.shape)
    for b in range(values.shape[0]):
        for n in range(values.shape[1]):
            if not valid[b, n]:
                continue
            v, p = values[b, n], parent[b, n]
            if p < 0 or mode == "node_value":
                out[b, n] = v
            elif mode == "diff_parent":
                out[b, n] = v - values[b, p]
            elif mode == "diff_global":
                out[b, n] = v - values[b, 0]
            else:
                out[b, n] = (v - values[b, 0]) + (v - values[b, p])
    return out


def token_advantages(node_values, tree_index, token_node):
    out = np.zeros(token_node.shape)
    for s in range(token_node.shape[0]):
        for t in range(token_node.shape[1]):
            if token_node[s, t] >= 0:
                out[s, t] = node_values[tree_index[s], token_node[s, t]]
    return out
