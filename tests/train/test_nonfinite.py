"""Non-finite losses are acted on: a run stops after ``train.max_nonfinite_skips`` skipped updates
in a row, a run whose every update was skipped fails, and the warm start checks its loss."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from atpo_jax.train import trainer as trainer_module
from atpo_jax.train.checkpointing import Checkpointer
from atpo_jax.train.optimizer import NonFiniteError, nonfinite_skips
from atpo_jax.train.sft import SFTSettings
from atpo_jax.train.trainer import Trainer
from tests.train.test_trainer import hand_built_run


def _nan_run(world_dir: str, workdir: str, *, steps: int, max_skips: int):
    """The hand-built run, its old log-probs NaN: every update's loss and gradients are NaN."""
    run = hand_built_run(world_dir, workdir)
    score = run.log_prob_fn
    train = dataclasses.replace(run.settings.train, steps=steps, max_nonfinite_skips=max_skips)
    return dataclasses.replace(
        run,
        settings=dataclasses.replace(run.settings, train=train),
        log_prob_fn=lambda params, rows: score(params, rows) * jnp.nan,
    )


def test_the_run_stops_after_max_nonfinite_skips_in_a_row(world_dir, tmp_path):
    workdir = str(tmp_path / "run")
    trainer = Trainer(_nan_run(world_dir, workdir, steps=5, max_skips=2))
    with pytest.raises(NonFiniteError, match=r"step 2: the last 2 optimizer updates were skipped"):
        trainer.train()
    assert int(nonfinite_skips(trainer.state.opt_state)) == 2
    # The skipped updates left the weights as they were; checkpoints up to step 1 are intact.
    reader = Checkpointer(f"{workdir}/checkpoints", read_only=True)
    assert reader.all_steps() == [0, 1]
    reader.close()


def test_a_run_whose_every_update_was_skipped_fails(world_dir, tmp_path):
    trainer = Trainer(_nan_run(world_dir, str(tmp_path / "run"), steps=1, max_skips=0))
    with pytest.raises(
        NonFiniteError, match=r"every optimizer update of the run \(1\) was skipped"
    ):
        trainer.train()


def test_the_warm_start_checks_its_loss(world_dir, tmp_path, monkeypatch):
    run = hand_built_run(world_dir, str(tmp_path / "run"))
    run = dataclasses.replace(
        run, settings=dataclasses.replace(run.settings, sft=SFTSettings(steps=3))
    )
    trainer = Trainer(run)

    def diverging_warm_start(graphdef, params, *args, **kwargs):
        return params, [2.5, 1.5, float(np.nan)]

    monkeypatch.setattr(trainer_module, "warm_start", diverging_warm_start)
    with pytest.raises(NonFiniteError, match=r"the warm start's loss was nan at SFT step 3 of 3"):
        trainer.warm_start(trainer.initial_state())
