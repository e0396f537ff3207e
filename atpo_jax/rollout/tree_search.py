"""Entropy-guided tree rollout (AT²PO §3.2; ALGORITHM.md §1-§2 with the fixes of DESIGN.md §9),
and the chain baselines' rollouts (``rollout.mode``: ``chain``; ``aepo``, ALGORITHM.md §5).

Per prompt (mode ``tree``): ``initial_rollouts`` chains, then ``expansion_iterations`` rounds; in
each round the tree picks ``beam_size`` nodes (``kernels.select_expansion_nodes`` or uniformly at
random) and each pick gets a sibling branch that keeps the pick's observation and re-samples its
whole turn, run to completion. Every chain ends in exactly one leaf, so a tree has
``initial_rollouts + expansion_iterations × beam_size`` leaves. Mode ``aepo``: chains pause after
each tool round and, once all of a tree's chains are paused or done, ``rollout.aepo.plan_round``
decides the copies (siblings of a chain's current node with its observation) and the fresh chain.

Host/device split: one :class:`_Scheduler` keeps a single decode batch full over all trees (paged
KV cache, continuous batching): the turn rules (``rollout.turn_rules``) decide each node's fate as
a :class:`~atpo_jax.rollout.turn_rules.Decision` that the scheduler applies; tool calls run on a
thread pool while other chains decode; observations are appended with ``Engine.extend_many`` and
branches start with ``Engine.fork_many`` (full pages shared), so nothing is re-prefilled. The tree
records only the turns' content; which slot holds which chain is the scheduler's bookkeeping.

Randomness: every node's key derives from (seed, step, tree, phase, chain ordinal, turn) and host
choices from per-tree generators (:meth:`TreeSearch.tree_rng`), so a rollout is reproducible and a
tree does not depend on the other trees, the pool size, the batch composition or tool timing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import enum
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from atpo_jax import kernels
from atpo_jax.rollout import aepo, host_keys, turn_rules
from atpo_jax.rollout.engine import Engine, EngineCounters, Generation, Turn
from atpo_jax.rollout.pack import (
    NodeOrder,
    RowArrays,
    RowInfo,
    TreeArrays,
    pack_rollout,
    pack_trees,
)
from atpo_jax.rollout.pages import KVPoolExhausted
from atpo_jax.rollout.settings import (
    AEPOEntropy,
    EntropyEstimator,
    ExpansionMode,
    RolloutMode,
    RolloutSettings,
)
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
        self._root_key: tuple[int | None, np.ndarray | None] = (None, None)
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
        _Scheduler(self, params, step, stats).run(trees)
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

    def _tree_key(self, step: int, tree: Tree) -> np.ndarray:
        """The tree's key data ([2] uint32: ``fold_in(fold_in(key(seed), step), tree_id)``),
        derived on the host (:mod:`atpo_jax.rollout.host_keys`)."""
        if self._root_key[0] != self.seed:
            self._root_key = (self.seed, host_keys.key_data(jax.random.key(self.seed)))
        return host_keys.fold_in_path(self._root_key[1], step, tree.tree_id)

    def node_key(self, step: int, tree: Tree, node: Node) -> np.ndarray:
        return host_keys.fold_in(self._tree_key(step, tree), node.index)

    def tree_rng(self, step: int, tree: Tree, purpose: str, round_: int = 0) -> np.random.Generator:
        """A NumPy generator for host-side choices (random expansion, pruning) of one tree."""
        salt = {"expand": 1, "prune": 2, "branch": 3}[purpose]
        key = host_keys.fold_in_path(self._tree_key(step, tree), 2**31 - salt, round_)
        return np.random.default_rng(key.tolist())

    def encode(self, text: str) -> list[int]:
        if text not in self._encode_cache:
            self._encode_cache[text] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return self._encode_cache[text]


class _State(enum.Enum):
    READY = "ready"  # decoding (or about to): has a Turn in progress
    TOOL = "tool"  # waiting for its tool call
    WRITE = "write"  # inserted tokens (observation, warning, forced EOS) to write to the cache
    PAUSED = "paused"  # AEPO: its tool result is in; waits for its tree's branching round
    DONE = "done"  # its leaf is final


@dataclasses.dataclass(eq=False)
class _Chain(Chain):
    """A growing chain with the scheduler's state."""

    run: _TreeRun | None = None
    ordinal: int = 0  # position among the chains its phase started
    base_key: Any = None
    turn_index: int = 0  # nodes the chain created before its current one
    state: _State = _State.READY
    turn: Turn | None = None
    write: list[int] | None = None
    force_eos: bool = False
    pause: bool = False  # AEPO: pause once the pending write (a tool result) is in the cache
    h_first: float | None = None  # AEPO: H of the chain's first call, and of its latest
    h_now: float = 0.0


@dataclasses.dataclass(eq=False)
class _TreeRun:
    """A tree being grown: its sequences, its phase, and its chains."""

    tree: Tree
    slots: list[int]
    phase: int = 0  # 0: initial chains; r + 1: expansion round r
    phase_start: int = 1  # first node index created in the current phase
    chains: list[_Chain] = dataclasses.field(default_factory=list)
    next_slot: int = 1  # slots[0] holds the prompt
    order: dict = dataclasses.field(default_factory=dict)  # id(node) -> (turn, ordinal)
    # AEPO (rollout.mode='aepo'): every chain of the tree stays in `chains`; rounds so far, the
    # consecutive branching rounds, and a planned round whose forks wait for KV pages.
    round: int = 0
    consecutive: int = 0
    plan: aepo.RoundPlan | None = None

    def take_slot(self) -> int:
        self.next_slot += 1
        return self.slots[self.next_slot - 1]


class _Scheduler:
    """Grows all trees of a rollout with one continuously refilled decode batch.

    A chain leaves the batch when its turn ends; its tool call runs on the tool pool while the other
    chains decode, and when the result returns it is written to the cache (extend) and the chain
    rejoins. A tree's next expansion round starts as soon as that tree's chains are done, and new
    trees are admitted as sequences and KV pages allow. When the KV pool is full and nothing can
    move, the most recently admitted tree is preempted (its pages freed) and regrown later.

    Determinism: a node's key is ``fold_in(fold_in(fold_in(tree key, phase), chain ordinal),
    turn)``, known when the node starts and independent of scheduling; tool results depend only on
    their queries; and when a tree's phase ends its new nodes are renumbered in (turn, ordinal)
    order, so the trees do not depend on pool size, batch composition or tool timing.
    """

    def __init__(self, search: TreeSearch, params: Any, step: int, stats: RolloutStats):
        self.search, self.engine, self.settings = search, search.engine, search.settings
        self.params, self.step, self.stats = params, step, stats
        self.slot_of: dict[int, int] = {}  # id(node) -> the slot holding its prefix
        self.live: list[_TreeRun] = []
        self.tools: dict[concurrent.futures.Future, tuple[_Chain, float, int]] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(
            self.settings.tool_workers, thread_name_prefix="rollout-tool"
        )
        self.tool_intervals: list[tuple[float, float]] = []
        self.decode_intervals: list[tuple[float, float]] = []
        self.tool_started: dict[concurrent.futures.Future, float] = {}
        self.decodes = 0  # decode chunks run: the clock tool results are due by
        self.live_slots_peak = 0
        self.branching = (
            aepo.BranchRule.from_settings(self.settings)
            if self.settings.mode == RolloutMode.AEPO
            else None
        )

    def run(self, trees: list[Tree]) -> None:
        queue = collections.deque(trees)
        engine = self.engine
        engine.pages.reset_peak()
        counters_before = dataclasses.replace(engine.counters)
        started = time.perf_counter()
        try:
            while queue or self.live:
                moved = self._admit(queue)
                moved |= self._collect_tools(block=False)
                moved |= self._write()
                moved |= self._barriers()
                if self._decode():
                    continue
                if self.tools:
                    self._collect_tools(block=True)
                elif not moved:
                    self._preempt(queue)
        finally:
            # Do not wait for stuck calls: their threads finish (or time out) on their own.
            self.pool.shutdown(wait=False, cancel_futures=True)
        self._record(counters_before, time.perf_counter() - started)

    # ------------------------------------------------------------------ admission

    def _admit(self, queue: collections.deque) -> bool:
        """Starts queued trees while sequences and KV pages allow (always one when none is live)."""
        engine, settings = self.engine, self.settings
        per_tree = self.search.slots_per_tree
        admitted = []
        free_pages = engine.pages.free
        free_slots = len(engine.free_slots())
        while queue and free_slots >= per_tree:
            tree = queue[0]
            need = self._admission_pages(tree)
            if (self.live or admitted) and need > free_pages:
                break
            queue.popleft()
            admitted.append(tree)
            free_pages -= need
            free_slots -= per_tree
        if not admitted:
            return False
        runs = [_TreeRun(tree, engine.allocate(per_tree)) for tree in admitted]
        try:
            engine.prefill_many(
                self.params, [r.slots[0] for r in runs], [t.prompt for t in admitted]
            )
        except KVPoolExhausted as e:
            for run in runs:
                engine.release(run.slots)
            if self.live:  # wait for live trees to free pages
                queue.extendleft(reversed(admitted))
                return False
            raise KVPoolExhausted(
                f"the KV pool cannot hold one prompt: {e}; raise rollout.kv_pages"
            ) from e
        chains, srcs, dsts, lengths = [], [], [], []
        for run in runs:
            tree = run.tree
            self.slot_of[id(tree.root)] = run.slots[0]
            for ordinal in range(settings.initial_chains):
                chain = self._new_chain(run, tree.add_child(0, depth=0), ordinal)
                srcs.append(run.slots[0])
                dsts.append(chain.slot)
                lengths.append(len(tree.prompt))
                chains.append(chain)
            self.live.append(run)
        engine.fork_many(srcs, dsts, lengths)  # partial prompt pages: reserved by admission
        for chain in chains:
            self._ready(chain)
        self.live_slots_peak = max(
            self.live_slots_peak, engine.num_slots - len(engine.free_slots())
        )
        return True

    def _admission_pages(self, tree: Tree) -> int:
        """Pages a tree needs to start: its prompt, one partial page and one chunk per chain."""
        engine = self.engine
        chunk = -(-engine.decode_chunk // engine.page_size) + 1
        prompt = -(-len(tree.prompt) // engine.page_size)
        return prompt + self.settings.initial_chains * (1 + chunk)

    def _new_chain(self, run: _TreeRun, node: Node, ordinal: int) -> _Chain:
        tree_key = self.search._tree_key(self.step, run.tree)
        base = host_keys.fold_in_path(tree_key, run.phase, ordinal)
        chain = _Chain(run.tree, node, run.take_slot(), run=run, ordinal=ordinal, base_key=base)
        self.slot_of[id(node)] = chain.slot
        run.order[id(node)] = (0, ordinal)
        run.chains.append(chain)
        return chain

    def _preempt(self, queue: collections.deque) -> None:
        """Nothing can move and the pool is full: frees the newest tree and queues it again."""
        if len(self.live) <= 1:
            raise KVPoolExhausted(
                f"the KV pool ({self.engine.pages.capacity} pages of {self.engine.page_size} "
                "tokens) cannot hold one tree; raise rollout.kv_pages"
            )
        run = self.live.pop()
        for future, (chain, _, _) in list(self.tools.items()):
            if chain.run is run:
                del self.tools[future]
        self.engine.release(run.slots)
        tree = run.tree
        del tree.nodes[1:]
        tree.picks.clear(), tree.scores.clear(), tree.round_sizes.clear()
        queue.appendleft(tree)
        self.stats.preemptions += 1

    # ------------------------------------------------------------------ decoding

    def _ready(self, chain: _Chain) -> None:
        """The chain generates its node's (next piece of) turn."""
        node = chain.node
        key = host_keys.fold_in(chain.base_key, chain.turn_index)
        budget = self.settings.max_response_len - node.end
        chain.turn = self.engine.start_turn(chain.slot, budget, key)
        chain.state = _State.READY
        if chain.turn.done:  # nothing to generate: decide at once
            self._after_generation(chain, chain.turn.generation)

    def _decode(self) -> bool:
        """One decode chunk for the ready chains (oldest trees first); False if none could run."""
        ready = [c for run in self.live for c in run.chains if c.state is _State.READY]
        if not ready:
            return False
        started = time.perf_counter()
        ran = self.engine.decode_step(self.params, [c.turn for c in ready])
        self.decode_intervals.append((started, time.perf_counter()))
        self.decodes += 1
        if not ran:
            return False
        by_turn = {id(c.turn): c for c in ready}
        for turn in ran:
            if turn.done:
                chain = by_turn[id(turn)]
                self._after_generation(chain, turn.generation)
        return True

    def _after_generation(self, chain: _Chain, gen: Generation) -> None:
        search, settings, stats = self.search, self.settings, self.stats
        stats.generated_tokens += len(gen.tokens)
        node = chain.node
        self._record_generation(node, gen)
        if self.branching is not None:
            chain.h_now = self._call_entropy(gen)
            if chain.h_first is None:
                chain.h_first = chain.h_now
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
        chain.turn = None
        if decision.outcome == Outcome.CALL:
            node.query, node.query_tag = decision.query, decision.tag
            self._call_tool(chain)
        elif decision.outcome == Outcome.CONTINUE:
            node.append(decision.tokens, 0)
            node.piece_start = len(node.tokens)
            chain.write, chain.state = list(decision.tokens), _State.WRITE
        else:
            self._end(node, decision)
            if decision.force_eos:
                chain.force_eos, chain.state = True, _State.WRITE
            else:
                chain.state = _State.DONE

    # ------------------------------------------------------------------ tools

    def _call_tool(self, chain: _Chain) -> None:
        self.stats.tool_calls += 1
        chain.state = _State.TOOL
        node = chain.node
        future = self.pool.submit(self.search.toolbox.run, node.query_tag, node.query)
        now = time.perf_counter()
        # Due K chunk boundaries later: results rejoin at points fixed by the trees, not by
        # thread timing, so batch composition (hence every float) is reproducible.
        due = self.decodes + self.settings.tool_rejoin_chunks
        self.tools[future] = (chain, now + self.search.tool_timeout_s, due)
        self.tool_started[future] = now

    def _collect_tools(self, *, block: bool) -> bool:
        """Applies the tool calls that are due (submitted ``rollout.tool_rejoin_chunks`` decode
        chunks ago, or all of them when ``block``: nothing else can run), waiting for each up to its deadline; a call
        past its deadline counts as failed. Calls are applied in submission order."""
        due = [f for f, (_, _, at) in self.tools.items() if block or at <= self.decodes]
        if not due:
            return False
        finished = []
        for future in due:
            chain, deadline, _ = self.tools.pop(future)
            try:
                result = future.result(timeout=max(0.0, deadline - time.perf_counter()))
            except concurrent.futures.TimeoutError:
                self.stats.tool_timeouts += 1
                result = ToolResult(ok=False, text="", status="timeout", error="tool call deadline")
            self.tool_intervals.append((self.tool_started.pop(future), time.perf_counter()))
            finished.append((chain, result))
        for chain, result in finished:
            self._after_tool(chain, result)
        return True

    def _after_tool(self, chain: _Chain, result: ToolResult) -> None:
        self.stats.tool_failures += not result.ok
        node = chain.node
        decision = turn_rules.after_tool(
            result=result,
            calls_made=node.calls_made,
            response_length=node.end,
            settings=self.settings,
            encode=self.search.encode,
            tag=node.query_tag or "search",
        )
        if decision.outcome == Outcome.LEAF:
            self._end(node, decision)
            chain.state = _State.DONE
            return
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
        chain.turn_index += 1
        chain.node = child
        self.slot_of[id(child)] = chain.slot
        chain.run.order[id(child)] = (chain.turn_index, chain.ordinal)
        chain.write, chain.state = list(decision.tokens), _State.WRITE
        chain.pause = self.branching is not None  # AEPO branches after every tool round

    # ------------------------------------------------------------------ cache writes

    def _write(self) -> bool:
        """Writes the chains' inserted tokens (batched) and sends them back to decoding."""
        waiting = [c for run in self.live for c in run.chains if c.state is _State.WRITE]
        if not waiting:
            return False
        forced = [c for c in waiting if c.force_eos]
        extends = [c for c in waiting if not c.force_eos]
        done = self._in_batches(forced, self._force) + self._in_batches(extends, self._extend)
        for chain in done:
            if chain.force_eos:
                chain.force_eos, chain.state = False, _State.DONE
                continue
            chain.write = None
            decision = turn_rules.out_of_room(
                response_length=chain.node.end,
                calls_made=chain.node.calls_made,
                settings=self.settings,
            )
            if decision.outcome == Outcome.LEAF:
                self._count(decision)
                self._end(chain.node, decision)
                chain.state = _State.DONE
            elif chain.pause:
                chain.state = _State.PAUSED
            else:
                self._ready(chain)
            chain.pause = False
        return bool(done)

    def _in_batches(self, chains: list[_Chain], write) -> list[_Chain]:
        """Writes all chains in one call, or as many as the KV pool allows one by one."""
        if not chains:
            return []
        try:
            write(chains)
            return chains
        except KVPoolExhausted:
            pass
        done = []
        for chain in chains:
            try:
                write([chain])
            except KVPoolExhausted:
                continue
            done.append(chain)
        return done

    def _extend(self, chains: list[_Chain]) -> None:
        self.engine.extend_many(self.params, [c.slot for c in chains], [c.write for c in chains])

    def _force(self, chains: list[_Chain]) -> None:
        # The reference trains an EOS after an empty tool call; score it as if sampled so its
        # behaviour log-prob is known like every other trained token's.
        eos = self.search.eos_token_id
        scored = self.engine.force(self.params, [c.slot for c in chains], [eos] * len(chains))
        for chain, (log_prob, entropy) in zip(chains, scored, strict=True):
            chain.node.append([eos], 1, [log_prob], [entropy])

    # ------------------------------------------------------------------ phases

    def _barriers(self) -> bool:
        """Trees whose chains are all done: renumber the phase's nodes, then expand or finish."""
        moved = False
        for run in list(self.live):
            if self.branching is not None:
                moved |= self._branch_round(run)
                continue
            if any(c.state is not _State.DONE for c in run.chains):
                continue
            if run.phase_start < len(run.tree.nodes):
                self._renumber(run)
            if run.phase < self.settings.rounds:
                moved |= self._expand(run)  # False: the forks wait for KV pages
                continue
            self.engine.release(run.slots)
            self.live.remove(run)
            moved = True
        return moved

    def _renumber(self, run: _TreeRun) -> None:
        """Puts the phase's new nodes in (turn, chain ordinal) order, whatever order they were
        created in, so a tree does not depend on when its tool calls returned."""
        tree, start = run.tree, run.phase_start
        segment = tree.nodes[start:]
        ordered = sorted(segment, key=lambda n: run.order[id(n)])
        new_index = {n.index: start + k for k, n in enumerate(ordered)}
        for node in ordered:
            node.index = new_index[node.index]
            if node.parent in new_index:
                node.parent = new_index[node.parent]
        tree.nodes[start:] = ordered
        run.phase_start = len(tree.nodes)

    def _expand(self, run: _TreeRun) -> bool:
        """Picks ``beam_size`` nodes and starts one re-sampling branch per pick (False: the KV
        pool cannot hold the forks yet)."""
        tree, round_ = run.tree, run.phase
        picks = self._pick([tree], round_)[0]
        branches, srcs, lengths = [], [], []
        for index in picks:
            picked = tree.nodes[index]
            # The branch is a sibling of the pick (a fresh chain when the pick is the root) that
            # keeps the pick's observation and re-samples its whole turn.
            parent = tree.root if index == 0 else tree.nodes[picked.parent]
            obs = picked.tokens[: picked.obs_len]
            branches.append((index, picked, parent, obs))
            srcs.append(self.slot_of[id(picked)])
            lengths.append(len(tree.prompt) + parent.end + len(obs))
        dsts = run.slots[run.next_slot : run.next_slot + len(picks)]
        try:
            self.engine.fork_many(srcs, dsts, lengths)
        except KVPoolExhausted:
            tree.scores.pop()
            return False
        tree.picks.append(list(picks))
        tree.round_sizes.append(len(tree.nodes))
        run.phase += 1
        run.phase_start = len(tree.nodes)
        run.chains = []
        for ordinal, (index, picked, parent, obs) in enumerate(branches):
            self.stats.picks_by_depth[picked.depth] += 1
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
            chain = self._new_chain(run, branch, ordinal)
            self._ready(chain)
        return True

    def _branch_round(self, run: _TreeRun) -> bool:
        """AEPO: once every chain of the tree is done or paused after a tool round, decide the
        copies and the fresh chain (``aepo.plan_round``), fork them, and resume the paused
        chains with the new ones; a tree with no active chain and ``samples_per_tree`` chains is
        finished. False: not at a round's end yet, or the forks wait for KV pages."""
        if any(c.state not in (_State.PAUSED, _State.DONE) for c in run.chains):
            return False
        tree, engine, rule = run.tree, self.engine, self.branching
        if run.phase_start < len(tree.nodes):
            self._renumber(run)
        active = [c for c in run.chains if c.state is _State.PAUSED]
        if not active and len(run.chains) >= rule.samples:
            engine.release(run.slots)
            self.live.remove(run)
            return True
        if run.plan is None:  # drawn once: a retry after a full pool reuses the same decisions
            run.plan = aepo.plan_round(
                prompt_of_chain=[0] * len(active),
                h_now=[c.h_now for c in active],
                h_first=[c.h_first for c in active],
                chains=[len(run.chains)],
                consecutive=[run.consecutive],
                rule=rule,
                rng=self.search.tree_rng(self.step, tree, "branch", run.round),
            )
        plan = run.plan
        sources = [c for c, n in zip(active, plan.copies.tolist(), strict=True) for _ in range(n)]
        srcs = [c.slot for c in sources] + [run.slots[0]] * int(plan.fresh[0])
        lengths = [engine.length(c.slot) for c in sources] + [len(tree.prompt)] * int(plan.fresh[0])
        try:
            engine.fork_many(srcs, run.slots[run.next_slot : run.next_slot + len(srcs)], lengths)
        except KVPoolExhausted:
            return False
        new = []
        for source in sources:
            # A copy is the chain as it is now: a sibling of its node with the same observation
            # (the tool result just inserted, nothing generated yet), generating on its own.
            node = source.node
            copy = tree.add_child(
                node.parent,
                depth=node.depth,
                obs_len=node.obs_len,
                calls_at_start=node.calls_at_start,
                calls_made=node.calls_made,
                entropy=node.entropy,
                start=node.start,
                piece_start=node.piece_start,
                branch_of=node.index,
            )
            copy.append(list(node.tokens), 0)
            new.append(self._new_chain(run, copy, ordinal=len(run.chains)))
        if plan.fresh[0]:
            new.append(self._new_chain(run, tree.add_child(0, depth=0), ordinal=len(run.chains)))
        self.stats.branch_copies += len(sources)
        self.stats.fresh_chains += int(plan.fresh[0])
        run.consecutive, run.plan = int(plan.consecutive[0]), None
        run.round += 1
        run.phase_start = len(tree.nodes)
        for chain in active + new:
            self._ready(chain)
        return True

    def _call_entropy(self, gen: Generation) -> float:
        """AEPO's H of one generate call (``rollout.aepo_entropy``), from the engine's top-k
        entries (``topk``) or its exact per-token entropies."""
        settings, vocab = self.settings, len(self.search.tokenizer)
        if settings.aepo_entropy == AEPOEntropy.EXACT:
            return aepo.call_entropy(settings, vocab, entropies=gen.entropies)
        k = self.engine.top_logprobs
        if not k:
            raise ValueError(
                "rollout.aepo_entropy='topk' needs an engine built with top_logprobs="
                f"rollout.aepo_entropy_topk ({settings.aepo_entropy_topk})"
            )
        shown = len(gen.top_ids)
        entries = aepo.returned_entries(
            np.asarray(gen.top_ids, np.int64).reshape(shown, k),
            np.asarray(gen.top_log_probs, np.float64).reshape(shown, k),
            np.asarray(gen.tokens[:shown], np.int64),
            np.asarray(gen.log_probs[:shown], np.float64),
        )
        return aepo.call_entropy(settings, vocab, entry_log_probs=entries)

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

    # ------------------------------------------------------------------ bookkeeping

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

    def _record(self, before: EngineCounters, wall: float) -> None:
        """The engine's and the scheduler's figures for this rollout into the stats."""
        stats, engine, after = self.stats, self.engine, self.engine.counters
        stats.generate_calls += after.decode_calls - before.decode_calls
        stats.generate_seconds += after.decode_seconds - before.decode_seconds
        stats.row_steps_run += after.row_steps_run - before.row_steps_run
        stats.row_steps_useful += after.row_steps_useful - before.row_steps_useful
        stats.kv_bytes_read += after.kv_bytes_read - before.kv_bytes_read
        stats.kv_pages_read += after.kv_pages_read - before.kv_pages_read
        stats.kv_pages_read_once += after.kv_pages_read_once - before.kv_pages_read_once
        stats.kv_tokens_peak = max(stats.kv_tokens_peak, engine.pages.peak_used * engine.page_size)
        stats.kv_tokens_dense = max(stats.kv_tokens_dense, self.live_slots_peak * engine.max_len)
        stats.kv_pool_waits += engine.pages.waits
        tool_time, overlap = interval_overlap(self.tool_intervals, self.decode_intervals)
        stats.tool_seconds += tool_time
        stats.tool_overlap_seconds += overlap
        stats.wall_seconds += wall


def interval_overlap(
    a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]
) -> tuple[float, float]:
    """(length of the union of intervals ``a``, length of its intersection with the union of
    ``b``): how long tools ran, and how much of that time decoding ran too."""

    def union(intervals):
        merged = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged

    ua, ub = union(a), union(b)
    total = sum(end - start for start, end in ua)
    both, j = 0.0, 0
    for start, end in ua:
        while j < len(ub) and ub[j][1] <= start:
            j += 1
        k = j
        while k < len(ub) and ub[k][0] < end:
            both += max(0.0, min(end, ub[k][1]) - max(start, ub[k][0]))
            k += 1
    return total, both


_scores = jax.jit(kernels.expansion_scores, static_argnames=("penalty",))
_select = jax.jit(kernels.select_expansion_nodes, static_argnames=("k", "penalty"))
