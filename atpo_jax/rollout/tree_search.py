"""Entropy-guided tree rollout (AT²PO §3.2; ALGORITHM.md §1-§2 with the fixes of DESIGN.md §9).

Per batch of prompts: ``initial_rollouts`` chains per tree, then ``expansion_iterations`` rounds; in
each round every tree picks ``beam_size`` nodes (``kernels.select_expansion_nodes`` or uniformly at
random) and each pick gets a sibling branch that keeps the pick's observation and re-samples its
whole turn, run to completion. Every chain ends in exactly one leaf, so a tree has
``initial_rollouts + expansion_iterations × beam_size`` leaves.

Host/device split: all active chains of all trees generate together in one batched engine call per
turn; the turn rules (``rollout.turn_rules``: tool call, call limit, EOS, length) decide each
node's fate as a :class:`~atpo_jax.rollout.turn_rules.Decision` that this loop applies; the
round's tool calls run concurrently, and observations are appended with ``Engine.extend_many``.
Branches start with ``Engine.fork_many`` from the slot holding the pick's prefix (a chain keeps its
slot until the end of the wave, and a node's slot always holds its prefix), so nothing is
re-prefilled. The tree records only the turns' content; which slot holds which chain is this
loop's bookkeeping (:class:`Chain`).

Trees are processed in waves sized so that a wave fits the engine's slots (a tree needs one slot for
its prompt and one per chain).

Randomness: the key of every node is ``fold_in(fold_in(fold_in(key(seed), step), tree_id), node)``,
so a rollout is reproducible and a tree does not depend on which other trees share its wave.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from atpo_jax import kernels
from atpo_jax.rollout import turn_rules
from atpo_jax.rollout.engine import Engine, Generation
from atpo_jax.rollout.pack import (
    NodeOrder,
    RowArrays,
    RowInfo,
    TreeArrays,
    pack_rollout,
    pack_trees,
)
from atpo_jax.rollout.settings import EntropyEstimator, ExpansionMode, RolloutSettings
from atpo_jax.rollout.stats import RolloutStats, rollout_metrics
from atpo_jax.rollout.tree import Node, Tree, fix_leaf_count
from atpo_jax.rollout.turn_rules import TOOL_FAILURE_TEXT, Decision, Outcome
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.toolbox import Toolbox

__all__ = ["TOOL_FAILURE_TEXT", "Chain", "Rollout", "TreeSearch"]


@dataclasses.dataclass
class Rollout:
    """A finished rollout: device-ready arrays plus what the host needs for rewards and logging.

    Attributes:
      nodes: the trees' nodes, [B, N] (creation order).
      rows: the leaf rows, [B·S, R].
      trees: the host trees.
      row_info: per row, its tree, leaf, length, tool calls and finish reason.
      texts: each row's response decoded with special tokens skipped (the reward's input).
      metrics: ``rollout/*`` and ``time/*`` scalars.
    """

    nodes: TreeArrays
    rows: RowArrays
    trees: list[Tree]
    row_info: list[RowInfo]
    texts: list[str]
    metrics: dict[str, float]


@dataclasses.dataclass
class Chain:
    """A node that is still growing and the engine slot holding its sequence."""

    tree: Tree
    node: Node
    slot: int


class TreeSearch:
    """Grows AT²PO trees with an :class:`Engine` and a :class:`Toolbox`.

    Args:
      engine: generation engine whose stop strings are the toolbox's closing tags.
      tokenizer: HF tokenizer (``encode`` for observations, ``decode`` for tool-call parsing).
      toolbox: the tools (``toolbox.tags`` are the tool tags).
      settings: the rollout settings.
      seed: root of all randomness.
      tool_timeout_s: per-call deadline for a tool before it counts as failed.
      eos_token_id: the id appended after an empty tool call (rule ``empty_call='eos'``).
      pad_token_id: the id that pads the rows of the batch.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer: Any,
        toolbox: Toolbox,
        settings: RolloutSettings,
        *,
        eos_token_id: int,
        pad_token_id: int = 0,
        seed: int = 0,
        tool_timeout_s: float = 120.0,
    ):
        self.engine = engine
        self.pad_token_id = int(pad_token_id)
        self.tokenizer = tokenizer
        self.toolbox = toolbox
        self.settings = settings
        self.seed = seed
        self.tool_timeout_s = tool_timeout_s
        self.eos_token_id = int(eos_token_id)
        self._encode_cache: dict[str, list[int]] = {}
        self.slots_per_tree = 1 + settings.chains_per_tree
        if self.slots_per_tree > engine.num_slots:
            raise ValueError(
                f"one tree needs {self.slots_per_tree} engine slots (1 + chains per tree) but the "
                f"engine has {engine.num_slots}; raise rollout.num_slots"
            )
        if settings.max_len > engine.max_len:
            raise ValueError(
                f"engine max_len {engine.max_len} < rollout.max_prompt_len + max_response_len = "
                f"{settings.max_len}"
            )

    # ------------------------------------------------------------------ public

    def run(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]],
        step: int,
        tree_ids: Sequence[int] | None = None,
    ) -> tuple[list[Tree], RolloutStats]:
        """Grows one tree per prompt (token ids, chat template applied) for training step ``step``
        with the policy ``params`` (an ``nnx.State``; every generation of the rollout uses it).

        ``tree_ids`` (default 0..B-1) name the trees in the random keys; multi-host runs pass global
        prompt indices so results do not depend on how prompts are split over hosts. Every returned
        tree has exactly ``samples_per_tree`` leaves.
        """
        tree_ids = list(range(len(prompts))) if tree_ids is None else list(tree_ids)
        stats = RolloutStats()
        trees = [
            Tree(tree_id=t, prompt=[int(x) for x in p])
            for t, p in zip(tree_ids, prompts, strict=True)
        ]
        for tree in trees:
            if len(tree.prompt) > self.settings.max_prompt_len:
                raise ValueError(
                    f"prompt {tree.tree_id} has {len(tree.prompt)} tokens > rollout.max_prompt_len="
                    f"{self.settings.max_prompt_len}"
                )
        wave = max(1, self.engine.num_slots // self.slots_per_tree)
        for start in range(0, len(trees), wave):
            _Wave(self, params, step, stats).run(trees[start : start + wave])
        for tree in trees:
            fix_leaf_count(tree, self.settings.samples_per_tree, self.tree_rng(step, tree, "prune"))
        return trees, stats

    def rollout(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]],
        step: int,
        tree_ids: Sequence[int] | None = None,
    ) -> Rollout:
        """:meth:`run` plus the packed arrays, decoded responses and metrics."""
        trees, stats = self.run(params, prompts, step, tree_ids)
        nodes, rows, info = pack_rollout(
            trees,
            samples_per_tree=self.settings.samples_per_tree,
            max_prompt_len=self.settings.max_prompt_len,
            max_response_len=self.settings.max_response_len,
            pad_id=self.pad_token_id,
        )
        texts = [
            self.tokenizer.decode(tokens[: row.length].tolist(), skip_special_tokens=True)
            for tokens, row in zip(rows.response_tokens, info, strict=True)
        ]
        return Rollout(nodes, rows, trees, info, texts, rollout_metrics(trees, info, stats))

    # ------------------------------------------------------------------ keys

    def _tree_key(self, step: int, tree: Tree) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        return jax.random.fold_in(key, tree.tree_id)

    def node_key(self, step: int, tree: Tree, node: Node) -> jax.Array:
        return jax.random.fold_in(self._tree_key(step, tree), node.index)

    def tree_rng(self, step: int, tree: Tree, purpose: str, round_: int = 0) -> np.random.Generator:
        """A NumPy generator for host-side choices (random expansion, pruning) of one tree."""
        salt = {"expand": 1, "prune": 2}[purpose]
        key = jax.random.fold_in(
            jax.random.fold_in(self._tree_key(step, tree), 2**31 - salt), round_
        )
        return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())

    def encode(self, text: str) -> list[int]:
        if text not in self._encode_cache:
            self._encode_cache[text] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._encode_cache[text]


class _Wave:
    """One wave of trees: their slots, their growth, and the slots' release."""

    def __init__(self, search: TreeSearch, params: Any, step: int, stats: RolloutStats):
        self.search, self.engine, self.settings = search, search.engine, search.settings
        self.params, self.step, self.stats = params, step, stats
        self.slot_of: dict[int, int] = {}  # id(node) -> the slot holding its prefix
        self.allocated: list[int] = []

    def _allocate(self, count: int) -> list[int]:
        slots = self.engine.allocate(count)
        self.allocated += slots
        return slots

    def _chain(self, tree: Tree, node: Node, slot: int) -> Chain:
        self.slot_of[id(node)] = slot
        return Chain(tree, node, slot)

    def run(self, trees: list[Tree]) -> None:
        engine, settings = self.engine, self.settings
        root_slots = self._allocate(len(trees))
        engine.prefill_many(self.params, root_slots, [t.prompt for t in trees])
        active: list[Chain] = []
        srcs, dsts, lengths = [], [], []
        chain_slots = iter(self._allocate(len(trees) * settings.initial_chains))
        for tree, root_slot in zip(trees, root_slots, strict=True):
            self.slot_of[id(tree.root)] = root_slot
            for _ in range(settings.initial_chains):
                chain = self._chain(tree, tree.add_child(0, depth=0), next(chain_slots))
                srcs.append(root_slot)
                dsts.append(chain.slot)
                lengths.append(len(tree.prompt))
                active.append(chain)
        engine.fork_many(srcs, dsts, lengths)
        self._grow(active)
        for round_ in range(settings.rounds):
            self._grow(self._expand(trees, round_))
        engine.release(self.allocated)

    # ------------------------------------------------------------------ expansion

    def _expand(self, trees: list[Tree], round_: int) -> list[Chain]:
        """Picks ``beam_size`` nodes per tree and creates one re-sampling branch per pick."""
        picks_per_tree = self._pick(trees, round_)
        active, srcs, dsts, lengths = [], [], [], []
        new_slots = iter(self._allocate(sum(len(p) for p in picks_per_tree)))
        for tree, picks in zip(trees, picks_per_tree, strict=True):
            tree.picks.append(list(picks))
            tree.round_sizes.append(len(tree.nodes))
            for index in picks:
                picked = tree.nodes[index]
                self.stats.picks_by_depth[picked.depth] += 1
                # The branch is a sibling of the pick (a fresh chain when the pick is the root) that
                # keeps the pick's observation and re-samples its whole turn.
                parent = tree.root if index == 0 else tree.nodes[picked.parent]
                obs = picked.tokens[: picked.obs_len]
                branch = tree.add_child(
                    parent.index,
                    depth=picked.depth,
                    obs_len=len(obs),
                    calls_at_start=picked.calls_at_start,
                    calls_made=picked.calls_at_start,
                    entropy=picked.entropy,
                    start=parent.end,
                    piece_start=len(obs),
                    branch_of=index,
                )
                branch.append(obs, 0)
                chain = self._chain(tree, branch, next(new_slots))
                srcs.append(self.slot_of[id(picked)])
                dsts.append(chain.slot)
                lengths.append(len(tree.prompt) + branch.end)
                active.append(chain)
        self.engine.fork_many(srcs, dsts, lengths)
        return active

    def _pick(self, trees: list[Tree], round_: int) -> list[list[int]]:
        settings, search = self.settings, self.search
        if settings.expansion_mode == ExpansionMode.RANDOM:
            picks = []
            for tree in trees:
                candidates = [i for i in tree.bfs_order() if not tree.nodes[i].is_leaf]
                rng = search.tree_rng(self.step, tree, "expand", round_)
                replace = len(candidates) < settings.beam_size
                picks.append(rng.choice(candidates, settings.beam_size, replace=replace).tolist())
                tree.scores.append({})
            return picks
        # Entropy mode: the selection kernel on the trees in BFS order, so equal scores keep the
        # reference's BFS order (root first); picks are mapped back to creation indices.
        nodes, orders = pack_trees(trees, order=NodeOrder.BFS)
        args = (nodes.parent, nodes.is_leaf, nodes.entropy, nodes.valid)
        penalty = settings.expansion_penalty
        scores = np.asarray(_scores(*args, penalty=penalty))
        chosen = np.asarray(_select(*args, k=settings.beam_size, penalty=penalty))
        picks = []
        for b, (tree, order) in enumerate(zip(trees, orders, strict=True)):
            tree.scores.append(
                {
                    order[k]: float(scores[b, k])
                    for k in range(len(order))
                    if np.isfinite(scores[b, k])
                }
            )
            picks.append([order[k] for k in chosen[b]])
        return picks

    # ------------------------------------------------------------------ growing chains

    def _grow(self, active: list[Chain]) -> None:
        """Generates, applies the turn rules and runs tools until every chain has its leaf."""
        search, engine, settings, stats = self.search, self.engine, self.settings, self.stats
        while active:
            started = time.perf_counter()
            budgets = [settings.max_response_len - c.node.end for c in active]
            keys = jax.numpy.stack([search.node_key(self.step, c.tree, c.node) for c in active])
            gens = engine.generate(self.params, [c.slot for c in active], budgets, keys)
            stats.generate_seconds += time.perf_counter() - started
            stats.generate_calls += 1
            continuing, calls, extends, forced = [], [], [], []
            for chain, gen in zip(active, gens, strict=True):
                stats.generated_tokens += len(gen.tokens)
                node = chain.node
                self._record_generation(node, gen)
                decision = turn_rules.after_generation(
                    finish_reason=gen.finish_reason,
                    stop_string=gen.stop_string,
                    piece_text=search.tokenizer.decode(node.tokens[node.piece_start :])
                    if gen.finish_reason == "stop"
                    else "",
                    calls_made=node.calls_made,
                    response_length=node.end,
                    settings=settings,
                    tool_tags=search.toolbox.tags,
                    encode=search.encode,
                )
                self._count(decision)
                node.calls_made = decision.calls_made
                if decision.outcome == Outcome.CALL:
                    node.query, node.query_tag = decision.query, decision.tag
                    calls.append(chain)
                elif decision.outcome == Outcome.CONTINUE:
                    node.append(decision.tokens, 0)
                    node.piece_start = len(node.tokens)
                    extends.append((chain.slot, list(decision.tokens)))
                    continuing.append(chain)
                else:
                    self._end(node, decision)
                    if decision.force_eos:
                        forced.append(chain)
            started = time.perf_counter()
            results = self._run_tools([(c.node.query_tag, c.node.query) for c in calls])
            stats.tool_seconds += time.perf_counter() - started
            children = []
            for chain, result in zip(calls, results, strict=True):
                stats.tool_failures += not result.ok
                node = chain.node
                decision = turn_rules.after_tool(
                    result=result,
                    calls_made=node.calls_made,
                    response_length=node.end,
                    settings=settings,
                    encode=search.encode,
                )
                if decision.outcome == Outcome.LEAF:
                    self._end(node, decision)
                    continue
                node.finish = decision.finish
                child = chain.tree.add_child(
                    node.index,
                    depth=node.depth + 1,
                    obs_len=len(decision.tokens),
                    calls_at_start=node.calls_made,
                    calls_made=node.calls_made,
                    entropy=node.entropy,  # a child cut before it generates keeps this signal
                    start=node.end,
                    piece_start=len(decision.tokens),
                )
                child.append(decision.tokens, 0)
                extends.append((chain.slot, list(decision.tokens)))
                children.append(self._chain(chain.tree, child, chain.slot))
            if forced:
                # The reference trains an EOS after an empty tool call; score it as if sampled so
                # its behaviour log-prob is known like every other trained token's.
                eos = search.eos_token_id
                scored = engine.force(self.params, [c.slot for c in forced], [eos] * len(forced))
                for chain, (log_prob, entropy) in zip(forced, scored, strict=True):
                    chain.node.append([eos], 1, [log_prob], [entropy])
            if extends:
                engine.extend_many(
                    self.params, [slot for slot, _ in extends], [t for _, t in extends]
                )
            active = []
            for chain in continuing + children:
                decision = turn_rules.out_of_room(
                    response_length=chain.node.end,
                    calls_made=chain.node.calls_made,
                    settings=settings,
                )
                if decision.outcome == Outcome.LEAF:
                    self._count(decision)
                    self._end(chain.node, decision)
                else:
                    active.append(chain)

    def _record_generation(self, node: Node, gen: Generation) -> None:
        node.append(gen.tokens, 1, gen.log_probs, gen.entropies)
        # The branching signal averages over every token the node's turn sampled so far.
        sampled = [i for i, m in enumerate(node.loss_mask) if m and i >= node.obs_len]
        if sampled:
            nll = self.settings.entropy_estimator == EntropyEstimator.SAMPLED_NLL
            source = node.log_probs if nll else node.entropies
            node.entropy = (-1.0 if nll else 1.0) * float(np.mean([source[i] for i in sampled]))

    def _count(self, decision: Decision) -> None:
        self.stats.empty_calls += decision.finish == turn_rules.Finish.EMPTY_CALL
        self.stats.call_limit_hits += decision.call_limit_hit
        self.stats.truncated += decision.truncated

    @staticmethod
    def _end(node: Node, decision: Decision) -> None:
        node.is_leaf = True
        node.finish = decision.finish

    def _run_tools(self, calls: list[tuple[str, str]]) -> list[ToolResult]:
        """Runs the round's tool calls concurrently; a call past its deadline counts as failed."""
        if not calls:
            return []
        self.stats.tool_calls += len(calls)
        pool = concurrent.futures.ThreadPoolExecutor(
            min(self.settings.tool_workers, len(calls)), thread_name_prefix="rollout-tool"
        )
        toolbox = self.search.toolbox
        try:
            futures = [pool.submit(toolbox.run, tag, query) for tag, query in calls]
            done, _ = concurrent.futures.wait(futures, timeout=self.search.tool_timeout_s)
            results = []
            for future in futures:
                if future in done:
                    results.append(future.result())
                else:
                    self.stats.tool_timeouts += 1
                    results.append(
                        ToolResult(ok=False, text="", status="timeout", error="tool call deadline")
                    )
            return results
        finally:
            # Do not wait for stuck calls: their threads finish (or time out) on their own.
            pool.shutdown(wait=False, cancel_futures=True)


_scores = jax.jit(kernels.expansion_scores, static_argnames=("penalty",))
_select = jax.jit(kernels.select_expansion_nodes, static_argnames=("k", "penalty"))
