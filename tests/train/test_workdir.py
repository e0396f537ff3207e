"""Workdir ownership: one run per workdir, no silent mixing, resume only with the same run.

The claim rules are tested on ``claim_workdir`` directly, and through ``Trainer.train`` on a tiny
hand-built run (the same code path as the launcher)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from atpo_jax.train.optimizer import OptimizerSettings
from atpo_jax.train.settings import RunSettings
from atpo_jax.train.trainer import Trainer
from atpo_jax.train.workdir import (
    MANIFEST_FILE,
    WorkdirError,
    blocking_changes,
    claim_workdir,
    fingerprint,
    flat_settings,
    read_manifest,
)
from tests.train.multidevice import REPO_ROOT
from tests.train.test_trainer import hand_built_run


def _lr(settings: RunSettings, lr: float) -> RunSettings:
    return dataclasses.replace(
        settings, optim=dataclasses.replace(settings.optim, learning_rate=lr)
    )


def test_a_fresh_workdir_is_claimed_and_recorded(tmp_path):
    workdir = str(tmp_path / "run")
    claim = claim_workdir(workdir, RunSettings())
    try:
        manifest = read_manifest(workdir)
        assert manifest["settings"] == json.loads(json.dumps(flat_settings(RunSettings())))
        assert manifest["settings"]["optim.learning_rate"] == 1e-6
        assert manifest["code_version"].startswith("atpo_jax ")
        assert len(manifest["fingerprint"]) == 16
    finally:
        claim.release()
    # Released: the same process (or another) may claim it again, to resume.
    claim_workdir(workdir, RunSettings(), "resume").release()


def test_a_second_claim_while_the_first_holds_the_lock_is_refused(tmp_path):
    workdir = str(tmp_path / "run")
    # The holder is another process, as with two launcher runs started into one workdir.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from atpo_jax.train.settings import RunSettings
                from atpo_jax.train.workdir import claim_workdir
                claim = claim_workdir({workdir!r}, RunSettings())
                print("claimed", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(WorkdirError, match=rf"in use by another run \(pid {holder.pid} on "):
            claim_workdir(workdir, RunSettings(), "resume")
    finally:
        holder.communicate("", timeout=60)
    # The holder exited: the kernel released its lock, nothing stale remains.
    claim_workdir(workdir, RunSettings(), "resume").release()


def test_a_workdir_holding_a_run_refuses_a_fresh_run_and_overwrite_archives_it(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "0").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(WorkdirError, match=r"already holds a run \(checkpoints/, metrics.jsonl\)"):
        claim_workdir(str(workdir), RunSettings())
    # The refusal changed nothing.
    assert sorted(os.listdir(workdir)) == [".lock", "checkpoints", "metrics.jsonl"]

    claim = claim_workdir(str(workdir), RunSettings(), "overwrite")
    claim.release()
    (archived,) = os.listdir(workdir / "archive")
    assert claim.archived_to == str(workdir / "archive" / archived)
    assert sorted(os.listdir(claim.archived_to)) == ["checkpoints", "metrics.jsonl"]
    assert (workdir / "archive" / archived / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert sorted(os.listdir(workdir)) == [".lock", "archive", MANIFEST_FILE]


def test_resume_refuses_changes_that_change_the_run_unless_allowed(tmp_path):
    workdir = str(tmp_path / "run")
    claim_workdir(workdir, RunSettings()).release()
    changed = _lr(RunSettings(seed=3), 1e-5)
    with pytest.raises(WorkdirError) as err:
        claim_workdir(workdir, changed, "resume")
    message = str(err.value)
    assert "optim.learning_rate: 1e-06 -> 1e-05" in message and "seed: 0 -> 3" in message
    assert "--resume_allow_changes=optim.learning_rate,seed" in message
    # Allowed explicitly (a name or a whole section): accepted, reported, recorded.
    claim = claim_workdir(workdir, changed, "resume", allow_changes=("optim.*", "seed"))
    claim.release()
    assert claim.accepted_changes == {
        "optim.learning_rate": (1e-6, 1e-5),
        "seed": (0, 3),
    }
    assert read_manifest(workdir)["settings"]["optim.learning_rate"] == 1e-5
    # More steps, other logging, another mesh: the same run, continued.
    longer = dataclasses.replace(changed, train=dataclasses.replace(changed.train, steps=500))
    assert blocking_changes(flat_settings(changed), flat_settings(longer)) == {}
    claim_workdir(workdir, longer, "resume").release()


def test_an_unreadable_manifest_or_workdir_is_one_clear_error(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(WorkdirError, match=r"run.json is unreadable .*--overwrite"):
        claim_workdir(str(workdir), RunSettings(), "resume")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(WorkdirError, match=r"cannot use workdir .*choose a writable --workdir"):
        claim_workdir(str(blocker / "run"), RunSettings())


@pytest.fixture(scope="module")
def trained_workdir(world_dir, tmp_path_factory) -> str:
    """A hand-built run trained for one step (checkpoints 0 and 1, metrics, manifest)."""
    workdir = str(tmp_path_factory.mktemp("owned") / "run")
    Trainer(hand_built_run(world_dir, workdir)).train()
    return workdir


def _run_with(world_dir: str, workdir: str, **changes) -> Trainer:
    run = hand_built_run(world_dir, workdir)
    return Trainer(dataclasses.replace(run, settings=dataclasses.replace(run.settings, **changes)))


def test_the_trainer_claims_its_workdir(world_dir, trained_workdir):
    before = sorted(os.listdir(os.path.join(trained_workdir, "checkpoints")))
    with open(os.path.join(trained_workdir, "metrics.jsonl")) as f:
        metrics_before = f.read()
    # A fresh run into it is refused before anything is written.
    with pytest.raises(WorkdirError, match="already holds a run"):
        Trainer(hand_built_run(world_dir, trained_workdir)).train()
    # So is a resume with another learning rate...
    changed = _run_with(world_dir, trained_workdir, optim=OptimizerSettings(learning_rate=5e-3))
    with pytest.raises(WorkdirError, match=r"optim.learning_rate: 0.001 -> 0.005"):
        changed.train(resume=True)
    assert sorted(os.listdir(os.path.join(trained_workdir, "checkpoints"))) == before
    with open(os.path.join(trained_workdir, "metrics.jsonl")) as f:
        assert f.read() == metrics_before
    # ... while a resume asking for one more step continues the run.
    longer = _run_with(
        world_dir,
        trained_workdir,
        train=dataclasses.replace(hand_built_run(world_dir, "").settings.train, steps=2),
    )
    longer.train(resume=True)
    assert longer.state.step == 2
    assert sorted(longer.checkpointer.all_steps()) == [0, 1, 2]
    manifest = read_manifest(trained_workdir)
    assert manifest["settings"]["train.steps"] == 2
    assert manifest["resumed_from"] == fingerprint(
        flat_settings(hand_built_run(world_dir, "").settings)
    )


def test_resume_and_overwrite_exclude_each_other(world_dir, tmp_path):
    from atpo_jax.settings import ConfigError

    trainer = Trainer(hand_built_run(world_dir, str(tmp_path / "run")))
    with pytest.raises(ConfigError, match="pick one"):
        trainer.train(resume=True, overwrite=True)


def test_resume_moves_damaged_steps_aside_only_once_an_older_one_restores(
    world_dir, trained_workdir, tmp_path, monkeypatch
):
    from atpo_jax.train.checkpointing import CheckpointError

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained_workdir, workdir)
    trainer = Trainer(hand_built_run(world_dir, workdir))
    steps = trainer.checkpointer.all_steps()
    assert len(steps) >= 2
    restore = Trainer.restore

    def fails_from(first_bad):
        def restore_or_fail(self, step):
            if step >= first_bad:
                raise CheckpointError(step, f"checkpoint step {step}: damaged (test)")
            return restore(self, step)

        return restore_or_fail

    # Nothing restores (as when the settings do not fit any step): nothing is moved.
    monkeypatch.setattr(Trainer, "restore", fails_from(steps[0]))
    with pytest.raises(CheckpointError, match="no checkpoint in .* could be restored") as err:
        trainer._restore_newest_intact()
    assert all(f"checkpoint step {s}: damaged" in str(err.value) for s in steps)
    assert trainer.checkpointer.all_steps() == steps
    assert not os.path.exists(os.path.join(workdir, "checkpoints_damaged"))

    # Only the newest is damaged: the one before restores, then the newest is moved aside.
    monkeypatch.setattr(Trainer, "restore", fails_from(steps[-1]))
    state = trainer._restore_newest_intact()
    assert state.step == steps[-2]
    assert trainer.checkpointer.all_steps() == steps[:-1]
    (moved,) = os.listdir(os.path.join(workdir, "checkpoints_damaged"))
    assert moved.startswith(f"{steps[-1]}-")
