"""The launcher under abuse: a damaged checkpoint, a second run into a busy workdir, a run into a
used one, and SIGTERM during the warm start; each ends in one clear line or a clean recovery."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

from atpo_jax.train.metrics import read_metrics
from tests.train import runs
from tests.train.multidevice import HANG_GUARD_SCALE, REPO_ROOT


def _garble(path: str) -> None:
    with open(path, "rb") as f:
        data = bytearray(f.read())
    for i in range(len(data) // 2, min(len(data) // 2 + 16, len(data))):
        data[i] ^= 0x5A
    with open(path, "wb") as f:
        f.write(bytes(data))


def _largest_file(directory: str) -> str:
    files = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names]
    return max(files, key=os.path.getsize)


def test_a_damaged_checkpoint_is_refused_by_evaluate_and_skipped_by_resume(
    trained_run, run_overrides, child_env, tmp_path
):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained_run, workdir)
    args = [*runs.config_flags("tiny", run_overrides), f"--workdir={workdir}"]

    # A fresh run into the used workdir is refused, and changes nothing.
    fresh = runs.run_module("atpo_jax.launch", args, child_env)
    assert fresh.returncode == 2, fresh.stderr[-3000:]
    assert "configuration error: workdir" in fresh.stderr and "already holds a run" in fresh.stderr
    assert "Traceback" not in fresh.stderr

    # Garbled bytes in the parameters of the newest checkpoint (step 4; keep=3 leaves 2, 3, 4).
    checkpoints = os.path.join(workdir, "checkpoints")
    _garble(_largest_file(os.path.join(checkpoints, "4", "params", "d")))

    # The evaluator refuses it with one line.
    evaluated = runs.run_module(
        "atpo_jax.evaluate",
        [*runs.config_flags("tiny", run_overrides), f"--checkpoint={checkpoints}", "--step=4"],
        child_env,
    )
    assert evaluated.returncode == 2, evaluated.stderr[-3000:]
    assert "checkpoint error: checkpoint step 4 in" in evaluated.stderr
    assert "Traceback" not in evaluated.stderr

    # --resume reports step 4 as damaged, moves it aside, continues from step 3 and redoes step 4
    # exactly as the uninterrupted run did.
    written_before = len(read_metrics(os.path.join(workdir, "metrics.jsonl"), merge_steps=False))
    resumed = runs.check(runs.run_module(runs.TEST_REWARD_LAUNCHER, [*args, "--resume"], child_env))
    assert "checkpoint step 4 in" in resumed.stderr and "trying the previous" in resumed.stderr
    (damaged,) = os.listdir(checkpoints + "_damaged")
    assert damaged.startswith("4-")
    assert runs.listdir(checkpoints) == ["2", "3", "4"]
    new_lines = read_metrics(os.path.join(workdir, "metrics.jsonl"), merge_steps=False)
    redone: dict = {}
    for record in new_lines[written_before:]:
        redone.setdefault(record["step"], {}).update(runs.comparable(record))
    reference = {r["step"]: r for r in read_metrics(os.path.join(trained_run, "metrics.jsonl"))}
    assert sorted(redone) == [4]
    assert redone[4] == runs.comparable(reference[4])


class _Lines:
    """Collects a child's stderr lines in a thread (so the pipe never fills)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def text(self) -> str:
        self._thread.join(timeout=30)
        return "".join(self.lines)


def test_sigterm_during_the_warm_start_a_concurrent_run_then_resume(world_dir, child_env, tmp_path):
    workdir = str(tmp_path / "run")
    overrides = {
        **runs.TINY,
        **runs.SMALL_MODEL,
        "data.synthetic_dir": world_dir,
        "sft.steps": 100000,  # longer than the test: the signal must land during the warm start
        "train.steps": 1,
        "eval.max_questions": 2,
        "checkpoint.export_hf": False,
    }
    args = [*runs.config_flags("tiny", overrides), f"--workdir={workdir}"]
    first = subprocess.Popen(
        [sys.executable, "-m", "atpo_jax.launch", *args],
        env=child_env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = _Lines(first.stderr)
    try:
        runs.wait_for(
            lambda: log.has("warm start: 100000 supervised steps"),
            first,
            timeout=240,
            what="the warm start",
        )
        # A second run into the same workdir while the first holds it: refused, naming it.
        second = runs.run_module("atpo_jax.launch", args, child_env)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by another run (pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run did not notice

        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120 * HANG_GUARD_SCALE)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    stderr = log.text()
    assert first.returncode == 0, stderr[-4000:]
    assert "stopped during the warm start: nothing saved" in stderr
    checkpoints = os.path.join(workdir, "checkpoints")
    assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints)

    # --resume runs the warm start again (here a shorter one, accepted explicitly) and trains.
    resumed = runs.check(
        runs.run_module(
            "atpo_jax.launch",
            [*args, "--config.sft.steps=20", "--resume", "--resume_allow_changes=sft.steps"],
            child_env,
        )
    )
    assert "resuming with changed settings: sft.steps: 100000 -> 20" in resumed.stderr
    assert "Held-out evaluation after 1 steps" in resumed.stdout
    assert runs.listdir(checkpoints) == ["0", "1"]
