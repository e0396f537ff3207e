"""The training loop on a hand-built Run: no config file, every part constructed in Python."""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from atpo_jax import models, parallel
from atpo_jax.data import read_rows
from atpo_jax.data.prompts import encode_prompt
from atpo_jax.data.synthetic import load_tokenizer
from atpo_jax.rollout.engine import Engine
from atpo_jax.rollout.settings import RolloutSettings
from atpo_jax.rollout.tree_search import TreeSearch
from atpo_jax.tools.bm25 import LocalBM25Retriever
from atpo_jax.tools.search import SearchTool
from atpo_jax.tools.toolbox import Toolbox
from atpo_jax.train.checkpointing import CheckpointSettings
from atpo_jax.train.evaluation import EvalSettings
from atpo_jax.train.metrics import LoggingSettings, read_metrics
from atpo_jax.train.optimizer import OptimizerSettings, build_optimizer
from atpo_jax.train.policy import LossSettings, make_log_prob_fn, make_update_fn
from atpo_jax.train.run import Data, Run
from atpo_jax.train.settings import RunSettings, TrainSettings
from atpo_jax.train.trainer import Trainer


def hand_built_run(world_dir: str, workdir: str) -> Run:
    tokenizer = load_tokenizer(os.path.join(world_dir, "tokenizer"))
    train = read_rows(os.path.join(world_dir, "train.parquet"))[:8]
    data = Data(
        train=train,
        eval=read_rows(os.path.join(world_dir, "test.parquet"))[:2],
        tokenizer=tokenizer,
    )
    rollout = RolloutSettings(
        initial_rollouts=2,
        expansion_iterations=1,
        beam_size=1,
        samples_per_tree=3,
        max_prompt_len=64,
        max_response_len=32,
        num_slots=16,
        kv_bucket=32,
    )
    settings = RunSettings(
        rollout=rollout,
        loss=LossSettings(clip_low=0.2, clip_high=0.28),
        optim=OptimizerSettings(learning_rate=1e-3),
        # The padded layout (the trainer's packed path is what the launcher runs use).
        train=TrainSettings(
            steps=1, prompts_per_step=2, mini_batch_prompts=2, packing="padded", micro_batch_rows=3
        ),
        eval=EvalSettings(every=0, batch_prompts=2),
        checkpoint=CheckpointSettings(every=1),
        logging=LoggingSettings(tensorboard=False, plot=False),
    )
    config = models.ModelConfig(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
    )  # fmt: skip
    model = nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))
    placement = parallel.Placement.create(parallel.make_mesh(), nnx.state(model))
    toolbox = Toolbox([SearchTool(LocalBM25Retriever(os.path.join(world_dir, "corpus.jsonl")))])

    def search(settings: RolloutSettings, greedy: bool) -> TreeSearch:
        engine = Engine(
            model,
            num_slots=settings.num_slots,
            max_len=settings.max_len,
            eos_token_ids=[tokenizer.eos_token_id],
            sampling=settings.sampling(len(tokenizer), greedy=greedy),
            stop_strings=toolbox.stop_strings,
            decode=tokenizer.decode,
            kv_bucket=settings.kv_bucket,
        )
        return TreeSearch(engine, tokenizer, toolbox, settings, eos_token_id=tokenizer.eos_token_id)

    optimizer = build_optimizer(settings.optim)
    graphdef = nnx.graphdef(model)
    return Run(
        settings=settings,
        workdir=workdir,
        data=data,
        train_prompts=[encode_prompt(tokenizer, row.prompt) for row in train],
        model=model,
        initial_params=lambda: placement.place(
            nnx.state(models.CausalLM(config, rngs=nnx.Rngs(0)))
        ),
        placement=placement,
        toolbox=toolbox,
        search=search(rollout, greedy=False),
        eval_search=search(rollout.for_evaluation(), greedy=True),
        optimizer=optimizer,
        optim=settings.optim,
        update_fn=make_update_fn(graphdef, optimizer, settings.loss, 3),
        log_prob_fn=make_log_prob_fn(graphdef, 3),
        export_dtype="bfloat16",
    )


def test_a_hand_built_run_trains_checkpoints_and_exports(world_dir, tmp_path):
    run = hand_built_run(world_dir, str(tmp_path / "run"))
    trainer = Trainer(run)
    initial = run.initial_params()
    results = trainer.train()
    state = trainer.state
    assert state.step == 1 and state.data_position == 2
    assert results["n"] == 2  # the held-out evaluation after the last step
    # The update moved the weights; the state is their only holder (engines keep no weights).
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial), strict=True)
    ]
    assert any(moved)
    for engine in (run.search.engine, run.eval_search.engine):
        assert not any(isinstance(v, nnx.State) for v in vars(engine).values())
    # Checkpoints 0 (the initial policy) and 1, a metrics line per step, the export in bfloat16.
    assert sorted(trainer.checkpointer.all_steps()) == [0, 1]
    records = read_metrics(os.path.join(run.workdir, "metrics.jsonl"))
    step1 = next(r for r in records if r["step"] == 1)
    assert {"reward/mean", "update/loss", "rollout/tool_calls", "time/update_s"} <= set(step1)
    # A step is a function of the state: the same step from the same start, the same weights.
    again, _ = trainer.train_step(trainer.initial_state(), 1)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exported = models.from_pretrained(os.path.join(run.workdir, "hf_export"))
    assert models.checkpoint_dtype(os.path.join(run.workdir, "hf_export")) == "bfloat16"
    want = {k: np.asarray(v, np.float32) for k, v in nnx.to_flat_state(state.params)}
    for path, value in nnx.to_flat_state(nnx.state(exported)):
        np.testing.assert_array_equal(
            np.asarray(value[...], np.float32),
            np.asarray(np.asarray(want[path][...]).astype("bfloat16"), np.float32),
        )
