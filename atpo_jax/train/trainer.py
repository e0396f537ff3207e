"""The AT²PO training loop (DESIGN.md §1, §7; ALGORITHM.md §3-§5).

One RL step::

    prompts ─► tree search (engine + tools) ─► RolloutBatch
            ─► rewards (EM with format check) ─► credit (tree values or GRPO) ─► token advantages
            ─► old log-probs (recomputed, or the sampler's) [+ reference log-probs]
            ─► ppo_epochs × mini-batches of jitted updates ─► metrics, traces, checkpoint, eval

Step numbering: checkpoint k holds the state after k RL steps; checkpoint 0 is the warm-started
policy. Every random choice derives from (seed, step, tree, node) and the data order from (seed,
epoch), so a resumed run repeats an uninterrupted one exactly.

Scale-out (DESIGN.md §8, docs/scale_out.md): parameters and optimizer state live on the mesh of
``config.mesh`` (all devices of all processes), sharded by ``train.sharding``'s rules, and every
mini-batch is a global array split over ``("data", "fsdp")``. Each process rolls out (and calls
tools for) its own share of every mini-batch's prompts on its own devices, with global tree ids,
so a run's numbers do not depend on the number of processes; step metrics and evaluation are
reduced over processes and only process 0 writes logs, traces and exports.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from atpo_jax import models, parallel
from atpo_jax.data.prompts import encode_prompt
from atpo_jax.data.synthetic import read_demos
from atpo_jax.data.synthetic.augment import augmented_demos
from atpo_jax.rewards.qa import compute_reward
from atpo_jax.rollout.stats import merge_rollout_metrics
from atpo_jax.rollout.trace import tree_records, write_trace
from atpo_jax.train import components, evaluation, flops
from atpo_jax.train.checkpointing import Checkpointer, install_sigterm_handler
from atpo_jax.train.credit import assign_credit
from atpo_jax.train.metrics import MetricsWriter, PhaseTimer, ProgressBar
from atpo_jax.train.optimizer import build_optimizer, current_learning_rate, nonfinite_skips
from atpo_jax.train.policy import (
    PolicyRows,
    check_micro_batches,
    make_log_prob_fn,
    make_update_fn,
    policy_rows,
)
from atpo_jax.train.sft import encode_demonstrations, run_sft

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StepBatch:
    """The questions of one RL step."""

    indices: list[int]  # positions in the training set (global tree ids)
    prompts: list[list[int]]
    golds: list[list[str]]


class Trainer:
    """Owns the model, optimizer, rollout machinery, checkpoints and metrics of one run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        components.validate(config)
        self.config = config
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        # Process 0 writes the synthetic world's files first; the others then only read them.
        self.data = parallel.main_process_first(
            lambda: components.load_data(config, workdir), "load_data"
        )
        self.tokenizer = self.data.tokenizer
        self.train_prompts = self._encode_rows(self.data.train, "training")
        self.toolbox = components.connect_tools(config, self.data.corpus)
        self.model = components.build_policy(config, self.tokenizer)
        self._init_mesh()
        rollout_model = self._rollout_model()
        self.search = components.build_search(
            config, rollout_model, self.tokenizer, self.toolbox, mesh=self.rollout_mesh
        )
        self.eval_search = components.build_eval_search(
            config, rollout_model, self.tokenizer, self.toolbox, mesh=self.rollout_mesh
        )
        self.loss_settings = components.loss_settings(config)
        self.credit_settings = components.credit_settings(config)
        self.graphdef, self.params = nnx.split(self.model)
        t = config.train
        self.samples = config.rollout.samples_per_tree
        self.mini_rows = t.mini_batch_prompts * self.samples
        updates_per_step = t.ppo_epochs * (t.prompts_per_step // t.mini_batch_prompts)
        optim = config.optim.to_dict()
        optim["total_steps"] = optim["total_steps"] or t.steps * updates_per_step
        self.optim_config = optim
        self.optimizer = build_optimizer(optim)
        self.opt_state = self._init_opt_state()
        self.update_fn = make_update_fn(
            self.graphdef,
            self.optimizer,
            self.loss_settings,
            t.micro_batch_rows,
            mesh=self.train_mesh,
        )
        self.log_prob_fn = make_log_prob_fn(self.graphdef, t.micro_batch_rows, mesh=self.train_mesh)
        # The frozen reference policy only exists (and only runs) when its KL term does.
        self.ref_params = (
            jax.tree.map(jnp.copy, self.params) if self.loss_settings.kl_coef > 0 else None
        )
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            keep=config.checkpoint.keep,
            save_every=config.checkpoint.every,
        )
        self.writer = MetricsWriter(
            workdir,
            tensorboard=config.logging.tensorboard,
            wandb_project=config.logging.wandb_project or None,
            wandb_config=config.to_dict(),
        )
        self.timer = PhaseTimer()
        self.step = 0

    # ------------------------------------------------------------------ devices

    def _init_mesh(self) -> None:
        """The training mesh (all devices of all processes), the rollout mesh (this process's
        devices), this process's share of every batch, and the policy placed on the mesh."""
        cfg = self.config
        try:
            self.mesh = parallel.make_mesh(cfg.mesh)
            self.batch_block, self.batch_blocks = parallel.process_batch_block(self.mesh)
            check_micro_batches(
                cfg.train.mini_batch_prompts * cfg.rollout.samples_per_tree,
                cfg.train.micro_batch_rows,
                parallel.batch_parallelism(self.mesh),
                "the mini-batch rows train.mini_batch_prompts x rollout.samples_per_tree",
            )
            parallel.local_prompt_positions(
                cfg.train.prompts_per_step,
                cfg.train.mini_batch_prompts,
                self.batch_block,
                self.batch_blocks,
            )
        except ValueError as e:
            raise components.ConfigError(str(e)) from e
        # One device: the programs are jitted exactly as without a mesh (and stay as fast).
        self.train_mesh = self.mesh if self.mesh.size > 1 else None
        # Rollouts are per process (each runs its own prompts), on its own devices.
        self.rollout_mesh = self.mesh if jax.process_count() == 1 else self.mesh.local_mesh
        params = nnx.state(self.model)
        self.param_shardings = parallel.param_shardings(self.mesh, params)
        nnx.update(self.model, parallel.place(params, self.param_shardings))

    def _placed(self, params: Any) -> Any:
        """``params`` in the canonical parameter shardings (after a program that chose its own)."""
        if self.train_mesh is None:
            return params
        return parallel.reshard(params, self.param_shardings)

    def _init_opt_state(self) -> Any:
        if self.train_mesh is None:
            return self.optimizer.init(self.params)
        abstract = jax.eval_shape(self.optimizer.init, self.params)
        shardings = parallel.param_shardings(self.mesh, abstract)
        return jax.jit(self.optimizer.init, out_shardings=shardings)(self.params)

    def _rollout_model(self) -> Any:
        """The policy the engines run, its weights in the compute dtype (``models.compute_params``:
        decoding reads bfloat16 weights, not float32 masters): collocated, as sharded for training,
        on one process; a copy on this process's devices in a multi-process run."""
        graphdef, params = nnx.split(self.model)
        params = models.compute_params(params, self.model.config)
        if jax.process_count() > 1:
            params = parallel.host_local_copy(params, self.mesh, self.rollout_mesh)
        return nnx.merge(graphdef, params, copy=False)

    def _local_batch(self, batch: StepBatch) -> StepBatch:
        """This process's share of every mini-batch of the step (all of it on one process)."""
        t = self.config.train
        positions = parallel.local_prompt_positions(
            t.prompts_per_step, t.mini_batch_prompts, self.batch_block, self.batch_blocks
        )
        return StepBatch(
            indices=[batch.indices[i] for i in positions],
            prompts=[batch.prompts[i] for i in positions],
            golds=[batch.golds[i] for i in positions],
        )

    def _mini_batches(self, rows: PolicyRows) -> list[PolicyRows]:
        """The step's mini-batches, in order; on a mesh, global arrays assembled from every
        process's rows of that mini-batch."""
        local = self.mini_rows // self.batch_blocks
        minis = []
        for start in range(0, rows.response.shape[0], local):
            mini = jax.tree.map(lambda x, s=start: x[s : s + local], rows)
            minis.append(mini if self.train_mesh is None else parallel.shard_batch(mini, self.mesh))
        return minis

    # ------------------------------------------------------------------ data

    def _encode_rows(self, rows, what: str) -> list[list[int]]:
        limit = self.config.rollout.max_prompt_len
        encoded = [encode_prompt(self.tokenizer, row.prompt) for row in rows]
        too_long = [i for i, p in enumerate(encoded) if len(p) > limit]
        if too_long:
            raise components.ConfigError(
                f"{len(too_long)} {what} prompts are longer than rollout.max_prompt_len={limit} "
                f"(first: row {too_long[0]} with {len(encoded[too_long[0]])} tokens); raise it"
            )
        return encoded

    def step_batch(self, step: int) -> StepBatch:
        """The prompts of RL step ``step`` (1-based): a seeded permutation per epoch, no drops."""
        n = len(self.train_prompts)
        per_step = self.config.train.prompts_per_step
        start = (step - 1) * per_step
        indices = []
        for q in range(start, start + per_step):
            epoch, offset = divmod(q, n)
            if self.config.data.shuffle:
                order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
                indices.append(int(order[offset]))
            else:
                indices.append(offset)
        return StepBatch(
            indices=indices,
            prompts=[self.train_prompts[i] for i in indices],
            golds=[self.data.train[i].golds for i in indices],
        )

    # ------------------------------------------------------------------ state

    def _sync_model(self) -> None:
        """Points the model and both engines at the current parameters (after updates)."""
        nnx.update(self.model, self.params)
        rollout_model = self._rollout_model()
        self.search.engine.set_model(rollout_model)
        self.eval_search.engine.set_model(rollout_model)

    def state_dict(self) -> dict[str, Any]:
        state = {
            "params": self.params,
            "opt_state": self.opt_state,
            "step": self.step,
            "data_position": self.step * self.config.train.prompts_per_step,
        }
        if self.ref_params is not None:
            # The KL reference is the warm-started policy, which only checkpoint 0 holds (and
            # keep-N deletes it): every checkpoint carries it so a resumed run uses the same one.
            state["ref_params"] = self.ref_params
        return state

    def restore(self, step: int) -> None:
        restored = self.checkpointer.restore(step, target=self.state_dict())
        self.params, self.opt_state = restored["params"], restored["opt_state"]
        self.ref_params = restored.get("ref_params")
        self.step = int(restored["step"])
        self._sync_model()
        logger.info("resumed from checkpoint step %d", self.step)

    # ------------------------------------------------------------------ warm start and eval

    def warm_start(self) -> None:
        """Supervised warm start on the demonstrations (synthetic data), then checkpoint 0."""
        cfg = self.config.sft
        if cfg.steps > 0:
            if not self.data.demos:
                raise components.ConfigError(
                    "sft.steps > 0 needs demonstrations (data.source=synthetic); set sft.steps=0"
                )
            demos = read_demos(self.data.demos)
            if cfg.rename_copies:
                with open(self.data.world) as f:
                    names = [entity["name"] for entity in json.load(f)]
                demos = augmented_demos(demos, names, cfg.rename_copies, self.config.seed)
            rows = encode_demonstrations(
                self.tokenizer,
                demos,
                self.config.rollout.max_prompt_len,
                self.config.rollout.max_response_len,
            )
            logger.info(
                "warm start: %d supervised steps on %d demonstrations", cfg.steps, len(demos)
            )
            progress = ProgressBar(cfg.steps, desc="warm start", postfix_keys=())
            with self.timer.phase("sft"):
                losses = run_sft(
                    self.model,
                    rows,
                    steps=cfg.steps,
                    batch_size=cfg.batch_size,
                    learning_rate=cfg.learning_rate,
                    warmup_steps=cfg.warmup_steps,
                    seed=self.config.seed,
                    on_step=lambda step, loss: progress.update(),
                )
            progress.close()
            sft_times = self.timer.pop()
            logger.info(
                "warm start done in %.0fs: loss %.3f -> %.3f",
                sft_times["time/sft_s"],
                losses[0],
                losses[-1],
            )
            self.graphdef, params = nnx.split(self.model)
            self.params = self._placed(params)
            self.opt_state = self._init_opt_state()
            if self.ref_params is not None:  # the KL reference is the warm-started policy
                self.ref_params = jax.tree.map(jnp.copy, self.params)
            self._sync_model()
            self.writer.write(
                0, {"sft/loss_first": losses[0], "sft/loss_last": losses[-1], **sft_times}
            )
        self.checkpointer.save(0, self.state_dict(), force=True)

    def evaluate(self, step: int) -> dict[str, Any]:
        """Greedy single-chain EM/F1 on the evaluation split; written to ``eval_<step>.json``."""
        rows = components.eval_rows(self.config, self.data)
        if not rows:
            return {}
        # Each process evaluates a contiguous share of the questions; results are merged.
        share = parallel.split_evenly(len(rows), jax.process_index(), jax.process_count())
        with self.timer.phase("eval"):
            results = evaluation.evaluate(
                self.eval_search,
                self.tokenizer,
                [rows[i] for i in share],
                batch_prompts=self.config.eval.batch_prompts,
                reward_mode=self.config.reward.mode,
            )
            results = evaluation.merge_eval_results(parallel.allgather_objects(results))
        if parallel.is_main_process():
            evaluation.save_results(results, os.path.join(self.workdir, f"eval_{step:06d}.json"))
        metrics = {"eval/em": results["em"], "eval/f1": results["f1"]}
        for source, r in results["by_source"].items():
            metrics[f"eval/em/{source}"] = r["em"]
        self.writer.write(step, metrics)
        logger.info("eval at step %d:\n%s", step, evaluation.markdown_table(results))
        return results

    # ------------------------------------------------------------------ one RL step

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        batch_spec = self._local_batch(self.step_batch(step))
        with self.timer.phase("rollout"):
            out = self.search.rollout(batch_spec.prompts, step, tree_ids=batch_spec.indices)
        with self.timer.phase("reward"):
            results = [
                compute_reward(
                    text,
                    batch_spec.golds[r // self.samples],
                    mode=cfg.reward.mode,
                    python_bonus=cfg.reward.python_bonus,
                )
                for r, text in enumerate(out.texts)
            ]
            scores = np.array([r.score for r in results], np.float32)
        batch = out.batch.with_leaf_rewards(scores)
        with self.timer.phase("credit"):
            credit = assign_credit(
                batch.parent,
                batch.is_leaf,
                batch.valid,
                batch.entropy,
                batch.leaf_reward,
                scores,
                batch.tree_index,
                batch.token_node,
                settings=self.credit_settings,
                samples_per_tree=self.samples,
            )
            advantages = np.asarray(credit["advantages"])
        rows = policy_rows(
            batch.prompt_tokens,
            batch.prompt_mask,
            batch.tree_index,
            batch.response_tokens,
            batch.loss_mask,
            advantages=advantages,
            old_log_probs=batch.sampled_log_probs if cfg.loss.old_log_probs == "sampler" else None,
        )
        minis = self._mini_batches(rows)
        with self.timer.phase("log_probs"):
            if cfg.loss.old_log_probs == "recompute":
                minis = [m.replace(old_log_probs=self.log_prob_fn(self.params, m)) for m in minis]
            if self.ref_params is not None:
                minis = [
                    m.replace(ref_log_probs=self.log_prob_fn(self.ref_params, m)) for m in minis
                ]
            jax.block_until_ready([m.old_log_probs for m in minis])
        with self.timer.phase("update"):
            update_metrics = []
            for _ in range(cfg.train.ppo_epochs):
                for mini in minis:
                    self.params, self.opt_state, m = self.update_fn(
                        self.params, self.opt_state, mini
                    )
                    update_metrics.append(m)
            update_metrics = jax.device_get(update_metrics)
        self._sync_model()
        self.step = step
        metrics = self._step_metrics(out, results, scores, rows, credit, update_metrics)
        # Traces show process 0's trees (each process holds only its own).
        if (
            cfg.rollout.trace_every
            and step % cfg.rollout.trace_every == 0
            and jax.process_index() == 0
        ):
            self._write_trace(step, out, batch, credit)
        return metrics

    def _step_metrics(self, out, results, scores, rows, credit, update_metrics) -> dict[str, float]:
        mask = np.asarray(rows.loss_mask) != 0
        # Every process's rows, in global order (the local arrays themselves on one process).
        gather = functools.partial(parallel.allgather_concat, position=self.batch_block)
        adv = gather(np.asarray(rows.advantages)[mask])
        scores = gather(scores)
        ems = gather(np.array([r.em for r in results], np.float64))
        f1s = gather(np.array([r.f1 for r in results], np.float64))
        rollout_metrics = merge_rollout_metrics(parallel.allgather_objects(out.metrics))
        metrics = {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()),
            "em": float(np.mean(ems)),
            "f1": float(np.mean(f1s)),
            "format_failure_rate": float(np.mean(scores < 0)),
            "advantage/mean": float(adv.mean()) if adv.size else 0.0,
            "advantage/std": float(adv.std()) if adv.size else 0.0,
            "advantage/max": float(adv.max()) if adv.size else 0.0,
            "advantage/min": float(adv.min()) if adv.size else 0.0,
            "lr": float(current_learning_rate(self.optim_config, self.opt_state)),
            "nonfinite_skips": float(nonfinite_skips(self.opt_state)),
            "trained_tokens": float(adv.size),
            **rollout_metrics,
        }
        for key in update_metrics[0]:
            metrics[f"update/{key}"] = float(np.mean([m[key] for m in update_metrics]))
        metrics.update(self.timer.pop())
        rollout_s = metrics.get("time/rollout_s", 0.0)
        update_s = metrics.get("time/update_s", 0.0) + metrics.get("time/log_probs_s", 0.0)
        generated = rollout_metrics["rollout/generated_tokens"]
        context = rows.input_ids.shape[1]
        processed = float(gather(np.asarray(rows.attention_mask).sum(1)).sum())
        if rollout_s:
            metrics["throughput/generated_tokens_per_s"] = generated / rollout_s
        if update_s:
            metrics["throughput/train_tokens_per_s"] = processed / update_s
            peak = flops.peak_flops_per_device()
            passes = self.config.train.ppo_epochs * 3 + (
                self.config.loss.old_log_probs == "recompute"
            )
            used = flops.forward_flops_per_token(self.model.config, context) * processed * passes
            value = flops.mfu(used / jax.device_count(), update_s, peak)
            if value is not None:
                metrics["throughput/mfu"] = value
        return metrics

    def _write_trace(self, step: int, out, batch, credit) -> None:
        records = tree_records(
            out.trees,
            self.tokenizer.decode,
            values=np.asarray(credit["node_values"]),
            advantages=np.asarray(credit["node_advantages"]),
            leaf_rewards=np.asarray(batch.leaf_reward),
        )
        write_trace(os.path.join(self.workdir, "traces"), step, records)

    # ------------------------------------------------------------------ the run

    def run(self, *, resume: bool = False) -> dict[str, Any]:
        """Trains for ``train.steps`` steps (continuing from the latest checkpoint with ``resume``)."""
        cfg = self.config
        latest = self.checkpointer.latest_step() if resume else None
        last_eval: dict[str, Any] = {}
        evaluated_at = None
        if latest is None:
            self.warm_start()
            last_eval, evaluated_at = self.evaluate(0), 0
        else:
            self.restore(latest)
        shutdown = install_sigterm_handler(self._save_now)
        progress = ProgressBar(
            cfg.train.steps, initial=self.step, postfix_keys=("reward/mean", "em")
        )
        try:
            for step in range(self.step + 1, cfg.train.steps + 1):
                metrics = self.train_step(step)
                self.writer.write(step, metrics)
                progress.update(metrics)
                if not progress.enabled and step % cfg.train.log_every == 0:
                    # Non-interactive runs (SLURM logs, pipes) get a line instead of the bar.
                    logger.info(
                        "step %d/%d: reward %.3f, em %.3f, tool calls/chain %.2f",
                        step,
                        cfg.train.steps,
                        metrics.get("reward/mean", float("nan")),
                        metrics.get("em", float("nan")),
                        metrics.get("rollout/tool_calls_per_chain", float("nan")),
                    )
                if cfg.eval.every and step % cfg.eval.every == 0:
                    last_eval, evaluated_at = self.evaluate(step), step
                self.checkpointer.save(step, self.state_dict())
                shutdown.check()
            if evaluated_at != self.step:
                last_eval = self.evaluate(self.step)
            self.checkpointer.save(self.step, self.state_dict(), force=True)
            self.checkpointer.wait()
            if cfg.checkpoint.export_hf:
                self._export_hf(os.path.join(self.workdir, "hf_export"))
        finally:
            progress.close()
            shutdown.uninstall()
            self.writer.close()
            self.checkpointer.close()
        if cfg.logging.plot:
            self.writer.plot(keys=("reward/mean", "em", "eval/em", "update/entropy"))
        return last_eval

    def _export_hf(self, path: str) -> None:
        """The policy as a Hugging Face checkpoint, written by process 0 (the parameters are
        first gathered from every process: a collective)."""
        model = self.model
        if jax.process_count() > 1:
            local = parallel.gather_to_host(self.params, self.mesh)
            model = nnx.merge(self.graphdef, local, copy=False)
        if parallel.is_main_process():
            models.save_pretrained(
                model, path, dtype=self._export_dtype(), tokenizer=self.tokenizer
            )

    def _export_dtype(self) -> str:
        """``checkpoint.export_dtype``, by default the dtype of the checkpoint the run started
        from (float32 masters trained from a bfloat16 Qwen3 export as bfloat16), else the
        parameters' own dtype."""
        cfg = self.config
        if cfg.checkpoint.export_dtype:
            return components.dtype_of(cfg.checkpoint.export_dtype, "checkpoint.export_dtype")
        source = models.checkpoint_dtype(cfg.model.path) if cfg.model.path else None
        return source or self.model.config.param_dtype

    def _save_now(self) -> None:
        self.checkpointer.save(self.step, self.state_dict(), force=True)
        self.checkpointer.wait()
        self.writer.close()
