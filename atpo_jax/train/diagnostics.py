"""Host-side diagnostics of one RL step's trees, for the ablations (docs/ablation.md), logged as
``tree/*`` metrics next to ``rollout/*``. They read what the rollout and the reward already made
(the trees, the leaves' rewards, the questions' ``extra_info``) and change nothing the run computes.

``tree/leaves_disagree``
  The share of the step's prompts whose leaves (tree mode) or chains (chain and AEPO modes) got
  different rewards: where the group's credit has any signal at all. A prompt whose leaves all
  score the same gets zero advantage under GRPO and zero value differences in the tree.
``tree/entropy_depth_<d>``
  The mean sampler entropy (nats per sampled token) of the turns at depth ``d`` (the turns that
  have seen ``d`` tool results; 0 = the first turn), over the step's live nodes.
``tree/decisive_pick_rate`` and ``tree/decisive_picks``
  Of the expansion picks in trees whose question has a ``decisive_hop`` (the synthetic harder
  worlds: the first search, 0-based, that only a qualified query answers), the share that picked
  a node at the decisive turn (node depth == decisive hop: the turn that issues that search; a pick
  of the root re-samples the first turn, depth 0), and how many such picks there were. Absent
  when the step has none (chains, or the easy world). Random expansion's rate is the chance rate
  of the same trees' shapes.

Each process counts its own trees (:func:`diagnostic_counts`: additive counters); the step's
metrics are made from every process's counters (:func:`diagnostic_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from atpo_jax.rollout.tree import Tree


def diagnostic_counts(
    trees: Sequence[Tree],
    scores: np.ndarray,
    samples_per_tree: int,
    decisive_hops: Sequence[int | None],
) -> dict[str, float]:
    """Additive counters of one process's trees.

    Args:
      trees: the step's trees, one per prompt, in row order.
      scores: [len(trees) * samples_per_tree] the leaf rows' rewards, tree by tree.
      samples_per_tree: leaf rows per tree.
      decisive_hops: per tree, its question's decisive hop (None: none, or not recorded).
    """
    scores = np.asarray(scores, np.float64).reshape(len(trees), samples_per_tree)
    counts: dict[str, float] = {
        "prompts": float(len(trees)),
        "prompts_disagree": float(np.sum(np.ptp(scores, axis=1) > 0)) if len(trees) else 0.0,
        "decisive_picks": 0.0,
        "decisive_hits": 0.0,
    }
    for tree, hop in zip(trees, decisive_hops, strict=True):
        for index in tree.live_nodes():
            if index == 0:
                continue
            node = tree.nodes[index]
            sampled = [
                e
                for k, (e, m) in enumerate(zip(node.entropies, node.loss_mask, strict=True))
                if m and k >= node.obs_len
            ]
            if sampled:
                key = f"depth_{node.depth}"
                counts[f"entropy_sum_{key}"] = counts.get(f"entropy_sum_{key}", 0.0) + sum(sampled)
                counts[f"entropy_tokens_{key}"] = counts.get(f"entropy_tokens_{key}", 0.0) + len(
                    sampled
                )
        if hop is None:
            continue
        for round_picks in tree.picks:
            for index in round_picks:
                counts["decisive_picks"] += 1
                counts["decisive_hits"] += float(tree.nodes[index].depth == int(hop))
    return counts


def diagnostic_metrics(per_process: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The ``tree/*`` metrics of every process's :func:`diagnostic_counts`, summed."""
    total: dict[str, float] = {}
    for counts in per_process:
        for key, value in counts.items():
            total[key] = total.get(key, 0.0) + float(value)
    metrics = {}
    if total.get("prompts", 0.0) > 0:
        metrics["tree/leaves_disagree"] = total["prompts_disagree"] / total["prompts"]
    depths = sorted(
        int(key.rsplit("_", 1)[1]) for key in total if key.startswith("entropy_tokens_depth_")
    )
    for depth in depths:
        tokens = total[f"entropy_tokens_depth_{depth}"]
        metrics[f"tree/entropy_depth_{depth}"] = total[f"entropy_sum_depth_{depth}"] / tokens
    if total.get("decisive_picks", 0.0) > 0:
        metrics["tree/decisive_picks"] = total["decisive_picks"]
        metrics["tree/decisive_pick_rate"] = total["decisive_hits"] / total["decisive_picks"]
    return metrics
