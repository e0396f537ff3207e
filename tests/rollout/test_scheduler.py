"""The continuous-batching scheduler: the trees do not depend on the KV pool's size, the batch
size, tool latencies or thread timing; the pool is empty after every rollout; the metrics."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest
from flax import nnx

from atpo_jax.rollout.engine import Engine
from atpo_jax.rollout.pages import KVPoolExhausted
from atpo_jax.rollout.sampling import SamplingParams
from atpo_jax.rollout.settings import RolloutSettings
from atpo_jax.rollout.tree_search import TreeSearch, interval_overlap
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.toolbox import Toolbox
from tests.rollout.scripted import PieceTokenizer, logit_table_model
from tests.rollout.test_tree_search import EOS, PIECES, Q, R, branching_table


class SlowTool:
    """Answers "doc" after a random delay (unseeded: thread timing differs run to run)."""

    tag = "search"

    def __init__(self, max_delay_s: float):
        self.max_delay_s, self.lock, self.calls = max_delay_s, threading.Lock(), 0

    def run(self, content):
        with self.lock:
            self.calls += 1
        time.sleep(random.uniform(0.0, self.max_delay_s))
        return ToolResult(ok=True, text="doc", status="ok")


def search_with(*, num_slots=64, kv_pages=0, max_delay_s=0.0, decode_chunk=8, **config):
    tokenizer = PieceTokenizer(PIECES, eos=EOS)
    settings = RolloutSettings(
        **{
            **dict(
                initial_rollouts=3,
                expansion_iterations=2,
                beam_size=2,
                samples_per_tree=7,
                max_prompt_len=4,
                max_response_len=60,
                observation_margin=2,
                tool_workers=4,
            ),
            **config,
        }
    )
    toolbox = Toolbox([SlowTool(max_delay_s)])
    model = logit_table_model(branching_table())
    engine = Engine(
        model,
        num_slots=num_slots,
        max_len=64,
        eos_token_ids=[EOS],
        sampling=SamplingParams(),
        stop_strings=toolbox.stop_strings,
        decode=tokenizer.decode,
        decode_chunk=decode_chunk,
        kv_bucket=16,
        page_size=4,
        kv_pages=kv_pages,
    )
    search = TreeSearch(engine, tokenizer, toolbox, settings, eos_token_id=EOS, seed=5)
    return search, nnx.state(model)


PROMPTS = [[Q], [R, Q], [Q], [R], [Q, Q]]


def describe(trees):
    """Everything a tree is made of, for exact comparison (log-probs to 1e-6)."""
    out = []
    for tree in trees:
        nodes = [
            (n.index, n.parent, n.depth, n.tokens, n.loss_mask, n.finish, n.is_leaf, n.branch_of)
            for n in tree.nodes
        ]
        log_probs = [np.round(n.log_probs, 6).tolist() for n in tree.nodes]
        out.append((tree.tree_id, nodes, log_probs, tree.picks, tree.round_sizes))
    return out


def test_trees_do_not_depend_on_pool_size_batch_size_or_tool_timing():
    search, params = search_with()
    trees, stats = search.run(params, PROMPTS, step=2)
    want = describe(trees)
    assert search.engine.pages.used == 0  # every page returned
    peak = stats.kv_tokens_peak // 4
    assert sum(n.branch_of is not None for t in trees for n in t.nodes) == 4 * len(PROMPTS)

    variants = [
        dict(kv_pages=peak // 2 + 1),  # half the pool: trees wait to be admitted (or are preempted)
        dict(num_slots=8),  # one tree at a time (1 + 7 sequences)
        dict(max_delay_s=0.03),  # tool results return in a random order
        dict(max_delay_s=0.03, kv_pages=peak // 2 + 1, decode_chunk=3),
        dict(max_delay_s=0.03, tool_rejoin_chunks=3),  # results rejoin 3 chunks after the call
    ]
    for kwargs in variants:
        other, params = search_with(**kwargs)
        got_trees, got_stats = other.run(params, PROMPTS, step=2)
        assert describe(got_trees) == want, kwargs
        assert other.engine.pages.used == 0, kwargs
        if "kv_pages" in kwargs:
            assert got_stats.kv_tokens_peak <= (peak // 2) * 4
            assert got_stats.kv_pool_waits + got_stats.preemptions > 0


def test_rollout_metrics_report_occupancy_memory_and_overlap():
    search, params = search_with(max_delay_s=0.02)
    rollout = search.rollout(params, PROMPTS, step=0)
    m = rollout.metrics
    assert 0.0 < m["schedule/decode_occupancy"] <= 1.0
    # Shared prefixes and finished-chain pages only: far below one full sequence per live slot.
    assert 0 < m["schedule/kv_tokens_peak"] < m["schedule/kv_tokens_dense_equivalent"]
    assert 0.0 <= m["schedule/tool_overlap"] <= 1.0
    assert 0.0 < m["schedule/kv_reads_shared"] < 1.0  # chains of a tree share the prompt's pages
    assert m["time/tools_s"] > 0.0
    assert search.engine.pages.used == 0


def test_a_pool_too_small_for_one_tree_says_which_setting_to_raise():
    search, params = search_with(kv_pages=4)
    with pytest.raises(KVPoolExhausted, match="rollout.kv_pages"):
        search.run(params, [[Q]], step=0)


def test_interval_overlap():
    assert interval_overlap([(0, 2), (1, 3), (5, 6)], [(2.5, 5.5)]) == (4.0, 1.0)
    assert interval_overlap([], [(0, 1)]) == (0.0, 0.0)
    assert interval_overlap([(0, 1)], []) == (1.0, 0.0)
