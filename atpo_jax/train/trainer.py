"""The AT²PO training loop (DESIGN.md §1, §7; ALGORITHM.md §3-§5).

One RL step::

    prompts ─► tree search (engine + tools) ─► TreeArrays + RowArrays
            ─► rewards (EM with format check) ─► credit (tree values or GRPO) ─► token advantages
            ─► old log-probs (recomputed, or the sampler's) [+ reference log-probs]
            ─► ppo_epochs × mini-batches of jitted updates ─► metrics, traces, checkpoint, eval

The loop runs on a :class:`~atpo_jax.train.run.Run` (the built parts: data, search, programs) and
a :class:`~atpo_jax.train.state.TrainState` (the weights and optimizer state, nothing else holds
them). Step numbering: checkpoint k holds the state after k RL steps; checkpoint 0 is the
warm-started policy. Every random choice derives from (seed, step, tree, node) and the data order
from (seed, epoch), so a resumed run repeats an uninterrupted one exactly.

Scale-out (DESIGN.md §8, docs/scale_out.md): parameters and optimizer state live on the mesh of
all devices of all processes, sharded by their declared logical axes, and every mini-batch is a
global array split over ``("data", "fsdp")``. Each process rolls out (and calls tools for) its own
share of every mini-batch's prompts on its own devices, with global tree ids, so a run's numbers do
not depend on the number of processes; step metrics and evaluation are reduced over processes and
only process 0 writes logs, traces and exports.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
from typing import Any

import jax
import numpy as np
from flax import nnx

from atpo_jax import models, parallel
from atpo_jax.rollout.pack import RowArrays
from atpo_jax.rollout.stats import merge_rollout_metrics
from atpo_jax.rollout.trace import tree_records, write_trace
from atpo_jax.settings import ConfigError
from atpo_jax.train import evaluation
from atpo_jax.train.checkpointing import (
    Checkpointer,
    CheckpointError,
    ShutdownRequest,
    install_sigterm_handler,
)
from atpo_jax.train.credit import assign_credit
from atpo_jax.train.diagnostics import diagnostic_counts, diagnostic_metrics
from atpo_jax.train.metrics import (
    MetricsWriter,
    PhaseTimer,
    ProgressBar,
    step_metrics,
    throughput_metrics,
)
from atpo_jax.train.optimizer import (
    NonFiniteError,
    applied_updates,
    consecutive_nonfinite_skips,
    current_learning_rate,
    nonfinite_skips,
)
from atpo_jax.train.packed_update import PackedUpdate
from atpo_jax.train.packing import (
    MiniBatchRows,
    PackedBatch,
    Packing,
    align_processes,
    pack_mini_batch,
    real_tokens,
)
from atpo_jax.train.policy import OldLogProbs, PolicyRows, policy_rows, totals_from_counts
from atpo_jax.train.run import Run
from atpo_jax.train.sft import warm_start
from atpo_jax.train.state import TrainState
from atpo_jax.train.workdir import (
    Claim,
    WorkdirError,
    WorkdirMode,
    claim_workdir,
    describe_changes,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepBatch:
    """The questions of one RL step."""

    indices: list[int]  # positions in the training set (global tree ids)
    prompts: list[list[int]]
    golds: list[list[str]]


@dataclasses.dataclass(frozen=True)
class LayoutCost:
    """What a step's policy passes cost in tokens (see ``train.packing``): the per-leaf rows
    without padding (``real``), the positions holding a token (``placed``: a shared prefix once
    with ``tree``) and the positions the model ran (``computed``, padding included), summed over
    processes by :meth:`gathered`; ``context_len`` is the sequence length attention ran over."""

    real: int = 0
    placed: int = 0
    computed: int = 0
    context_len: int = 0

    def __add__(self, other: LayoutCost) -> LayoutCost:
        return LayoutCost(
            self.real + other.real, self.placed + other.placed, self.computed + other.computed
        )

    def gathered(self, context_len: int) -> LayoutCost:
        totals = np.sum(parallel.allgather_objects([self.real, self.placed, self.computed]), axis=0)
        return LayoutCost(*(int(x) for x in totals), context_len=context_len)

    def metrics(self) -> dict[str, float]:
        return {
            "train/real_tokens": float(self.real),
            "train/computed_tokens": float(self.computed),
            "train/padding_fraction": 1.0 - self.placed / max(self.computed, 1),
        }


@dataclasses.dataclass(frozen=True)
class PaddedMiniBatch:
    """A mini-batch in the padded layout: one :class:`PolicyRows` (the update splits it)."""

    rows: PolicyRows

    @property
    def batches(self) -> Any:
        return self.rows

    def scored(self, log_prob_fn, params, field: str) -> PaddedMiniBatch:
        return PaddedMiniBatch(self.rows.replace(**{field: log_prob_fn(params, self.rows)}))

    def update(self, update_fn, params, opt_state):
        return update_fn(params, opt_state, self.rows)


@dataclasses.dataclass(frozen=True)
class PackedMiniBatch:
    """A mini-batch as packed micro-batches and its ``policy.mini_batch_totals``."""

    micro: list[PackedBatch]
    totals: np.ndarray

    @property
    def batches(self) -> Any:
        return self.micro

    def scored(self, log_prob_fn, params, field: str) -> PackedMiniBatch:
        micro = [m.replace(**{field: log_prob_fn(params, m)}) for m in self.micro]
        return PackedMiniBatch(micro, self.totals)

    def update(self, update_fn, params, opt_state):
        return update_fn(params, opt_state, self.micro, self.totals)


class Trainer:
    """Runs the RL loop of a :class:`Run`: warm start, steps, evaluation, checkpoints, export.

    ``self.state`` is the current :class:`TrainState`; the trainer replaces it as it trains.
    ``writer`` and ``checkpointer`` default to the run's workdir.
    """

    def __init__(
        self,
        run: Run,
        *,
        writer: MetricsWriter | None = None,
        checkpointer: Checkpointer | None = None,
    ):
        self.run = run
        s = run.settings
        packed = s.train.packing != Packing.PADDED
        if packed != isinstance(run.update_fn, PackedUpdate):
            raise ValueError(
                f"train.packing={s.train.packing} but the run's update_fn is "
                f"{type(run.update_fn).__name__}: build the programs with builder.build_run, or "
                "use packed_update.PackedUpdate / make_packed_log_prob_fn for rows|tree and "
                "policy.make_update_fn / make_log_prob_fn for padded"
            )
        # Opened on first use, not here: a trainer built only to restore or inspect a workdir
        # must not write to it (a writable checkpointer deletes the partial saves it finds,
        # which may be another live run's save in flight) until ``train`` has claimed it.
        self._checkpointer = checkpointer
        self._writer = writer
        self._claimed = False
        self.timer = PhaseTimer()
        self.state: TrainState | None = None

    @property
    def checkpointer(self) -> Checkpointer:
        """The run's checkpoints: writable once ``train`` has claimed the workdir, read-only
        before (for ``restore`` and inspection)."""
        if self._checkpointer is None:
            s = self.run.settings
            directory = os.path.join(self.run.workdir, "checkpoints")
            read_only = not self._claimed
            if read_only and not os.path.isdir(directory):
                raise FileNotFoundError(f"no checkpoints in {self.run.workdir}")
            self._checkpointer = Checkpointer(
                directory,
                keep=s.checkpoint.keep,
                save_every=s.checkpoint.every,
                read_only=read_only,
            )
        return self._checkpointer

    @property
    def writer(self) -> MetricsWriter:
        """The run's metrics log (``metrics.jsonl``, TensorBoard, W&B), opened on first use."""
        if self._writer is None:
            s = self.run.settings
            self._writer = MetricsWriter(
                self.run.workdir,
                tensorboard=s.logging.tensorboard,
                wandb_project=s.logging.wandb_project or None,
                wandb_config=dataclasses.asdict(s),
            )
        return self._writer

    @property
    def step(self) -> int:
        return 0 if self.state is None else self.state.step

    # ------------------------------------------------------------------ state

    def initial_state(self) -> TrainState:
        """Step 0 before the warm start: the run's initial parameters, a fresh optimizer, and the
        KL reference when the loss has a KL term."""
        run = self.run
        return TrainState.create(
            run.initial_params(),
            run.optimizer,
            run.placement,
            with_reference=run.settings.loss.kl_coef > 0,
        )

    def restore(self, step: int) -> TrainState:
        """The state saved at checkpoint ``step``, in this run's shardings."""
        target = self.initial_state()
        restored = self.checkpointer.restore(step, target=target.checkpoint_items())
        logger.info("resumed from checkpoint step %d", int(restored["step"]))
        return target.from_checkpoint_items(restored)

    def _restore_newest_intact(self) -> TrainState:
        """The newest checkpoint that reads and verifies. Damaged ones are reported by step and,
        once an older one has restored, moved aside (``checkpoints_damaged/``) so that the run
        saves those steps anew. When none restores (a model or mesh that does not fit them, say)
        nothing is moved: the error lists each step's failure."""
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.checkpointer.all_steps()):
            try:
                state = self.restore(step)
            except CheckpointError as e:
                logger.error("%s; trying the previous checkpoint", e)
                damaged.append((step, str(e)))
                continue
            for bad, _ in damaged:
                logger.warning(
                    "moved damaged checkpoint %d to %s", bad, self.checkpointer.quarantine(bad)
                )
            return state
        raise CheckpointError(
            -1,
            f"no checkpoint in {self.checkpointer.directory} could be restored: "
            + "; ".join(message for _, message in damaged)
            + ". If the settings changed, resume with the run's own (run.json); if the files are "
            "damaged, start afresh with --overwrite",
        )

    def warm_start(self, state: TrainState, stop: ShutdownRequest | None = None) -> TrainState:
        """The supervised warm start (``sft.steps > 0``); the KL reference becomes its result.

        With ``stop``, a termination signal ends the warm start at the next SFT step through
        ``stop.check()`` (its result is not kept: it is not the warm start the run asked for).

        Raises:
          NonFiniteError: the supervised loss became NaN or Inf.
        """
        run, s = self.run, self.run.settings
        if s.sft.steps <= 0:
            return state
        with self.timer.phase("sft"):
            params, losses = warm_start(
                run.graphdef,
                state.params,
                run.data.tokenizer,
                run.data.demos,
                run.data.world,
                s.sft,
                s.optim,
                max_prompt_len=s.rollout.max_prompt_len,
                max_response_len=s.rollout.max_response_len,
                seed=s.seed,
                should_stop=None if stop is None else stop.should_stop,
            )
        if stop is not None and len(losses) < s.sft.steps:
            stop.check()  # stopped by a signal: exits
        bad = [i for i, loss in enumerate(losses) if not np.isfinite(loss)]
        if bad:
            raise NonFiniteError(
                f"the warm start's loss was {losses[bad[0]]} at SFT step {bad[0] + 1} of "
                f"{s.sft.steps}: lower sft.learning_rate, check the demonstrations, or try "
                "model.dtype=float32"
            )
        times = self.timer.pop()
        logger.info(
            "warm start done in %.0fs: loss %.3f -> %.3f",
            times["time/sft_s"],
            losses[0],
            losses[-1],
        )
        params = run.placement.canonical(params)
        state = TrainState.create(
            params, run.optimizer, run.placement, with_reference=state.ref_params is not None
        )
        self.writer.write(0, {"sft/loss_first": losses[0], "sft/loss_last": losses[-1], **times})
        return state

    # ------------------------------------------------------------------ data

    def step_batch(self, step: int) -> StepBatch:
        """The prompts of RL step ``step`` (1-based): a seeded permutation per epoch, no drops."""
        run = self.run
        n = len(run.train_prompts)
        per_step = run.settings.train.prompts_per_step
        start = (step - 1) * per_step
        indices = []
        for q in range(start, start + per_step):
            epoch, offset = divmod(q, n)
            if run.settings.data.shuffle:
                order = np.random.default_rng([run.settings.seed, epoch]).permutation(n)
                indices.append(int(order[offset]))
            else:
                indices.append(offset)
        return StepBatch(
            indices=indices,
            prompts=[run.train_prompts[i] for i in indices],
            golds=[run.data.train[i].golds for i in indices],
        )

    def _local_batch(self, batch: StepBatch) -> StepBatch:
        """This process's share of every mini-batch of the step (all of it on one process)."""
        t, placement = self.run.settings.train, self.run.placement
        positions = parallel.local_prompt_positions(
            t.prompts_per_step, t.mini_batch_prompts, placement.batch_block, placement.batch_blocks
        )
        return StepBatch(
            indices=[batch.indices[i] for i in positions],
            prompts=[batch.prompts[i] for i in positions],
            golds=[batch.golds[i] for i in positions],
        )

    def _local_mini_rows(self) -> int:
        """Rows of each mini-batch this process holds."""
        s = self.run.settings
        return (
            s.train.mini_batch_prompts
            * s.rollout.samples_per_tree
            // self.run.placement.batch_blocks
        )

    def _padded_mini_batches(self, rows: RowArrays, advantages, old):
        """The step's mini-batches in the padded layout, in order; on a mesh, global arrays
        assembled from every process's rows of that mini-batch."""
        placement, local = self.run.placement, self._local_mini_rows()
        padded = policy_rows(
            rows.prompt_tokens,
            rows.prompt_mask,
            rows.tree_index,
            rows.response_tokens,
            rows.loss_mask,
            advantages=advantages,
            old_log_probs=old,
        )
        minis = [
            PaddedMiniBatch(
                placement.batch(jax.tree.map(lambda x, s=start: x[s : s + local], padded))
            )
            for start in range(0, rows.num_rows, local)
        ]
        real = real_tokens(rows.prompt_mask, rows.tree_index, rows.token_node)
        cost = LayoutCost(real=real, placed=real, computed=int(padded.input_ids.size))
        return minis, cost.gathered(padded.input_ids.shape[1])

    def _packed_mini_batches(self, rows: RowArrays, advantages, old):
        """The step's mini-batches as packed micro-batches (``train.packing`` rows or tree); in a
        multi-process run every process's micro-batches are aligned and assembled into global
        arrays."""
        run, s = self.run, self.run.settings
        placement, local = run.placement, self._local_mini_rows()
        sequences = parallel.batch_parallelism(placement.mesh) // placement.batch_blocks
        pad_id = run.search.pad_token_id
        zeros = np.zeros(rows.response_tokens.shape, np.float32)
        minis, cost = [], LayoutCost()
        for start in range(0, rows.num_rows, local):
            part = slice(start, start + local)
            batch = MiniBatchRows(
                prompt_tokens=rows.prompt_tokens,
                prompt_mask=rows.prompt_mask,
                tree_index=np.asarray(rows.tree_index)[part],
                response=np.asarray(rows.response_tokens)[part],
                loss_mask=np.asarray(rows.loss_mask)[part],
                token_node=np.asarray(rows.token_node)[part],
                advantages=np.asarray(advantages, np.float32)[part],
                old_log_probs=np.asarray(zeros if old is None else old, np.float32)[part],
            )
            packed = pack_mini_batch(
                batch,
                s.train.packing,
                budget=s.train.micro_batch_tokens,
                sequences=sequences,
                pad_id=pad_id,
            )
            micro = packed.micro
            trained = batch.loss_mask != 0
            counts = [int(np.sum(trained)), int(np.sum(np.any(trained, axis=1)))]
            if jax.process_count() > 1:
                shapes = parallel.allgather_objects([m.shape_key for m in micro])
                micro = align_processes(micro, shapes, block=placement.batch_block, pad_id=pad_id)
                counts = np.sum(parallel.allgather_objects(counts), axis=0)
            totals = totals_from_counts(np.int64(counts[0]), np.int64(counts[1]), s.loss.loss_agg)
            minis.append(PackedMiniBatch([placement.batch(m) for m in micro], totals))
            cost = cost + LayoutCost(
                real=packed.real_tokens,
                placed=packed.placed_tokens,
                computed=sum(m.tokens.size for m in micro),
            )
        return minis, cost.gathered(s.train.micro_batch_tokens)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, state: TrainState, step: int) -> dict[str, Any]:
        """Greedy single-chain EM/F1 on the evaluation split; written to ``eval_<step>.json``."""
        run = self.run
        rows = evaluation.eval_rows(run.data.eval, run.settings.eval)
        if not rows:
            return {}
        # Each process evaluates a contiguous share of the questions; results are merged.
        share = parallel.split_evenly(len(rows), jax.process_index(), jax.process_count())
        with self.timer.phase("eval"):
            results = evaluation.evaluate(
                run.eval_search,
                run.rollout_params(state.params),
                run.data.tokenizer,
                [rows[i] for i in share],
                batch_prompts=run.settings.eval.batch_prompts,
                reward=run.settings.reward,
            )
            results = evaluation.merge_eval_results(parallel.allgather_objects(results))
        if parallel.is_main_process():
            evaluation.save_results(results, os.path.join(run.workdir, f"eval_{step:06d}.json"))
        metrics = {"eval/em": results["em"], "eval/f1": results["f1"]}
        for source, r in results["by_source"].items():
            metrics[f"eval/em/{source}"] = r["em"]
        self.writer.write(step, metrics)
        logger.info("eval at step %d:\n%s", step, evaluation.markdown_table(results))
        return results

    # ------------------------------------------------------------------ one RL step

    def train_step(self, state: TrainState, step: int) -> tuple[TrainState, dict[str, float]]:
        """RL step ``step`` from ``state`` (after ``step - 1`` steps); returns the new state."""
        run, s = self.run, self.run.settings
        samples = s.rollout.samples_per_tree
        batch_spec = self._local_batch(self.step_batch(step))
        with self.timer.phase("rollout"):
            out = run.search.rollout(
                run.rollout_params(state.params), batch_spec.prompts, step, batch_spec.indices
            )
        with self.timer.phase("reward"):
            results = [
                s.reward.score(text, batch_spec.golds[r // samples])
                for r, text in enumerate(out.texts)
            ]
            scores = np.array([r.score for r in results], np.float32)
        nodes = out.nodes.with_leaf_rewards(out.rows, scores)
        with self.timer.phase("credit"):
            credit = assign_credit(nodes, out.rows, settings=s.credit, samples_per_tree=samples)
            advantages = np.asarray(credit["advantages"])
        sampler = s.loss.old_log_probs == OldLogProbs.SAMPLER
        old = out.rows.sampled_log_probs if sampler else None
        with self.timer.phase("packing"):
            if s.train.packing == Packing.PADDED:
                minis, cost = self._padded_mini_batches(out.rows, advantages, old)
            else:
                minis, cost = self._packed_mini_batches(out.rows, advantages, old)

        with self.timer.phase("log_probs"):
            if not sampler:
                minis = [m.scored(run.log_prob_fn, state.params, "old_log_probs") for m in minis]
            if state.ref_params is not None:
                minis = [
                    m.scored(run.log_prob_fn, state.ref_params, "ref_log_probs") for m in minis
                ]
            jax.block_until_ready([m.batches for m in minis])
        params, opt_state = state.params, state.opt_state
        with self.timer.phase("update"):
            update_metrics = []
            for _ in range(s.train.ppo_epochs):
                for mini in minis:
                    params, opt_state, m = mini.update(run.update_fn, params, opt_state)
                    update_metrics.append(m)
            update_metrics = jax.device_get(update_metrics)
        state = state.replace(
            step=step,
            params=params,
            opt_state=opt_state,
            data_position=step * s.train.prompts_per_step,
        )
        metrics = self._step_metrics(state, out, results, scores, advantages, cost, update_metrics)
        metrics.update(self._tree_diagnostics(out, scores, batch_spec))
        # Traces show process 0's trees (each process holds only its own).
        if s.rollout.trace_every and step % s.rollout.trace_every == 0 and jax.process_index() == 0:
            self._write_trace(step, out, nodes, credit)
        return state, metrics

    def _step_metrics(
        self, state, out, results, scores, advantages, cost, update_metrics
    ) -> dict[str, float]:
        run, s = self.run, self.run.settings
        mask = np.asarray(out.rows.loss_mask) != 0
        # Every process's rows, in global order (the local arrays themselves on one process).
        gather = functools.partial(parallel.allgather_concat, position=run.placement.batch_block)
        rollout = merge_rollout_metrics(parallel.allgather_objects(out.metrics))
        metrics = step_metrics(
            scores=gather(scores),
            ems=gather(np.array([r.em for r in results], np.float64)),
            f1s=gather(np.array([r.f1 for r in results], np.float64)),
            advantages=gather(np.asarray(advantages)[mask]),
            rollout=rollout,
            updates=update_metrics,
            learning_rate=current_learning_rate(run.optim, state.opt_state),
            nonfinite_skips=nonfinite_skips(state.opt_state),
        )
        phases = self.timer.pop()
        metrics.update(phases)
        metrics.update(cost.metrics())
        if isinstance(run.update_fn, PackedUpdate):
            metrics["train/programs"] = float(run.update_fn.programs)
        metrics.update(
            throughput_metrics(
                phases,
                generated_tokens=rollout["rollout/generated_tokens"],
                processed_tokens=float(cost.placed),
                context_len=cost.context_len,
                model_config=run.model_config,
                passes=s.train.ppo_epochs * 3 + (s.loss.old_log_probs == OldLogProbs.RECOMPUTE),
                num_devices=jax.device_count(),
            )
        )
        return metrics

    def _tree_diagnostics(self, out, scores, batch: StepBatch) -> dict[str, float]:
        """The ``tree/*`` diagnostics (``atpo_jax.train.diagnostics``): host-side counts over the
        step's trees, new keys only (nothing the run computes depends on them)."""
        run = self.run
        decisive = [run.data.train[i].extra_info.get("decisive_hop") for i in batch.indices]
        counts = diagnostic_counts(
            out.trees, scores, run.settings.rollout.samples_per_tree, decisive
        )
        return diagnostic_metrics(parallel.allgather_objects(counts))

    def _write_trace(self, step: int, out, nodes, credit) -> None:
        records = tree_records(
            out.trees,
            self.run.data.tokenizer.decode,
            values=np.asarray(credit["node_values"]),
            advantages=np.asarray(credit["node_advantages"]),
            leaf_rewards=np.asarray(nodes.leaf_reward),
        )
        write_trace(os.path.join(self.run.workdir, "traces"), step, records)

    # ------------------------------------------------------------------ the run

    def train(
        self,
        *,
        resume: bool = False,
        overwrite: bool = False,
        allow_changes: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Trains for ``train.steps`` steps; returns the last held-out evaluation.

        The run first claims its workdir (``atpo_jax.train.workdir``): an exclusive lock, and a
        check that the workdir holds no other run. ``resume`` continues the run recorded there
        from its newest checkpoint that verifies (settings that change the run must be named in
        ``allow_changes``); ``overwrite`` archives an earlier run to ``<workdir>/archive/`` and
        starts afresh; neither: the workdir must hold no earlier run.

        SIGTERM and SIGINT, from the first line on, stop the run at the next safe point (an RL
        step's end, or an SFT step during the warm start, whose partial result is not kept),
        saving a final checkpoint; a second SIGINT interrupts at once.

        Raises:
          WorkdirError: the workdir is in use or holds a run this call must not mix with.
          NonFiniteError: ``train.max_nonfinite_skips`` updates in a row were skipped, or every
            update of the run was.
        """
        if resume and overwrite:
            raise ConfigError(
                "--resume continues the workdir's run and --overwrite archives it: pick one"
            )
        mode = (
            WorkdirMode.RESUME
            if resume
            else WorkdirMode.OVERWRITE
            if overwrite
            else WorkdirMode.FRESH
        )
        claim = self._claim_workdir(mode, allow_changes)
        shutdown = install_sigterm_handler(self._save_now, signals=(signal.SIGTERM, signal.SIGINT))
        try:
            return self._train(resume, shutdown)
        finally:
            shutdown.uninstall()
            claim.release()

    def _claim_workdir(self, mode: WorkdirMode, allow_changes) -> Claim:
        """Process 0 claims the workdir (it is shared); every process gets the verdict."""
        claim, verdict = Claim(None), None
        if parallel.is_main_process():
            try:
                claim = claim_workdir(
                    self.run.workdir, self.run.settings, mode, allow_changes=allow_changes
                )
            except WorkdirError as e:
                verdict = str(e)
        verdict = next((v for v in parallel.allgather_objects(verdict) if v), None)
        if verdict:
            raise WorkdirError(verdict)
        if claim.archived_to:
            logger.warning("--overwrite: moved the earlier run to %s", claim.archived_to)
        if claim.accepted_changes:
            logger.warning(
                "resuming with changed settings: %s", describe_changes(claim.accepted_changes)
            )
        # A checkpointer opened read-only before the claim (restore, inspection) is reopened
        # writable: from here on this run owns the workdir.
        if self._checkpointer is not None and self._checkpointer.read_only:
            self._checkpointer.close()
            self._checkpointer = None
        self._claimed = True
        return claim

    def _train(self, resume: bool, shutdown: ShutdownRequest) -> dict[str, Any]:
        s = self.run.settings
        latest = self.checkpointer.latest_step() if resume else None
        last_eval: dict[str, Any] = {}
        evaluated_at = None
        progress = None
        try:
            if latest is None:
                self.state = self.warm_start(self.initial_state(), stop=shutdown)
                self.checkpointer.save(0, self.state.checkpoint_items(), force=True)
                # Awaited: checkpoint 0 is complete before anything else can be interrupted.
                self.checkpointer.wait()
                shutdown.check()
                last_eval, evaluated_at = self.evaluate(self.state, 0), 0
                shutdown.check()
            else:
                self.state = self._restore_newest_intact()
            progress = ProgressBar(
                s.train.steps, initial=self.step, postfix_keys=("reward/mean", "em")
            )
            for step in range(self.step + 1, s.train.steps + 1):
                self.state, metrics = self.train_step(self.state, step)
                self.writer.write(step, metrics)
                progress.update(metrics)
                if not progress.enabled and step % s.train.log_every == 0:
                    # Non-interactive runs (SLURM logs, pipes) get a line instead of the bar.
                    logger.info(
                        "step %d/%d: reward %.3f, em %.3f, tool calls/chain %.2f",
                        step,
                        s.train.steps,
                        metrics.get("reward/mean", float("nan")),
                        metrics.get("em", float("nan")),
                        metrics.get("rollout/tool_calls_per_chain", float("nan")),
                    )
                self._check_nonfinite(step)
                if s.eval.every and step % s.eval.every == 0:
                    last_eval, evaluated_at = self.evaluate(self.state, step), step
                self.checkpointer.save(step, self.state.checkpoint_items())
                shutdown.check()
            if evaluated_at != self.step:
                last_eval = self.evaluate(self.state, self.step)
            self.checkpointer.save(self.step, self.state.checkpoint_items(), force=True)
            self.checkpointer.wait()
            if s.checkpoint.export_hf:
                self.export(os.path.join(self.run.workdir, "hf_export"))
            self._report_skips()
        finally:
            if progress is not None:
                progress.close()
            if self._writer is not None:
                self._writer.close()
            if self._checkpointer is not None:
                self._checkpointer.close()
        if s.logging.plot:
            self.writer.plot(keys=("reward/mean", "em", "eval/em", "update/entropy"))
        return last_eval

    def _check_nonfinite(self, step: int) -> None:
        """Stops the run once ``train.max_nonfinite_skips`` updates in a row were skipped."""
        limit = self.run.settings.train.max_nonfinite_skips
        in_a_row = int(consecutive_nonfinite_skips(self.state.opt_state))
        if limit and in_a_row >= limit:
            raise NonFiniteError(
                f"step {step}: the last {in_a_row} optimizer updates were skipped because the "
                f"loss or gradients were NaN or Inf (train.max_nonfinite_skips={limit}). Likely "
                "causes: a learning rate too high for this model (optim.learning_rate), overflow "
                "in reduced-precision compute (try model.dtype=float32), token ids outside the "
                "model's vocabulary, or damaged weights. The weights are those of the last "
                "applied update; checkpoints up to the previous step are intact. Set "
                "train.max_nonfinite_skips=0 to only count skipped updates"
            )

    def _report_skips(self) -> None:
        skipped = int(nonfinite_skips(self.state.opt_state))
        if not skipped:
            return
        applied = int(applied_updates(self.state.opt_state))
        if applied == 0:
            raise NonFiniteError(
                f"every optimizer update of the run ({skipped}) was skipped for non-finite "
                "losses or gradients: the policy did not train (see train.max_nonfinite_skips)"
            )
        logger.warning(
            "%d of %d optimizer updates were skipped for non-finite losses or gradients",
            skipped,
            skipped + applied,
        )

    def export(self, path: str) -> None:
        """The policy as a Hugging Face checkpoint, written by process 0 (the parameters are
        first gathered from every process: a collective)."""
        run = self.run
        params = parallel.gather_to_host(self.state.params, run.placement.mesh)
        if parallel.is_main_process():
            model = nnx.merge(run.graphdef, params, copy=False)
            models.save_pretrained(
                model, path, dtype=run.export_dtype, tokenizer=run.data.tokenizer
            )

    def _save_now(self) -> None:
        if self.state is not None:
            self.checkpointer.save(self.step, self.state.checkpoint_items(), force=True)
            self.checkpointer.wait()
        if self._writer is not None:
            self._writer.close()
        if self.state is None:
            logger.warning("stopped during the warm start: nothing saved; --resume runs it again")
        else:
            logger.warning("stopped after step %d (saved); continue with --resume", self.step)
