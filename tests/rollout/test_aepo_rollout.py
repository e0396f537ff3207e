"""AEPO's chain rollout (``rollout.mode='aepo'``, ALGORITHM.md §5) run by the scheduler.

A scripted policy (a real CausalLM whose next-token logits depend only on the current token)
makes every quantity hand-computable: the engine's top-k entries are the table's rows, the
branching entropy H of each call is a sum of known row entropies, and with the branching
threshold at 0 (every draw copies) or 1 (none does) the trees' shapes follow from the rules
alone: copies fill the room n − chains in chain order; with no copies, a prompt gets one fresh
chain per round once it has no active chain.
"""

from __future__ import annotations

import math
import random
import threading
import time

import numpy as np
import pytest
from flax import nnx

from atpo_jax.rollout import aepo
from atpo_jax.rollout.engine import Engine
from atpo_jax.rollout.sampling import SamplingParams
from atpo_jax.rollout.settings import RolloutSettings
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.toolbox import Toolbox
from tests.rollout.scripted import PieceTokenizer, logit_table_model

PIECES = [
    "<eos>",  # 0
    "Q",  # 1 prompt
    "<search>",  # 2 the first turn's tag: its next token is uncertain
    " q",  # 3 query pieces (both lead to the closing tag)
    " p",  # 4
    "</search>",  # 5 stop string
    " <result>",  # 6 observation pieces (never sampled)
    "\n",  # 7
    "doc",  # 8
    "</result>",  # 9
    "<search>",  # 10 the same text after a result: its next token is sure
    " <answer>",  # 11
    "</answer>",  # 12
]
EOS, Q, SEARCH, QUERY, QUERY_P, CLOSE, RESULT_END, SEARCH_AGAIN = 0, 1, 2, 3, 4, 5, 9, 10
SHARP = 40.0
P_QUERY = 0.75  # P(" q" | "<search>") on the first turn; " p" otherwise


def table() -> np.ndarray:
    t = np.full((len(PIECES), len(PIECES)), -SHARP, np.float32)
    for a, b in {
        EOS: EOS,
        Q: SEARCH,
        QUERY: CLOSE,
        QUERY_P: CLOSE,
        CLOSE: EOS,
        RESULT_END: SEARCH_AGAIN,  # after a result: always search again
        SEARCH_AGAIN: QUERY,
    }.items():
        t[a, b] = 0.0
    t[SEARCH, QUERY] = math.log(P_QUERY)
    t[SEARCH, QUERY_P] = math.log(1 - P_QUERY)
    return t


class Tool:
    tag = "search"

    def __init__(self, max_delay_s: float = 0.0):
        self.max_delay_s, self.lock, self.calls = max_delay_s, threading.Lock(), 0

    def run(self, content):
        with self.lock:
            self.calls += 1
        if self.max_delay_s:
            time.sleep(random.uniform(0.0, self.max_delay_s))  # unseeded: timing varies
        return ToolResult(ok=True, text="doc", status="ok")


def make_search(*, top_logprobs=10, num_slots=64, kv_pages=0, max_delay_s=0.0, **config):
    from atpo_jax.rollout.tree_search import TreeSearch

    tokenizer = PieceTokenizer(PIECES, eos=EOS)
    tokenizer._by_text["<search>"] = SEARCH  # encoding never needs the second id
    settings = RolloutSettings(
        **{
            **dict(
                mode="aepo",
                initial_rollouts=2,
                beam_size=2,
                samples_per_tree=7,
                call_limit=3,
                call_limit_rule="eos",
                max_prompt_len=4,
                max_response_len=90,
                observation_margin=2,
                tool_workers=4,
                aepo_entropy_positions=20,
            ),
            **config,
        }
    )
    toolbox = Toolbox([Tool(max_delay_s)])
    model = logit_table_model(table())
    engine = Engine(
        model,
        num_slots=num_slots,
        max_len=96,
        eos_token_ids=[EOS],
        sampling=SamplingParams(),
        stop_strings=toolbox.stop_strings,
        decode=tokenizer.decode,
        decode_chunk=4,
        kv_bucket=16,
        page_size=4,
        kv_pages=kv_pages,
        top_logprobs=top_logprobs,
        top_logprobs_positions=settings.aepo_entropy_positions,
    )
    search = TreeSearch(engine, tokenizer, toolbox, settings, eos_token_id=EOS, seed=3)
    return search, nnx.state(model)


def row_entropy(row: np.ndarray) -> float:
    """−Σ p log p of softmax(row) over its 10 largest entries (the returned top-k)."""
    logp = row - np.logaddexp.reduce(row.astype(np.float64))
    top = np.sort(logp)[::-1][:10]
    return float(-np.sum(np.exp(top) * top))


# H of a first turn ("<search>" then a query piece then "</search>": the uncertain row is
# "<search>"'s) and of a later turn (every row sure), by hand from the table.
H_FIRST_TURN = sum(row_entropy(table()[a]) for a in (Q, SEARCH, QUERY)) / math.log(len(PIECES))
H_LATER_TURN = sum(row_entropy(table()[a]) for a in (RESULT_END, SEARCH_AGAIN, QUERY)) / math.log(
    len(PIECES)
)


def test_hand_computed_entropies_are_what_the_test_assumes():
    binary = -(P_QUERY * math.log(P_QUERY) + (1 - P_QUERY) * math.log(1 - P_QUERY))
    assert math.isclose(H_FIRST_TURN, binary / math.log(len(PIECES)), rel_tol=1e-6)
    assert abs(H_LATER_TURN) < 1e-12


def test_the_engine_returns_the_sampling_distributions_top_k():
    search, params = make_search(top_logprobs=3)
    engine = search.engine
    [slot] = engine.allocate(1)
    engine.prefill(params, slot, [Q])
    rng = np.random.default_rng(0)
    import jax

    [gen] = engine.generate(params, [slot], [10], jax.random.key(int(rng.integers(1 << 30))))
    assert gen.tokens[-1] == CLOSE and gen.finish_reason == "stop"
    previous = [Q] + gen.tokens[:-1]
    assert len(gen.top_ids) == len(gen.tokens) == 3
    for a, ids, lps in zip(previous, gen.top_ids, gen.top_log_probs, strict=True):
        row = table()[a].astype(np.float64)
        logp = row - np.logaddexp.reduce(row)
        order = np.argsort(-logp, kind="stable")[:3]
        np.testing.assert_allclose(lps, logp[order], rtol=1e-5, atol=1e-6)
        assert ids[0] == order[0]  # ties beyond the first are in any order
    engine.release([slot])


def test_top_entries_stop_at_the_positions_asked_for():
    search, params = make_search(top_logprobs=2)
    engine = search.engine
    engine.top_logprobs_positions = 2
    [slot] = engine.allocate(1)
    engine.prefill(params, slot, [Q])
    import jax

    [gen] = engine.generate(params, [slot], [10], jax.random.key(1))
    assert len(gen.tokens) == 3 and len(gen.top_ids) == 2 and len(gen.top_log_probs[0]) == 2
    engine.release([slot])


def spy_plans(monkeypatch):
    """Records every ``aepo.plan_round`` call's inputs and result."""
    calls = []
    real = aepo.plan_round

    def spy(**kwargs):
        plan = real(**kwargs)
        calls.append((kwargs, plan))
        return plan

    monkeypatch.setattr(aepo, "plan_round", spy)
    return calls


def test_every_draw_copies_until_the_prompt_has_n_chains(monkeypatch):
    # Threshold 0: every draw makes a copy. Initial 2 chains; round 1: both copy (4 chains);
    # round 2: the 4 active chains copy in order while room lasts (3 more: 7 = n); after that
    # nothing. Every chain searches until the call limit (3 calls, the 4th gets EOS).
    calls = spy_plans(monkeypatch)
    search, params = make_search(aepo_branch_threshold=0.0)
    rollout = search.rollout(params, [[Q], [Q]], step=1)
    for tree in rollout.trees:
        assert len(tree.leaves()) == 7
        copies = [n for n in tree.nodes if n.branch_of is not None]
        assert len(copies) == 5
        for copy in copies:  # a sibling with the same observation as the chain it copies
            source = tree.nodes[copy.branch_of]
            assert copy.parent == source.parent and copy.depth == source.depth
            assert copy.tokens[: copy.obs_len] == source.tokens[: source.obs_len]
            assert copy.obs_len == source.obs_len > 0 and copy.depth >= 1
        # Round 1 copies are at depth 1 (after the first result), round 2 copies at depth 2.
        assert sorted(n.depth for n in copies) == [1, 1, 2, 2, 2]
        # Every leaf made 3 calls and ended with the EOS of the call limit.
        for i in tree.leaves():
            path = tree.path(i)
            assert len(path) == 4 and tree.nodes[i].finish == "call_limit"
    assert rollout.metrics["rollout/branch_copies"] == 10
    assert rollout.metrics["rollout/fresh_chains"] == 0
    assert search.engine.pages.used == 0
    # The entropies the rounds saw, by hand: round 1 both chains at their first call; round 2
    # the originals rose from the first turn's H to a later turn's, the copies are at their
    # first call after the copy (a later turn: both values equal).
    first_rounds = [kw for kw, _ in calls if kw["chains"] == [2]]
    assert len(first_rounds) == 2
    for kw in first_rounds:
        np.testing.assert_allclose(kw["h_now"], [H_FIRST_TURN] * 2, rtol=1e-5)
        np.testing.assert_allclose(kw["h_first"], [H_FIRST_TURN] * 2, rtol=1e-5)
    second_rounds = [kw for kw, _ in calls if kw["chains"] == [4]]
    assert len(second_rounds) == 2
    for kw in second_rounds:
        np.testing.assert_allclose(kw["h_now"], [H_LATER_TURN] * 4, atol=1e-6)
        np.testing.assert_allclose(
            kw["h_first"], [H_FIRST_TURN, H_FIRST_TURN, H_LATER_TURN, H_LATER_TURN], atol=1e-6
        )
        assert list(kw["consecutive"]) == [1]


def test_no_copies_means_one_fresh_chain_per_round_once_none_is_active():
    # Threshold 1 with no entropy weight: u < 1 never reaches it. The 2 initial chains run to
    # the call limit, then fresh chains start from the prompt one at a time until n = 7.
    search, params = make_search(aepo_branch_threshold=1.0, aepo_entropy_weight=0.0)
    rollout = search.rollout(params, [[Q]], step=0)
    [tree] = rollout.trees
    first_turns = [n for n in tree.nodes if n.parent == 0]
    assert len(first_turns) == 7 and len(tree.leaves()) == 7
    assert all(n.branch_of is None for n in tree.nodes)
    assert rollout.metrics["rollout/fresh_chains"] == 5
    assert rollout.metrics["rollout/branch_copies"] == 0
    assert search.engine.pages.used == 0


def test_exact_entropy_gives_the_same_h_here(monkeypatch):
    calls = spy_plans(monkeypatch)
    search, params = make_search(top_logprobs=0, aepo_entropy="exact")
    search.run(params, [[Q]], step=0)
    first = next(kw for kw, _ in calls if kw["chains"] == [2])
    # The exact entropy of each row also counts the 11 entries beyond the top-k's 10: e^-40
    # terms, far below the tolerance.
    np.testing.assert_allclose(first["h_now"], [H_FIRST_TURN] * 2, rtol=1e-5)


def test_topk_entropy_needs_an_engine_that_returns_entries():
    search, params = make_search(top_logprobs=0)
    with pytest.raises(ValueError, match="top_logprobs"):
        search.run(params, [[Q]], step=0)


def describe(trees):
    return [
        (
            t.tree_id,
            [
                (n.index, n.parent, n.depth, n.tokens, n.loss_mask, n.finish, n.branch_of)
                for n in t.nodes
            ],
            [np.round(n.log_probs, 6).tolist() for n in t.nodes],
        )
        for t in trees
    ]


def test_aepo_trees_do_not_depend_on_pool_size_batch_size_or_tool_timing():
    # The reference's branching threshold with a strong entropy weight, so that draws and
    # entropies both matter.
    prompts = [[Q], [Q, Q], [Q]]
    config = dict(aepo_entropy_weight=2.0)
    search, params = make_search(**config)
    trees, stats = search.run(params, prompts, step=4)
    want = describe(trees)
    assert stats.branch_copies > 0
    assert all(len(t.leaves()) == 7 for t in trees)
    peak = stats.kv_tokens_peak // 4
    # One tree at a time (1 + 7 sequences): its peak bounds what a smaller pool must hold.
    one, params = make_search(**config, num_slots=8)
    got, one_stats = one.run(params, prompts, step=4)
    assert describe(got) == want
    single = one_stats.kv_tokens_peak // 4
    assert single < peak
    for kwargs in (
        dict(kv_pages=(single + peak) // 2 + 1),  # trees wait for pages (or are preempted)
        dict(max_delay_s=0.02),  # tool results return in a random order
    ):
        other, params = make_search(**config, **kwargs)
        got, got_stats = other.run(params, prompts, step=4)
        assert describe(got) == want, kwargs
        assert other.engine.pages.used == 0, kwargs
        if "kv_pages" in kwargs:
            assert got_stats.kv_pool_waits + got_stats.preemptions > 0
