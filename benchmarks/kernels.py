"""Kernel benchmark at the paper's scale (ALGORITHM.md §5): ratios against baselines in the same run.

Loss: forward+backward of ``atpo_policy_loss`` on 1408 rows x 6192 response tokens with 1-6 turns per
row, relative to
  (a) ``ppo_policy_loss`` (token-level, no turn reductions), jitted, same inputs;
  (b) a per-row, per-turn Python loop of the same objective written the way the reference does it
      (PyTorch eager, ``.item()`` per turn boundary, autograd backward);
  (c) a memory-bandwidth floor: one jitted elementwise pass that reads the four input arrays and
      writes one array of the same size (what any fused fwd+bwd must at least do).
Also timed: the same loss traced without the native CPU kernel (the pure-JAX turn mean that GPU/TPU
run), with explicit ``turn_ids`` (general segment sums), and the native run mean alone.
Credit: leaf z-score + child_softmax values + node advantages on 64 trees x 64 nodes (jitted) versus
the reference's recursive Python over node objects, plus the token write-out onto 1408 x 6192 rows.

Run: ``python benchmarks/kernels.py [--rows 1408 --length 6192 --trees 64 --nodes 64]
[--timing interleaved|blocks]``. The loss contenders are timed in turn within each repeat by default;
``--timing blocks`` times each in its own block of repeats. The ratio to PPO moves with the method
(much of PPO's time is page faults on fresh output buffers; README, Benchmarks).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_median_seconds, median_seconds, print_table  # noqa: E402

from atpo_jax import kernels  # noqa: E402
from atpo_jax.kernels import native  # noqa: E402
from atpo_jax.kernels.turns import per_token_run_mean  # noqa: E402


def make_loss_inputs(rows: int, length: int, seed: int = 0):
    """Rows of 1-6 turns separated by tool results, then padding; advantages constant per turn."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((rows, length), np.float32)
    adv = np.zeros((rows, length), np.float32)
    for r in range(rows):
        n_turns = rng.integers(1, 7)
        used = int(rng.integers(length // 4, length))
        cuts = np.sort(rng.choice(np.arange(1, used), 2 * n_turns - 1, replace=False))
        bounds = np.concatenate([[0], cuts, [used]])
        for k in range(n_turns):
            a, b = bounds[2 * k], bounds[2 * k + 1]
            mask[r, a:b] = 1.0
            adv[r, a:b] = rng.normal()
    old = (-rng.exponential(1.0, (rows, length))).astype(np.float32)
    new = (old + rng.normal(0, 2e-3, (rows, length))).astype(np.float32)
    return new, old, adv, mask


def reference_style_turn_loss(torch, logp, old, adv, mask, clip_low=3e-3, clip_high=4e-3):
    """GSPO-turn as the reference computes it: a Python loop over rows and turns with host syncs."""
    log_ratio = logp - old
    turn_log_ratio = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        padded = torch.cat([mask.new_zeros(1), mask[i], mask.new_zeros(1)])
        diff = padded[1:] - padded[:-1]
        starts = (diff == 1).nonzero().flatten()
        ends = (diff == -1).nonzero().flatten()
        for s, e in zip(starts, ends, strict=True):
            s, e = s.item(), e.item()
            seg_mask = mask[i, s:e]
            value = (log_ratio[i, s:e] * seg_mask).sum() / seg_mask.sum().clamp(min=1)
            turn_log_ratio[i, s:e] = value.detach()
    seq_log_ratio = torch.clamp(turn_log_ratio + logp - logp.detach(), max=10.0)
    ratio = torch.exp(seq_log_ratio)
    losses = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    per_row = (losses * mask).sum(-1) / mask.sum(-1)
    return per_row.mean()


def bench_losses(rows: int, length: int, repeats: int, timing: str = "interleaved"):
    new, old, adv, mask = (jnp.asarray(x) for x in make_loss_inputs(rows, length))

    def fwd_bwd(loss_fn):
        def value_and_grad(lp, o, a, m):
            return jax.value_and_grad(lambda x: loss_fn(x, o, a, m)[0])(lp)

        return jax.jit(value_and_grad)

    atpo = fwd_bwd(kernels.atpo_policy_loss)
    ppo = fwd_bwd(kernels.ppo_policy_loss)

    # The same loss traced without the native CPU kernel (what GPU/TPU and compiler-less machines
    # run): traced once here with the switch off; jit reuses that trace when timing.
    atpo_pure = fwd_bwd(kernels.atpo_policy_loss)
    previous = os.environ.get(native.SWITCH_ENV)
    os.environ[native.SWITCH_ENV] = "0"
    try:
        jax.block_until_ready(atpo_pure(new, old, adv, mask))
    finally:
        if previous is None:
            del os.environ[native.SWITCH_ENV]
        else:
            os.environ[native.SWITCH_ENV] = previous
    floor = jax.jit(lambda lp, o, a, m: lp + o + a + m)
    # Explicit turn ids (any grouping, e.g. one per tree node) take the general segment-sum path.
    turn_ids = kernels.turn_ids_from_mask(mask)
    atpo_ids = jax.jit(
        lambda lp, o, a, m, t: jax.value_and_grad(
            lambda x: kernels.atpo_policy_loss(x, o, a, m, turn_ids=t)[0]
        )(lp)
    )
    run_mean = jax.jit(per_token_run_mean)
    log_ratio = new - old
    contenders = [
        lambda: atpo(new, old, adv, mask),
        lambda: atpo_pure(new, old, adv, mask),
        lambda: atpo_ids(new, old, adv, mask, turn_ids),
        lambda: ppo(new, old, adv, mask),
        lambda: floor(new, old, adv, mask),
        lambda: run_mean(log_ratio, mask),
    ]
    if timing == "interleaved":
        # Timed in turn within each repeat, so this noisy machine's slow spells hit every contender.
        times = interleaved_median_seconds(contenders, repeats=repeats)
    else:
        times = [median_seconds(fn, repeats=repeats) for fn in contenders]
    t_atpo, t_atpo_pure, t_atpo_ids, t_ppo, t_floor, t_run_mean = times
    path = "native CPU kernel" if native.run_mean_available() else "pure JAX: kernel not built"
    rows_out = [
        (f"atpo_policy_loss fwd+bwd (jit; {path})", t_atpo, ""),
        (
            "atpo_policy_loss, pure-JAX turn mean (GPU/TPU path)",
            t_atpo_pure,
            f"vs ppo = {t_atpo_pure / t_ppo:.2f}x",
        ),
        (
            "atpo_policy_loss, turn_ids given (general segment sums)",
            t_atpo_ids,
            f"vs ppo = {t_atpo_ids / t_ppo:.2f}x",
        ),
        ("(a) ppo_policy_loss fwd+bwd (jit)", t_ppo, f"atpo/ppo = {t_atpo / t_ppo:.2f}x"),
        (
            "(c) bandwidth floor: read 4 arrays, write 1 (jit)",
            t_floor,
            f"atpo/floor = {t_atpo / t_floor:.2f}x",
        ),
        (f"per_token_run_mean alone ({path}), forward", t_run_mean, ""),
    ]
    try:
        import torch
    except ImportError:
        rows_out.append(("(b) reference-style loop", math.nan, "skipped: pip install torch"))
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        t_new = torch.tensor(np.asarray(new), requires_grad=True)
        t_args = [torch.tensor(np.asarray(x)) for x in (old, adv, mask)]

        def loop_fwd_bwd():
            t_new.grad = None
            reference_style_turn_loss(torch, t_new, *t_args).backward()

        t_loop = median_seconds(loop_fwd_bwd, repeats=max(1, repeats // 3))
        # Same value as ours (sanity check that both compute the same objective).
        ours = float(atpo(new, old, adv, mask)[0])
        theirs = float(reference_style_turn_loss(torch, t_new, *t_args))
        assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (ours, theirs)
        rows_out.append(
            (
                "(b) reference-style per-row/turn loop (torch eager)",
                t_loop,
                f"loop/atpo = {t_loop / t_atpo:.1f}x",
            )
        )
    print_table(f"Loss fwd+bwd, {rows} rows x {length} tokens, 1-6 turns/row", rows_out)


def make_trees(num_trees: int, num_nodes: int, seed: int = 0):
    """Trees shaped like AT²PO's: chains from the root, branches re-sampled from inner nodes."""
    rng = np.random.default_rng(seed)
    parent = -np.ones((num_trees, num_nodes), np.int32)
    is_leaf = np.zeros((num_trees, num_nodes), bool)
    for b in range(num_trees):
        children = [0] * num_nodes
        depth = [0] * num_nodes
        for n in range(1, num_nodes):
            # Continue the previous chain (tool call) with prob 0.6 if it is shallow, else branch.
            prev = n - 1
            if n > 1 and depth[prev] < 6 and rng.uniform() < 0.6:
                p = prev
            else:
                inner = [m for m in range(n) if m == 0 or children[m] > 0]
                p = int(rng.choice(inner))
            parent[b, n] = p
            children[p] += 1
            depth[n] = depth[p] + 1
        is_leaf[b] = [children[n] == 0 and n > 0 for n in range(num_nodes)]
    valid = np.ones_like(is_leaf)
    entropy = rng.uniform(0.1, 2.0, parent.shape).astype(np.float32)
    reward = rng.choice([-1.0, 0.0, 1.0], parent.shape).astype(np.float32)
    return parent, is_leaf, valid, entropy, reward


class _Node:
    def __init__(self, entropy):
        self.entropy = entropy
        self.children: list[_Node] = []
        self.is_leaf = False
        self.value = 0.0
        self.advantage = 0.0


def reference_style_credit(parent, is_leaf, entropy, reward):
    """Leaf z-score, recursive child_softmax values and node_value advantages over node objects."""
    out = np.zeros(parent.shape, np.float32)
    for b in range(parent.shape[0]):
        nodes = [_Node(float(entropy[b, n])) for n in range(parent.shape[1])]
        for n in range(1, parent.shape[1]):
            nodes[parent[b, n]].children.append(nodes[n])
            nodes[n].is_leaf = bool(is_leaf[b, n])
        leaves = [node for node in nodes if node.is_leaf]
        raw = np.array([reward[b, i] for i in range(parent.shape[1]) if is_leaf[b, i]])
        mean, std = raw.mean(), raw.std()
        for node, r in zip(leaves, raw, strict=True):
            node.value = (r - mean) / (std + 1e-6)

        def backup(node):
            if node.is_leaf:
                return node.value
            if not node.children:
                return 0.0
            vals = [backup(c) for c in node.children]
            weights = np.exp([c.entropy for c in node.children])
            node.value = float(np.dot(weights / weights.sum(), vals))
            return node.value

        backup(nodes[0])
        for n, node in enumerate(nodes):
            node.advantage = node.value
            out[b, n] = node.advantage
    return out


def reference_style_token_writeout(node_adv, paths, length):
    """Per leaf row, walk root->leaf and write each node's advantage over its token span."""
    rows = np.zeros((len(paths), length), np.float32)
    for r, (tree, spans) in enumerate(paths):
        for node, start, end in spans:
            rows[r, start:end] = node_adv[tree, node]
    return rows


def bench_credit(num_trees: int, num_nodes: int, rows: int, length: int, repeats: int):
    parent, is_leaf, valid, entropy, reward = make_trees(num_trees, num_nodes)

    @jax.jit
    def credit(parent, is_leaf, valid, entropy, reward):
        z = kernels.normalize_leaf_rewards(reward, is_leaf, valid)
        values = kernels.tree_node_values(parent, is_leaf, z, entropy, valid, mode="child_softmax")
        return kernels.tree_node_advantages(values, parent, valid, mode="node_value")

    args = tuple(jnp.asarray(x) for x in (parent, is_leaf, valid, entropy, reward))
    t_ours = median_seconds(lambda: credit(*args), repeats=max(repeats, 20))
    t_ref = median_seconds(
        lambda: reference_style_credit(parent, is_leaf, entropy, reward), repeats=repeats
    )
    ours = np.asarray(credit(*args))
    np.testing.assert_allclose(
        ours, reference_style_credit(parent, is_leaf, entropy, reward), atol=1e-4
    )

    # Token write-out: rows of leaves (22 per tree at paper scale), spans tiling each row.
    rng = np.random.default_rng(1)
    # Rows spread evenly over the trees (22 per tree at paper scale); any --rows works.
    tree_index = np.arange(rows) * num_trees // rows
    token_node = -np.ones((rows, length), np.int32)
    paths = []
    for r, b in enumerate(tree_index):
        leaves = np.flatnonzero(is_leaf[b])
        node = int(rng.choice(leaves))
        path = []
        while node > 0:
            path.append(node)
            node = int(parent[b, node])
        used = int(rng.integers(length // 4, length))
        cuts = np.linspace(0, used, len(path) + 1).astype(int)
        spans = [(n, cuts[i], cuts[i + 1]) for i, n in enumerate(reversed(path))]
        for n, a, c in spans:
            token_node[r, a:c] = n
        paths.append((b, spans))
    write = jax.jit(kernels.token_advantages)
    # Device arrays made once, outside the timed call (a host->device copy is not the kernel).
    write_args = tuple(jnp.asarray(x) for x in (ours, tree_index, token_node))
    t_write = median_seconds(lambda: write(*write_args), repeats=repeats)
    t_write_ref = median_seconds(
        lambda: reference_style_token_writeout(ours, paths, length), repeats=repeats
    )
    print_table(
        f"Credit, {num_trees} trees x {num_nodes} nodes (+ write-out onto {rows} x {length})",
        [
            ("leaf z-score + child_softmax values + advantages (jit)", t_ours, ""),
            ("reference-style recursive Python", t_ref, f"python/ours = {t_ref / t_ours:.1f}x"),
            ("token_advantages write-out (jit)", t_write, ""),
            (
                "reference-style per-row span loop (NumPy)",
                t_write_ref,
                f"loop/ours = {t_write_ref / t_write:.1f}x",
            ),
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1408)
    parser.add_argument("--length", type=int, default=6192)
    parser.add_argument("--trees", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--timing",
        choices=("interleaved", "blocks"),
        default="interleaved",
        help="loss contenders timed in turn within each repeat, or each in its own block",
    )
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)), "
        f"{os.cpu_count()} CPU cores"
    )
    bench_losses(args.rows, args.length, args.repeats, args.timing)
    bench_credit(args.trees, args.nodes, args.rows, args.length, args.repeats)


if __name__ == "__main__":
    main()
