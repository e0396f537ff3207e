"""Counters of a rollout and the ``rollout/*`` metrics made from them, merged over processes."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from atpo_jax.rollout.pack import RowInfo
from atpo_jax.rollout.tree import Tree


@dataclasses.dataclass
class RolloutStats:
    """Counters of one rollout, reported as ``rollout/*`` metrics."""

    generate_calls: int = 0
    generated_tokens: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    tool_timeouts: int = 0
    empty_calls: int = 0
    call_limit_hits: int = 0
    truncated: int = 0
    generate_seconds: float = 0.0
    tool_seconds: float = 0.0  # wall time during which at least one tool call ran
    picks_by_depth: Counter = dataclasses.field(default_factory=Counter)
    branch_copies: int = 0  # AEPO: chains copied at a branching round
    fresh_chains: int = 0  # AEPO: chains started from the prompt after the initial ones
    # The scheduler's and the engine's figures (rollout/decode_occupancy and the kv_* metrics).
    row_steps_run: int = 0
    row_steps_useful: int = 0
    kv_bytes_read: float = 0.0
    kv_pages_read: int = 0
    kv_pages_read_once: int = 0
    kv_tokens_peak: int = 0
    kv_tokens_dense: int = 0
    kv_pool_waits: int = 0
    preemptions: int = 0
    tool_overlap_seconds: float = 0.0
    wall_seconds: float = 0.0


def rollout_metrics(trees: Sequence[Tree], rows: Sequence[RowInfo], stats: RolloutStats) -> dict:
    """``rollout/*`` scalars: tool use, failures, lengths, tree sizes, depth and pick histograms."""
    lengths = np.array([r.length for r in rows], np.float64)
    metrics = {
        "rollout/tool_calls_per_chain": float(np.mean([r.tool_calls for r in rows])),
        "rollout/tool_calls": float(stats.tool_calls),
        "rollout/tool_failures": float(stats.tool_failures),
        "rollout/tool_timeouts": float(stats.tool_timeouts),
        "rollout/empty_calls": float(stats.empty_calls),
        "rollout/call_limit_hits": float(stats.call_limit_hits),
        "rollout/truncated_rows": float(sum(r.finish == "length" for r in rows)),
        "rollout/response_length_mean": float(lengths.mean()),
        "rollout/response_length_max": float(lengths.max()),
        "rollout/nodes_per_tree": float(np.mean([len(t.live_nodes()) for t in trees])),
        "rollout/generated_tokens": float(stats.generated_tokens),
        "rollout/generate_calls": float(stats.generate_calls),
        "rollout/branch_copies": float(stats.branch_copies),
        "rollout/fresh_chains": float(stats.fresh_chains),
        "time/generate_s": stats.generate_seconds,
        "time/tools_s": stats.tool_seconds,
        "schedule/decode_occupancy": stats.row_steps_useful / max(stats.row_steps_run, 1),
        "schedule/kv_tokens_peak": float(stats.kv_tokens_peak),
        "schedule/kv_tokens_dense_equivalent": float(stats.kv_tokens_dense),
        "schedule/kv_pool_waits": float(stats.kv_pool_waits),
        "schedule/preemptions": float(stats.preemptions),
        # Fraction of tool wall time during which the device decoded (1 when no tool ran).
        "schedule/tool_overlap": stats.tool_overlap_seconds / stats.tool_seconds
        if stats.tool_seconds > 0
        else 1.0,
        "schedule/decode_kv_bytes_per_s": stats.kv_bytes_read / max(stats.generate_seconds, 1e-9),
        # Fraction of decode KV reads that are of pages other rows of the same step also read:
        # what attending to shared prefixes once per step (cascade attention) would save.
        "schedule/kv_reads_shared": 1.0 - stats.kv_pages_read_once / stats.kv_pages_read
        if stats.kv_pages_read
        else 0.0,
    }
    for depth, count in sorted(leaf_depth_histogram(trees).items()):
        metrics[f"rollout/leaf_depth_{depth}"] = float(count)
    for depth, count in sorted(stats.picks_by_depth.items()):
        metrics[f"rollout/picks_depth_{depth}"] = float(count)
    return metrics


def leaf_depth_histogram(trees: Sequence[Tree]) -> Counter:
    return Counter(t.nodes[i].depth for t in trees for i in t.leaves())


_MEAN_RATIOS = frozenset(
    {
        "schedule/decode_occupancy",
        "schedule/tool_overlap",
        "schedule/kv_reads_shared",
        "schedule/decode_kv_bytes_per_s",
    }
)


def _combine_rule(key: str) -> str:
    """How a ``rollout/*`` or ``time/*`` metric of several processes combines into the run's."""
    if key.startswith("time/") or key.endswith("_max"):
        return "max"
    if key.endswith("_mean") or key.endswith("_per_chain") or key.endswith("_per_tree"):
        return "mean"  # every process holds the same number of trees and rows
    if key == "rollout/generate_calls":
        return "max"  # processes generate concurrently
    if key in _MEAN_RATIOS:
        return "mean"  # ratios and rates of processes that run the same workload
    return "sum"  # counters and histograms


def merge_rollout_metrics(per_process: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Rollout metrics of all processes as one run's: counts summed, means averaged, maxima and
    wall times maximised; a histogram bucket a process lacks counts 0."""
    if len(per_process) == 1:
        return dict(per_process[0])
    keys = sorted({k for metrics in per_process for k in metrics})
    merged = {}
    for key in keys:
        values = [float(m.get(key, 0.0)) for m in per_process]
        rule = _combine_rule(key)
        if rule == "max":
            merged[key] = max(values)
        elif rule == "mean":
            merged[key] = float(np.mean(values))
        else:
            merged[key] = float(np.sum(values))
    return merged
