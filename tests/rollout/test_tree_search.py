"""Tree search with a scripted Markov policy (controlled entropies) and scripted tools."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import pytest
from flax import nnx

from atpo_jax import kernels
from atpo_jax.rollout.engine import Engine
from atpo_jax.rollout.sampling import SamplingParams
from atpo_jax.rollout.settings import RolloutSettings
from atpo_jax.rollout.tree_search import TOOL_FAILURE_TEXT, TreeSearch
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.parsing import CALL_LIMIT_WARNING
from atpo_jax.tools.toolbox import Toolbox
from tests.rollout.scripted import PieceTokenizer, logit_table_model

PIECES = [
    "<eos>",  # 0
    "Q",  # 1  prompt
    "<search>",  # 2
    " q",  # 3
    "</search>",  # 4  stop string
    " <result>",  # 5  observation pieces: never sampled
    "\n",  # 6
    "doc",  # 7
    "</result>",  # 8
    " <answer>",  # 9
    " a",  # 10
    "</answer>",  # 11
    " Z",  # 12 filler
    CALL_LIMIT_WARNING,  # 13
    TOOL_FAILURE_TEXT,  # 14
    "R",  # 15 a second prompt token
]
EOS, Q, SEARCH, QUERY, CLOSE, ANSWER, FILLER, WARN, R = 0, 1, 2, 3, 4, 9, 12, 13, 15
OBSERVATION = {5, 6, 7, 8, 14}
INSERTED = OBSERVATION | {13}  # observations and the call-limit warning: never sampled
SHARP = 40.0


def table(**rows):
    """Logit table: every row deterministic unless overridden with {next_id: logit}."""
    t = np.full((len(PIECES), len(PIECES)), -SHARP, np.float32)
    chain = {
        EOS: EOS,
        Q: SEARCH,
        R: SEARCH,
        SEARCH: QUERY,
        QUERY: CLOSE,
        CLOSE: EOS,
        8: ANSWER,  # after "</result>": answer
        ANSWER: 10,
        10: 11,
        11: EOS,
        FILLER: FILLER,
        WARN: ANSWER,
    }
    for a, b in chain.items():
        t[a, b] = 0.0
    for a, choices in rows.items():
        a = int(a)
        t[a] = -SHARP
        for b, logit in choices.items():
            t[a, b] = logit
    return t


class ScriptedTool:
    """A search tool that answers "doc" (or fails) and counts its calls; with ``release`` (an
    event) a call blocks until the test sets it."""

    tag = "search"

    def __init__(self, ok=True, release: threading.Event | None = None):
        self.ok, self.release, self.calls, self.finished = ok, release, [], 0

    def run(self, content):
        self.calls.append(content)
        if self.release is not None:
            self.release.wait(timeout=60)
        self.finished += 1
        if not self.ok:
            return ToolResult(ok=False, text="", status="error", error="retriever down")
        return ToolResult(ok=True, text="doc", status="ok")


@dataclasses.dataclass
class Scripted:
    """A tree search and the parameters of its scripted policy (passed to every rollout)."""

    search: TreeSearch
    params: Any

    @property
    def engine(self) -> Engine:
        return self.search.engine

    def run(self, prompts, step, tree_ids=None):
        return self.search.run(self.params, prompts, step, tree_ids)

    def rollout(self, prompts, step, tree_ids=None):
        return self.search.rollout(self.params, prompts, step, tree_ids)


def make_search(
    logits, *, tool=None, num_slots=64, max_len=64, seed=0, tool_timeout_s=120.0, **config
):
    tokenizer = PieceTokenizer(PIECES, eos=EOS)
    defaults = dict(
        initial_rollouts=3,
        expansion_iterations=2,
        beam_size=2,
        samples_per_tree=7,
        max_prompt_len=4,
        max_response_len=max_len - 4,
        observation_margin=2,
    )
    defaults.update(config)
    settings = RolloutSettings(**defaults)
    toolbox = Toolbox([tool or ScriptedTool()])
    model = logit_table_model(logits)
    engine = Engine(
        model,
        num_slots=num_slots,
        max_len=max_len,
        eos_token_ids=[EOS],
        sampling=SamplingParams(),
        stop_strings=toolbox.stop_strings,
        decode=tokenizer.decode,
        decode_chunk=8,
        kv_bucket=16,
    )
    search = TreeSearch(
        engine, tokenizer, toolbox, settings, eos_token_id=EOS, seed=seed,
        tool_timeout_s=tool_timeout_s,
    )  # fmt: skip
    return Scripted(search, nnx.state(model))


def branching_table():
    """First turns are sure to search; after a result the policy hesitates (search or answer)."""
    return table(**{"8": {SEARCH: 0.0, ANSWER: 0.0}})


def test_tree_shape_rows_and_token_in_token_out():
    search = make_search(branching_table())
    captured = {}
    release = search.engine.release

    def capture(slots):
        for s in np.atleast_1d(slots).tolist():
            captured[s] = search.engine.tokens(s)
        release(slots)

    search.engine.release = capture
    out = search.rollout([[Q], [R, Q]], step=0)
    rows, nodes = out.rows, out.nodes
    assert rows.response_tokens.shape == (14, 60)
    np.testing.assert_array_equal(rows.tree_index, np.repeat([0, 1], 7))
    for tree_idx, tree in enumerate(out.trees):
        assert len(tree.leaves()) == 3 + 2 * 2
        valid = nodes.valid[tree_idx]
        parents = nodes.parent[tree_idx][valid]
        assert parents[0] == -1 and np.all(parents[1:] < np.arange(1, valid.sum()))
    sequences = []
    for r, row in enumerate(out.row_info):
        tree = out.trees[row.tree]
        path = tree.path(tree.leaves()[r % 7])
        assert [tree.live_nodes().index(i) for i in path][-1] == row.leaf
        tokens = [t for i in path for t in tree.nodes[i].tokens]
        n = len(tokens)
        np.testing.assert_array_equal(rows.response_tokens[r, :n], tokens)
        assert np.all(rows.token_node[r, n:] == -1) and np.all(rows.loss_mask[r, n:] == 0)
        # Loss mask is 1 exactly on sampled tokens (inserted pieces are never sampled).
        sampled = ~np.isin(rows.response_tokens[r, :n], list(INSERTED))
        np.testing.assert_array_equal(rows.loss_mask[r, :n], sampled.astype(int))
        assert np.all(rows.sampled_log_probs[r, :n][sampled] <= 0)
        assert np.all(rows.sampled_log_probs[r, :n][~sampled] == 0)
        assert out.texts[r] == PieceTokenizer(PIECES).decode(tokens, skip_special_tokens=True)
        sequences.append(tree.prompt + tokens)
    # Token-in/token-out: every row is byte for byte what one chain's engine slot held (each chain
    # ends in one leaf; the other slots held the prompts).
    held = sorted(captured.values())
    prompts = [[Q]] * 1 + [[R, Q]]
    assert held == sorted(sequences + prompts)


def test_selection_follows_the_kernel_on_each_round():
    search = make_search(branching_table(), expansion_penalty=0.0625)
    trees, _ = search.run([[Q], [R, Q], [Q]], step=3)
    for tree in trees:
        assert len(tree.picks) == 2
        for round_, (picks, size) in enumerate(zip(tree.picks, tree.round_sizes, strict=True)):
            # The tree as it stood when the round picked, in BFS order (the reference's tie order).
            order = [i for i in tree.bfs_order() if i < size]
            pos = {i: k for k, i in enumerate(order)}
            nodes = [tree.nodes[i] for i in order]
            parent = np.array([[-1 if n.parent < 0 else pos[n.parent] for n in nodes]])
            is_leaf = np.array([[n.is_leaf for n in nodes]])
            entropy = np.array([[n.entropy for n in nodes]], np.float32)
            valid = np.ones_like(is_leaf)
            want = kernels.select_expansion_nodes(
                parent, is_leaf, entropy, valid, k=2, penalty=0.0625
            )
            assert picks == [order[k] for k in np.asarray(want)[0]]
            scores = np.asarray(
                kernels.expansion_scores(parent, is_leaf, entropy, valid, penalty=0.0625)
            )[0]
            assert tree.scores[round_] == pytest.approx(
                {order[k]: float(v) for k, v in enumerate(scores) if np.isfinite(v)}
            )


def test_branches_keep_the_picks_observation_and_resample_the_turn():
    search = make_search(branching_table())
    # Step 1: a draw in which, at each round, at least beam_size (2) deeper turns are candidates
    # (each tool child searches again with probability 1/2); checked below.
    trees, stats = search.run([[Q]], step=1)
    tree = trees[0]
    branches = [n for n in tree.nodes if n.branch_of is not None]
    assert len(branches) == 4
    for size in tree.round_sizes:
        deeper = [n for n in tree.nodes[:size] if n.depth >= 1 and not n.is_leaf]
        assert len(deeper) >= 2
    # First turns are deterministic (entropy ~0, penalty 2 x 0.05); tool children hesitate (entropy
    # ln 2 / turn length), so the deeper turns are picked.
    assert all(tree.nodes[b.branch_of].depth >= 1 for b in branches)
    assert stats.picks_by_depth[0] == 0
    for b in branches:
        picked = tree.nodes[b.branch_of]
        assert b.parent == picked.parent  # a sibling of the pick
        assert b.tokens[: b.obs_len] == picked.tokens[: picked.obs_len]  # same observation
        assert b.obs_len == picked.obs_len > 0
        assert b.calls_at_start == picked.calls_at_start  # the tool-call count is restored
        assert b.depth == picked.depth


def test_a_root_pick_starts_a_fresh_chain():
    # Nobody searches: every first turn answers, so the root is the only candidate.
    search = make_search(table(**{str(Q): {ANSWER: 0.0}}))
    trees, stats = search.run([[Q]], step=0)
    tree = trees[0]
    assert tree.picks == [[0, 0], [0, 0]]
    assert stats.picks_by_depth[0] == 4
    for node in tree.nodes[4:]:
        assert node.parent == 0 and node.obs_len == 0 and node.branch_of == 0
        assert node.tokens == [ANSWER, 10, 11, EOS]


def test_call_limit_inserts_a_masked_warning_and_continues():
    tool = ScriptedTool()
    # After a result the policy always searches again: only the call limit stops it.
    search = make_search(
        table(**{"8": {SEARCH: 0.0}}),
        tool=tool,
        call_limit=2,
        max_len=96,
        expansion_iterations=0,
        samples_per_tree=3,
    )
    out = search.rollout([[Q]], step=0)
    assert len(tool.calls) == 3 * 2  # two calls per chain, the third is not executed
    for r in range(3):
        tokens = out.rows.response_tokens[r]
        mask = out.rows.loss_mask[r]
        where = int(np.flatnonzero(tokens == WARN)[0])
        assert mask[where] == 0
        assert tokens[where - 1] == CLOSE  # the 3rd call's closing tag, then the warning
        assert tokens[where + 1 : where + 5].tolist() == [ANSWER, 10, 11, EOS]
        assert out.row_info[r].finish == "eos" and out.row_info[r].tool_calls == 2
    assert out.metrics["rollout/call_limit_hits"] == 3


def test_tool_failure_ends_the_chain_after_the_closing_tag():
    search = make_search(
        branching_table(), tool=ScriptedTool(ok=False), expansion_iterations=0, samples_per_tree=3
    )
    out = search.rollout([[Q]], step=0)
    for r in range(3):
        assert out.rows.response_tokens[r, :4].tolist() == [SEARCH, QUERY, CLOSE, 0]
        assert out.row_info[r].length == 3 and out.row_info[r].finish == "tool_failure"
    assert out.metrics["rollout/tool_failures"] == 3


def test_tool_failure_can_insert_an_error_observation():
    search = make_search(
        branching_table(),
        tool=ScriptedTool(ok=False),
        expansion_iterations=0,
        samples_per_tree=3,
        tool_failure="error_text",
        call_limit=1,
    )
    out = search.rollout([[Q]], step=0)
    row = out.rows.response_tokens[0]
    assert 14 in row.tolist()  # the failure note is the observation, with mask 0
    assert out.rows.loss_mask[0][row == 14].tolist() == [0]


def test_real_retriever_down_fails_fast_and_never_hangs():
    from atpo_jax.tools.http_retriever import HttpRetriever, RetryPolicy
    from atpo_jax.tools.search import SearchTool

    retriever = HttpRetriever(
        "http://127.0.0.1:9/retrieve",  # discard port: nothing listens
        retry=RetryPolicy(
            max_attempts=2, backoff_initial_s=0.01, connect_timeout_s=0.5, read_timeout_s=0.5
        ),
    )
    try:
        search = make_search(
            branching_table(),
            tool=SearchTool(retriever),
            expansion_iterations=0,
            samples_per_tree=3,
        )
        out = search.rollout([[Q]], step=0)
        assert all(row.finish == "tool_failure" for row in out.row_info)
    finally:
        retriever.close()


def test_stuck_tool_counts_as_failed_after_its_deadline():
    release = threading.Event()
    tool = ScriptedTool(release=release)
    search = make_search(
        branching_table(),
        tool=tool,
        expansion_iterations=0,
        initial_rollouts=2,
        samples_per_tree=2,
        tool_timeout_s=0.2,
    )
    try:
        out = search.rollout([[Q]], step=0)
        # The rollout returned while both calls were still blocked: it did not wait for them.
        assert len(tool.calls) == 2 and tool.finished == 0
    finally:
        release.set()
    assert out.metrics["rollout/tool_timeouts"] == 2
    assert all(row.finish == "tool_failure" for row in out.row_info)


def test_empty_tool_content_appends_a_trained_eos_and_ends_the_chain():
    search = make_search(
        table(**{str(SEARCH): {CLOSE: 0.0}}), expansion_iterations=0, samples_per_tree=2
    )
    out = search.rollout([[Q]], step=0)
    np.testing.assert_array_equal(out.rows.response_tokens[0, :4], [SEARCH, CLOSE, EOS, 0])
    np.testing.assert_array_equal(out.rows.loss_mask[0, :4], [1, 1, 1, 0])
    assert out.row_info[0].finish == "empty_call" and out.row_info[0].tool_calls == 1
    leaf = make_search(
        table(**{str(SEARCH): {CLOSE: 0.0}}),
        expansion_iterations=0,
        samples_per_tree=2,
        empty_call="leaf",
    ).rollout([[Q]], step=0)
    np.testing.assert_array_equal(leaf.rows.response_tokens[0, :3], [SEARCH, CLOSE, 0])


def test_a_turn_hitting_the_length_limit_is_a_leaf():
    search = make_search(
        table(**{str(Q): {FILLER: 0.0}}), expansion_iterations=0, samples_per_tree=2, max_len=24
    )
    out = search.rollout([[Q]], step=0)
    assert all(row.finish == "length" and row.length == 20 for row in out.row_info)
    assert np.all(out.rows.response_tokens[:, :20] == FILLER)


def test_same_seed_same_batch_and_different_seeds_differ():
    logits = table(**{"8": {SEARCH: 0.0, ANSWER: 0.3}}, **{str(Q): {SEARCH: 0.5, ANSWER: 0.0}})

    def arrays(seed, step=0):
        out = make_search(logits, seed=seed).rollout([[Q], [R, Q]], step=step)
        return {
            f"{part}.{f.name}": np.asarray(getattr(arrays, f.name))
            for part, arrays in (("rows", out.rows), ("nodes", out.nodes))
            for f in dataclasses.fields(arrays)
        }

    first, again = arrays(0), arrays(0)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name], err_msg=name)
    other = arrays(1)
    names = ("rows.response_tokens", "nodes.parent")
    assert any(not np.array_equal(first[n], other[n]) for n in names)
    tokens = "rows.response_tokens"
    assert not np.array_equal(first[tokens], arrays(0, step=1)[tokens])


def test_random_expansion_picks_distinct_candidates_when_there_are_enough():
    search = make_search(
        branching_table(), expansion_mode="random", beam_size=3, samples_per_tree=9
    )
    trees, _ = search.run([[Q], [Q]], step=0)
    for tree in trees:
        for picks in tree.picks:
            assert len(picks) == 3
        first = tree.picks[0]
        candidates = [
            n.index
            for n in tree.nodes[: min(b.index for b in tree.nodes if b.branch_of is not None)]
            if not n.is_leaf
        ]
        if len(candidates) >= 3:
            assert len(set(first)) == 3
    assert trees[0].picks != trees[1].picks or trees[0].nodes != trees[1].nodes


def test_chain_mode_and_leaf_count_fixing():
    chain = make_search(branching_table(), mode="chain", samples_per_tree=5)
    trees, _ = chain.run([[Q]], step=0)
    assert len(trees[0].leaves()) == 5 and trees[0].picks == []
    assert all(trees[0].nodes[i].branch_of is None for i in range(len(trees[0].nodes)))
    # 3 + 2x2 = 7 leaves grown, 5 kept (random pruning) or 9 (duplication of the last BFS leaf).
    pruned = make_search(branching_table(), samples_per_tree=5).rollout([[Q]], step=0)
    assert pruned.rows.response_tokens.shape[0] == 5 and len(pruned.trees[0].leaves()) == 5
    grown = make_search(branching_table(), samples_per_tree=9).rollout([[Q]], step=0)
    leaves = grown.trees[0].leaves()
    assert len(leaves) == 9
    last, copy = grown.trees[0].nodes[leaves[-2]], grown.trees[0].nodes[leaves[-1]]
    assert copy.tokens == last.tokens and copy.parent == last.parent


def test_waves_respect_the_slot_pool_and_bad_configs_are_rejected():
    search = make_search(branching_table(), num_slots=8)  # 1 + 7 slots: one tree per wave
    out = search.rollout([[Q], [R], [Q]], step=0)
    assert out.rows.response_tokens.shape[0] == 21
    assert search.engine.free_slots() == list(range(8))  # everything released
    with pytest.raises(ValueError, match="num_slots"):
        make_search(branching_table(), num_slots=4)
    with pytest.raises(ValueError, match="expansion_mode"):
        RolloutSettings(expansion_mode="greedy")
    with pytest.raises(ValueError, match="max_prompt_len"):
        make_search(branching_table()).run([[Q] * 9], step=0)
