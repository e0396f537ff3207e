"""Helpers for tests that run the trainer: configs with tiny overrides, launcher subprocesses.

Every run in these tests uses the same small shapes (``TINY``) so that the JIT programs compiled by
one subprocess are reused by the next through JAX's persistent compilation cache (``run_env``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from tests.train.multidevice import HANG_GUARD_SCALE, REPO_ROOT, subprocess_env

CONFIG_FILE = str(REPO_ROOT / "configs" / "search_qa.py")
# ``atpo_jax.launch`` training on a hashed stand-in reward (real advantages from any policy).
TEST_REWARD_LAUNCHER = "tests.train.launch_with_test_reward"

# A small tree (2 initial chains + 1 expansion = 3 leaves), 2 prompts per step, short responses.
TINY: dict[str, Any] = {
    "rollout.initial_rollouts": 2,
    "rollout.expansion_iterations": 1,
    "rollout.beam_size": 1,
    "rollout.samples_per_tree": 3,
    "rollout.max_response_len": 96,
    "rollout.num_slots": 16,
    "rollout.trace_every": 0,
    "train.prompts_per_step": 2,
    "train.mini_batch_prompts": 2,
    "train.micro_batch_rows": 3,
    "eval.max_questions": 4,
    "eval.batch_prompts": 4,
    "checkpoint.every": 1,
    "checkpoint.keep": 3,
    "logging.tensorboard": False,
    "logging.plot": False,
}

# The policy shape of the runs that start from scratch (the warm-start model has it too).
SMALL_MODEL: dict[str, Any] = {
    "model.random.hidden_size": 64,
    "model.random.intermediate_size": 128,
    "model.random.num_layers": 2,
    "model.random.num_heads": 2,
    "model.random.num_kv_heads": 1,
}


def load_config(
    variant: str = "tiny", overrides: Mapping[str, Any] = ()
) -> ml_collections.ConfigDict:
    """``configs/search_qa.py:<variant>`` with dotted ``overrides`` applied (as ``--config.x=v``)."""
    config = load_config_module().get_config(variant)
    config.update_from_flattened_dict(dict(overrides))
    return config


def load_config_module() -> Any:
    """``configs/search_qa.py`` as a module (``VARIANTS``, ``get_config``)."""
    spec = importlib.util.spec_from_file_location("search_qa_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_flags(variant: str, overrides: Mapping[str, Any]) -> list[str]:
    """The command-line form of ``load_config(variant, overrides)``."""
    flags = [f"--config={CONFIG_FILE}:{variant}"]
    for key, value in overrides.items():
        flags.append(f"--config.{key}={value}")
    return flags


def run_env(cache_dir: str) -> dict[str, str]:
    """A child's environment: one CPU device, the repo importable, a shared compilation cache."""
    return subprocess_env(
        devices=1,
        extra={
            "JAX_COMPILATION_CACHE_DIR": cache_dir,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        },
    )


def run_module(
    module: str, args: list[str], env: dict[str, str], *, timeout: float = 240.0
) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in the repo root; fails the test (with the output) on timeout."""
    try:
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout * HANG_GUARD_SCALE,
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"python -m {module} timed out after {timeout * HANG_GUARD_SCALE}s\n{err.stdout}\n{err.stderr}"
        ) from None


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Asserts a child exited 0, showing the end of its output otherwise."""
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- stderr ---\n{proc.stderr[-8000:]}"
    )
    return proc


def wait_for(
    predicate: Callable[[], bool], proc: subprocess.Popen, *, timeout: float, what: str
) -> None:
    """Polls ``predicate`` until true; fails (killing ``proc``) if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout * HANG_GUARD_SCALE
    while not predicate():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"child exited {proc.returncode} before {what}:\n{err[-8000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=30)
            raise AssertionError(f"timed out waiting for {what}:\n{err[-8000:]}")
        time.sleep(0.05)


def comparable(record: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics record without wall-clock fields (``time``, ``time/*``, ``throughput/*``)."""
    return {
        key: value
        for key, value in record.items()
        if key != "time" and not key.startswith(("time/", "throughput/", "schedule/"))
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listdir(path: str | os.PathLike) -> list[str]:
    return sorted(os.listdir(path))
