"""Resume: a run SIGKILLed mid-save continues exactly like an uninterrupted one (bitwise on CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
from flax import nnx

from atpo_jax.train.checkpointing import Checkpointer
from atpo_jax.train.metrics import read_metrics
from tests.train import runs
from tests.train.multidevice import REPO_ROOT

# Runs the launcher with orbax's final rename of checkpoint 3 hung: every file of step 3 is
# written but the step never becomes complete, as when a process dies in the middle of a save.
_HANG_SAVE_OF_STEP_3 = """
import asyncio, os, pathlib, sys
from orbax.checkpoint._src.path import atomicity

_finalize = atomicity.AtomicRenameTemporaryPath.finalize
READY = {ready!r}

async def finalize(self, *args, **kwargs):
    if os.path.basename(str(self.get_final())) == "3":
        pathlib.Path(READY).touch()
        while True:
            await asyncio.sleep(1)
    return await _finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
from absl import app
from atpo_jax import launch
from atpo_jax.rewards.qa import RewardSettings
from tests.train.launch_with_test_reward import training_reward
RewardSettings.score = training_reward  # the reference run's stand-in reward
sys.argv = ["atpo_jax.launch", *{args!r}]
app.run(launch.main)
"""


def _params(checkpoint_dir: str, step: int, like) -> dict:
    reader = Checkpointer(checkpoint_dir, read_only=True)
    try:
        return reader.restore(step, target=like)
    finally:
        reader.close()


def test_run_killed_mid_save_resumes_bitwise(trained_run, run_overrides, child_env, tmp_path):
    workdir = str(tmp_path / "run")
    checkpoints = os.path.join(workdir, "checkpoints")
    args = [*runs.config_flags("tiny", run_overrides), f"--workdir={workdir}"]
    ready = tmp_path / "saving_step_3"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_HANG_SAVE_OF_STEP_3).format(ready=str(ready), args=args),
        ],
        env=child_env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        runs.wait_for(ready.exists, proc, timeout=240, what="the save of step 3")
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    # Killed after step 2 (complete) while saving step 3: the partial save is ignored.
    assert runs.listdir(checkpoints) == ["0", "1", "2", "3.orbax-checkpoint-tmp"]
    reader = Checkpointer(checkpoints, read_only=True)
    assert reader.latest_step() == 2
    reader.close()
    written_before = len(read_metrics(os.path.join(workdir, "metrics.jsonl"), merge_steps=False))

    resumed = runs.check(runs.run_module(runs.TEST_REWARD_LAUNCHER, [*args, "--resume"], child_env))
    assert "Held-out evaluation after 4 steps" in resumed.stdout
    # The resumed run removed the partial save and wrote steps 3 and 4 (keep=3).
    assert runs.listdir(checkpoints) == ["2", "3", "4"]

    # Everything the resumed run logged equals the uninterrupted run's record of the same step,
    # value for value (wall-clock fields aside): rollouts, rewards, advantages, losses, eval.
    new_lines = read_metrics(os.path.join(workdir, "metrics.jsonl"), merge_steps=False)
    resumed_steps: dict[int, dict] = {}
    for record in new_lines[written_before:]:
        resumed_steps.setdefault(record["step"], {}).update(runs.comparable(record))
    reference = {r["step"]: r for r in read_metrics(os.path.join(trained_run, "metrics.jsonl"))}
    assert sorted(resumed_steps) == [3, 4]
    for step, got in resumed_steps.items():
        assert got == runs.comparable(reference[step]), step
    assert {"reward/mean", "advantage/std", "update/entropy", "eval/em"} <= set(resumed_steps[4])
    # The comparison has teeth: tools were called, updates moved the policy away from the
    # reference (KL > 0), so a wrong restore of params, optimizer or reference would show.
    assert reference[3]["rollout/tool_calls"] > 0 and reference[3]["update/grad_norm"] > 0
    assert reference[4]["update/kl_loss"] > 0

    # The final states are bitwise identical too.
    from atpo_jax import models

    model = models.from_pretrained(run_overrides["model.path"])
    params = nnx.split(model)[1]
    like = {"params": params, "ref_params": params}
    want = _params(os.path.join(trained_run, "checkpoints"), 4, like)
    got = _params(checkpoints, 4, like)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with (
        open(os.path.join(workdir, "eval_000004.json")) as f,
        open(os.path.join(trained_run, "eval_000004.json")) as g,
    ):
        assert f.read() == g.read()
