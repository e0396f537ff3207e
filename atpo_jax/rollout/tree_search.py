"""Entropy-guided tree rollout (AT²PO §3.2; ALGORITHM.md §1-§2 with the fixes of DESIGN.md §9).

Per batch of prompts: ``initial_rollouts`` chains per tree, then ``expansion_iterations`` rounds; in
each round every tree picks ``beam_size`` nodes (``kernels.select_expansion_nodes`` or uniformly at
random) and each pick gets a sibling branch that keeps the pick's observation and re-samples its
whole turn, run to completion. Every chain ends in exactly one leaf, so a tree has
``initial_rollouts + expansion_iterations × beam_size`` leaves.

Host/device split: all active nodes of all trees generate together in one batched engine call per
turn; the host applies the turn rules (tool call, call limit, EOS, length), runs the round's tool
calls concurrently, and appends observations with ``Engine.extend``. Branches start with
``Engine.fork`` from any slot holding the pick's prefix (a chain keeps its slot until the end of the
rollout, and a node's slot always holds its prefix), so nothing is re-prefilled.

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

import jax
import numpy as np

from atpo_jax import kernels
from atpo_jax.rollout.batch import RolloutBatch, RowInfo, build_rollout_batch
from atpo_jax.rollout.engine import Engine, Generation
from atpo_jax.rollout.stats import RolloutStats, rollout_metrics
from atpo_jax.rollout.tree import Node, Tree, fix_leaf_count
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.parsing import TurnAction, decide_turn
from atpo_jax.tools.passages import format_observation
from atpo_jax.tools.toolbox import Toolbox

ROLLOUT_MODES = ("tree", "chain")
EXPANSION_MODES = ("entropy", "random")
ENTROPY_ESTIMATORS = ("sampled_nll", "exact")
EMPTY_CALL_RULES = ("eos", "leaf")
TOOL_FAILURE_RULES = ("leaf", "error_text")
# What the reference's chain rollout inserts after a failed tool call (ALGORITHM.md §1.4).
TOOL_FAILURE_TEXT = "Tool(search) returned empty output."


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Tree-rollout settings; defaults are the paper's (ALGORITHM.md §5).

    Attributes:
      mode: ``tree`` (AT²PO) or ``chain`` (``samples_per_tree`` independent chains per prompt, the
        GRPO baselines).
      initial_rollouts, expansion_iterations, beam_size: the tree shape (I, E, B).
      samples_per_tree: leaves kept per tree (pruned or duplicated if I + E·B differs).
      expansion_mode: ``entropy`` or ``random``.
      expansion_penalty: α in score = entropy − α · siblings.
      entropy_estimator: ``sampled_nll`` (mean NLL of the turn's sampled tokens, the paper) or
        ``exact`` (mean exact entropy of the sampling distribution).
      max_prompt_len, max_response_len: token limits (the response budget is per row).
      call_limit: tool calls per chain; later calls get a masked warning and generation continues.
      observation_margin: tool results are cut to leave this many response tokens (reference: 100).
      empty_call: ``eos`` (reference: append EOS with loss mask 1, leaf) or ``leaf`` (just end).
      tool_failure: ``leaf`` (reference tree rollout: end after the closing tag) or ``error_text``
        (reference chain rollout: insert a failure note as the observation and continue).
      tool_timeout_s: per-call deadline for a tool before it counts as failed.
      tool_workers: concurrent tool calls.
      seed: root of all randomness.
    """

    mode: str = "tree"
    initial_rollouts: int = 10
    expansion_iterations: int = 2
    beam_size: int = 6
    samples_per_tree: int = 22
    expansion_mode: str = "entropy"
    expansion_penalty: float = 0.05
    entropy_estimator: str = "sampled_nll"
    max_prompt_len: int = 2000
    max_response_len: int = 6192
    call_limit: int = 6
    observation_margin: int = 100
    empty_call: str = "eos"
    tool_failure: str = "leaf"
    tool_timeout_s: float = 120.0
    tool_workers: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, choices in (
            ("mode", self.mode, ROLLOUT_MODES),
            ("expansion_mode", self.expansion_mode, EXPANSION_MODES),
            ("entropy_estimator", self.entropy_estimator, ENTROPY_ESTIMATORS),
            ("empty_call", self.empty_call, EMPTY_CALL_RULES),
            ("tool_failure", self.tool_failure, TOOL_FAILURE_RULES),
        ):
            if value not in choices:
                raise ValueError(f"rollout.{name}={value!r} is not one of {', '.join(choices)}")
        for name in ("initial_rollouts", "samples_per_tree", "max_prompt_len", "max_response_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("expansion_iterations", "beam_size", "call_limit", "observation_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"rollout.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def initial_chains(self) -> int:
        """Chains started from the prompt before any expansion."""
        return self.samples_per_tree if self.mode == "chain" else self.initial_rollouts

    @property
    def chains_per_tree(self) -> int:
        """Chains (hence leaves) a tree grows before pruning/duplication."""
        if self.mode == "chain":
            return self.samples_per_tree
        return self.initial_rollouts + self.expansion_iterations * self.beam_size

    @property
    def rounds(self) -> int:
        return 0 if self.mode == "chain" else self.expansion_iterations


@dataclasses.dataclass
class Rollout:
    """A finished rollout: device-ready arrays plus what the host needs for rewards and logging."""

    batch: RolloutBatch
    trees: list[Tree]
    rows: list[RowInfo]
    texts: list[str]  # each row's response decoded with special tokens skipped (the reward's input)
    metrics: dict[str, float]


class TreeSearch:
    """Grows AT²PO trees with an :class:`Engine` and a :class:`Toolbox`.

    Args:
      engine: generation engine whose stop strings are the toolbox's closing tags.
      tokenizer: HF tokenizer (``encode`` for observations, ``decode`` for tool-call parsing).
      toolbox: the tools (``toolbox.tags`` are the tool tags).
      config: the rollout settings.
      eos_token_id: the id appended after an empty tool call (rule ``empty_call='eos'``).
      pad_token_id: the id that pads the rows of the batch.
    """

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        toolbox: Toolbox,
        config: RolloutConfig,
        *,
        eos_token_id: int,
        pad_token_id: int = 0,
    ):
        self.engine = engine
        self.pad_token_id = int(pad_token_id)
        self.tokenizer = tokenizer
        self.toolbox = toolbox
        self.config = config
        self.eos_token_id = int(eos_token_id)
        self._encode_cache: dict[str, list[int]] = {}
        self.slots_per_tree = 1 + config.chains_per_tree
        if self.slots_per_tree > engine.num_slots:
            raise ValueError(
                f"one tree needs {self.slots_per_tree} engine slots (1 + chains per tree) but the "
                f"engine has {engine.num_slots}; raise rollout.num_slots"
            )
        needed = config.max_prompt_len + config.max_response_len
        if needed > engine.max_len:
            raise ValueError(
                f"engine max_len {engine.max_len} < rollout.max_prompt_len + max_response_len = {needed}"
            )

    # ------------------------------------------------------------------ public

    def run(
        self, prompts: Sequence[Sequence[int]], step: int, tree_ids: Sequence[int] | None = None
    ) -> tuple[list[Tree], RolloutStats]:
        """Grows one tree per prompt (token ids, chat template applied) for training step ``step``.

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
            if len(tree.prompt) > self.config.max_prompt_len:
                raise ValueError(
                    f"prompt {tree.tree_id} has {len(tree.prompt)} tokens > rollout.max_prompt_len="
                    f"{self.config.max_prompt_len}"
                )
        wave = max(1, self.engine.num_slots // self.slots_per_tree)
        for start in range(0, len(trees), wave):
            self._run_wave(trees[start : start + wave], step, stats)
        for tree in trees:
            fix_leaf_count(tree, self.config.samples_per_tree, self._tree_rng(step, tree, "prune"))
        return trees, stats

    def rollout(
        self, prompts: Sequence[Sequence[int]], step: int, tree_ids: Sequence[int] | None = None
    ) -> Rollout:
        """:meth:`run` plus the padded :class:`RolloutBatch`, decoded responses and metrics."""
        trees, stats = self.run(prompts, step, tree_ids)
        batch, rows = build_rollout_batch(
            trees,
            samples_per_tree=self.config.samples_per_tree,
            max_prompt_len=self.config.max_prompt_len,
            max_response_len=self.config.max_response_len,
            pad_id=self.pad_token_id,
        )
        texts = [
            self.tokenizer.decode(tokens[: row.length].tolist(), skip_special_tokens=True)
            for tokens, row in zip(batch.response_tokens, rows, strict=True)
        ]
        return Rollout(batch, trees, rows, texts, rollout_metrics(trees, rows, stats))

    # ------------------------------------------------------------------ keys

    def _tree_key(self, step: int, tree: Tree) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(self.config.seed), step)
        return jax.random.fold_in(key, tree.tree_id)

    def _node_key(self, step: int, tree: Tree, node: Node) -> jax.Array:
        return jax.random.fold_in(self._tree_key(step, tree), node.index)

    def _tree_rng(
        self, step: int, tree: Tree, purpose: str, round_: int = 0
    ) -> np.random.Generator:
        """A NumPy generator for host-side choices (random expansion, pruning) of one tree."""
        salt = {"expand": 1, "prune": 2}[purpose]
        key = jax.random.fold_in(
            jax.random.fold_in(self._tree_key(step, tree), 2**31 - salt), round_
        )
        return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())

    # ------------------------------------------------------------------ one wave of trees

    def _run_wave(self, trees: list[Tree], step: int, stats: RolloutStats) -> None:
        engine = self.engine
        root_slots = engine.allocate(len(trees))
        engine.prefill_many(root_slots, [t.prompt for t in trees])
        active: list[tuple[Tree, Node]] = []
        srcs, dsts, lengths = [], [], []
        chain_slots = iter(engine.allocate(len(trees) * self.config.initial_chains))
        for tree, root_slot in zip(trees, root_slots, strict=True):
            tree.root.slot = root_slot
            for _ in range(self.config.initial_chains):
                node = tree.add_child(0, depth=0, slot=next(chain_slots), seq_end=len(tree.prompt))
                srcs.append(root_slot)
                dsts.append(node.slot)
                lengths.append(len(tree.prompt))
                active.append((tree, node))
        engine.fork_many(srcs, dsts, lengths)
        self._grow(active, step, stats)
        for round_ in range(self.config.rounds):
            self._grow(self._expand(trees, step, round_, stats), step, stats)
        engine.release([n.slot for t in trees for n in t.nodes if n.slot >= 0 and _owns_slot(t, n)])

    def _expand(self, trees: list[Tree], step: int, round_: int, stats: RolloutStats):
        """Picks ``beam_size`` nodes per tree and creates one re-sampling branch per pick."""
        picks_per_tree = self._pick(trees, step, round_)
        active, srcs, dsts, lengths = [], [], [], []
        new_slots = iter(self.engine.allocate(sum(len(p) for p in picks_per_tree)))
        for tree, picks in zip(trees, picks_per_tree, strict=True):
            tree.picks.append(list(picks))
            tree.round_sizes.append(len(tree.nodes))
            for index in picks:
                picked = tree.nodes[index]
                stats.picks_by_depth[picked.depth] += 1
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
                    slot=next(new_slots),
                    seq_end=parent.seq_end + len(obs),
                    piece_start=len(obs),
                    branch_of=index,
                )
                branch.append(obs, 0)
                srcs.append(picked.slot)
                dsts.append(branch.slot)
                lengths.append(branch.seq_end)
                active.append((tree, branch))
        self.engine.fork_many(srcs, dsts, lengths)
        return active

    def _pick(self, trees: list[Tree], step: int, round_: int) -> list[list[int]]:
        cfg = self.config
        orders = [t.bfs_order() for t in trees]
        if cfg.expansion_mode == "random":
            picks = []
            for tree, order in zip(trees, orders, strict=True):
                candidates = [i for i in order if not tree.nodes[i].is_leaf]
                rng = self._tree_rng(step, tree, "expand", round_)
                replace = len(candidates) < cfg.beam_size
                picks.append(rng.choice(candidates, cfg.beam_size, replace=replace).tolist())
            for tree in trees:
                tree.scores.append({})
            return picks
        # Entropy mode: the selection kernel on the trees in BFS order, so equal scores keep the
        # reference's BFS order (root first); picks are mapped back to creation indices.
        num_nodes = -(-max(len(o) for o in orders) // 16) * 16  # few shapes -> few compiles
        shape = (len(trees), num_nodes)
        parent = np.full(shape, -1, np.int32)
        is_leaf = np.zeros(shape, bool)
        valid = np.zeros(shape, bool)
        entropy = np.zeros(shape, np.float32)
        for b, (tree, order) in enumerate(zip(trees, orders, strict=True)):
            position = {index: k for k, index in enumerate(order)}
            for k, index in enumerate(order):
                node = tree.nodes[index]
                parent[b, k] = -1 if node.parent < 0 else position[node.parent]
                is_leaf[b, k] = node.is_leaf
                valid[b, k] = True
                entropy[b, k] = node.entropy
        kw = dict(penalty=cfg.expansion_penalty)
        scores = np.asarray(_scores(parent, is_leaf, entropy, valid, **kw))
        chosen = np.asarray(_select(parent, is_leaf, entropy, valid, k=cfg.beam_size, **kw))
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

    def _grow(self, active: list[tuple[Tree, Node]], step: int, stats: RolloutStats) -> None:
        """Generates, applies the turn rules and runs tools until every chain has its leaf."""
        cfg = self.config
        while active:
            started = time.perf_counter()
            budgets = [cfg.max_response_len - t.response_length(n.index) for t, n in active]
            keys = jax.numpy.stack([self._node_key(step, t, n) for t, n in active])
            gens = self.engine.generate([n.slot for _, n in active], budgets, keys)
            stats.generate_seconds += time.perf_counter() - started
            stats.generate_calls += 1
            continuing, calls, extends, forced = [], [], [], []
            for (tree, node), gen in zip(active, gens, strict=True):
                stats.generated_tokens += len(gen.tokens)
                self._record_generation(node, gen)
                outcome = self._after_generation(tree, node, gen, stats, extends, forced)
                if outcome == "continue":
                    continuing.append((tree, node))
                elif outcome == "call":
                    calls.append((tree, node))
            started = time.perf_counter()
            results = self._run_tools([(n.query_tag, n.query) for _, n in calls], stats)
            stats.tool_seconds += time.perf_counter() - started
            children = []
            for (tree, node), result in zip(calls, results, strict=True):
                child = self._after_tool(tree, node, result, stats, extends)
                if child is not None:
                    children.append((tree, child))
            if forced:
                # The reference trains an EOS after an empty tool call; score it as if sampled so
                # its behaviour log-prob is known like every other trained token's.
                scored = self.engine.force(
                    [n.slot for n in forced], [self.eos_token_id] * len(forced)
                )
                for node, (log_prob, entropy) in zip(forced, scored, strict=True):
                    node.append([self.eos_token_id], 1, [log_prob], [entropy])
            if extends:
                self.engine.extend_many([s for s, _ in extends], [t for _, t in extends])
            for _, node in continuing + children:
                node.seq_end = self.engine.length(node.slot)
            active = [
                (t, n) for t, n in continuing + children if not self._out_of_room(t, n, stats)
            ]

    def _record_generation(self, node: Node, gen: Generation) -> None:
        node.append(gen.tokens, 1, gen.log_probs, gen.entropies)
        node.seq_end = self.engine.length(node.slot)
        # The branching signal averages over every token the node's turn sampled so far.
        sampled = [i for i, m in enumerate(node.loss_mask) if m and i >= node.obs_len]
        if sampled:
            source = (
                node.log_probs if self.config.entropy_estimator == "sampled_nll" else node.entropies
            )
            values = [source[i] for i in sampled]
            sign = -1.0 if self.config.entropy_estimator == "sampled_nll" else 1.0
            node.entropy = sign * float(np.mean(values))

    def _after_generation(
        self, tree: Tree, node: Node, gen: Generation, stats, extends, forced
    ) -> str:
        """Applies ALGORITHM.md §1.3; returns ``leaf``, ``continue`` or ``call``."""
        cfg = self.config
        if gen.finish_reason == "stop":
            piece = self.tokenizer.decode(node.tokens[node.piece_start :])
            decision = decide_turn(
                piece,
                gen.stop_string,
                tool_tags=self.toolbox.tags,
                calls_made=node.calls_made,
                call_limit=cfg.call_limit,
            )
            if decision.action is TurnAction.CALL:
                node.calls_made = decision.calls_made
                node.query, node.query_tag = decision.query, decision.tag
                return "call"
            if decision.action is TurnAction.EMPTY_CALL:
                stats.empty_calls += 1
                node.calls_made = decision.calls_made
                if (
                    cfg.empty_call == "eos"
                    and tree.response_length(node.index) < cfg.max_response_len
                ):
                    forced.append(node)
                return self._make_leaf(node, "empty_call")
            if decision.action is TurnAction.CALL_LIMIT:
                stats.call_limit_hits += 1
                warning = self._encode(decision.insert_text)
                room = cfg.max_response_len - tree.response_length(node.index)
                if len(warning) >= room:
                    return self._make_leaf(node, "length")
                node.append(warning, 0)
                node.piece_start = len(node.tokens)
                extends.append((node.slot, warning))
                return "continue"
            return self._make_leaf(node, "stop")
        if gen.finish_reason == "eos":
            return self._make_leaf(node, "eos")
        stats.truncated += 1
        return self._make_leaf(node, "length")

    def _after_tool(
        self, tree: Tree, node: Node, result: ToolResult, stats, extends
    ) -> Node | None:
        """Creates the tool child (observation + next turn) or ends the chain on failure."""
        cfg = self.config
        if not result.ok:
            stats.tool_failures += 1
            if cfg.tool_failure == "leaf":
                self._make_leaf(node, "tool_failure")
                return None
            text = TOOL_FAILURE_TEXT
        else:
            text = result.text
        obs = self._encode(format_observation(text))
        room = cfg.max_response_len - tree.response_length(node.index)
        if len(obs) > room:
            # As the reference: an observation that does not fit is cut to leave a margin for the
            # answer; with no room at all the chain ends here.
            obs = obs[: max(0, room - cfg.observation_margin)]
        if not obs:
            self._make_leaf(node, "no_room")
            return None
        node.finish = "tool"
        child = tree.add_child(
            node.index,
            depth=node.depth + 1,
            obs_len=len(obs),
            calls_at_start=node.calls_made,
            calls_made=node.calls_made,
            entropy=node.entropy,  # a child cut before it generates keeps its parent's signal
            slot=node.slot,
            piece_start=len(obs),
        )
        child.append(obs, 0)
        extends.append((node.slot, obs))
        return child

    def _out_of_room(self, tree: Tree, node: Node, stats: RolloutStats) -> bool:
        if tree.response_length(node.index) >= self.config.max_response_len:
            stats.truncated += 1
            self._make_leaf(node, "length")
            return True
        return False

    @staticmethod
    def _make_leaf(node: Node, finish: str) -> str:
        node.is_leaf = True
        node.finish = finish
        return "leaf"

    def _run_tools(self, calls: list[tuple[str, str]], stats: RolloutStats) -> list[ToolResult]:
        """Runs the round's tool calls concurrently; a call past its deadline counts as failed."""
        if not calls:
            return []
        stats.tool_calls += len(calls)
        pool = concurrent.futures.ThreadPoolExecutor(
            min(self.config.tool_workers, len(calls)), thread_name_prefix="rollout-tool"
        )
        try:
            futures = [pool.submit(self.toolbox.run, tag, query) for tag, query in calls]
            done, _ = concurrent.futures.wait(futures, timeout=self.config.tool_timeout_s)
            results = []
            for future in futures:
                if future in done:
                    results.append(future.result())
                else:
                    stats.tool_timeouts += 1
                    results.append(
                        ToolResult(ok=False, text="", status="timeout", error="tool call deadline")
                    )
            return results
        finally:
            # Do not wait for stuck calls: their threads finish (or time out) on their own.
            pool.shutdown(wait=False, cancel_futures=True)

    def _encode(self, text: str) -> list[int]:
        if text not in self._encode_cache:
            self._encode_cache[text] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._encode_cache[text]


def _owns_slot(tree: Tree, node: Node) -> bool:
    """True for the first node that holds a slot (the root or a chain head), so each slot is released once."""
    return node.index == 0 or tree.nodes[node.parent].slot != node.slot


_scores = jax.jit(kernels.expansion_scores, static_argnames=("penalty",))
_select = jax.jit(kernels.select_expansion_nodes, static_argnames=("k", "penalty"))
