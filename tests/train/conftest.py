"""Session fixtures for the trainer tests: one synthetic world, one warm-started policy, one run.

Building these once keeps the trainer tests to a few minutes on two cores: the world (corpus,
questions, tokenizer), a small policy that learned the tool-call format from the world's
demonstrations (so rollouts really call the retriever), and an uninterrupted 4-step run from it
whose metrics, checkpoints and Hugging Face export several tests read.
"""

from __future__ import annotations

import os

import pytest

from tests.train import runs


@pytest.fixture(scope="session")
def child_env(tmp_path_factory) -> dict[str, str]:
    """Environment of trainer subprocesses, sharing one JAX compilation cache for the session."""
    return runs.run_env(str(tmp_path_factory.mktemp("jax_cache")))


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> str:
    """The default synthetic world, built once (``data.synthetic_dir`` of every run here)."""
    from atpo_jax.train import components

    path = str(tmp_path_factory.mktemp("world") / "synthetic")
    components.load_data(runs.load_config("tiny", {"data.synthetic_dir": path}), path)
    return path


@pytest.fixture(scope="session")
def warm_model(world_dir, tmp_path_factory) -> str:
    """A Hugging Face checkpoint of a small policy after 100 supervised steps on the demos."""
    from atpo_jax.data.synthetic import read_demos
    from atpo_jax.models import save_pretrained
    from atpo_jax.train import components
    from atpo_jax.train.sft import encode_demonstrations, run_sft

    config = runs.load_config(
        "tiny", {**runs.TINY, **runs.SMALL_MODEL, "data.synthetic_dir": world_dir}
    )
    data = components.load_data(config, world_dir)
    model = components.build_policy(config, data.tokenizer)
    rows = encode_demonstrations(
        data.tokenizer,
        read_demos(data.demos),
        config.rollout.max_prompt_len,
        config.rollout.max_response_len,
    )
    losses = run_sft(
        model, rows, steps=100, batch_size=16, learning_rate=1e-2, warmup_steps=10, seed=0
    )
    assert float(losses[-1]) < 0.5 * float(losses[0])
    path = str(tmp_path_factory.mktemp("warm") / "hf")
    save_pretrained(model, path, tokenizer=data.tokenizer)
    return path


@pytest.fixture(scope="session")
def run_overrides(world_dir, warm_model) -> dict:
    """Settings of the RL runs: the tiny shapes, the shared world, RL from the warm policy."""
    return {
        **runs.TINY,
        "data.synthetic_dir": world_dir,
        "model.path": warm_model,
        "sft.steps": 0,
        "train.steps": 4,
        "loss.kl_coef": 0.001,  # exercises the reference policy (and its checkpointing) too
    }


@pytest.fixture(scope="session")
def trained_run(run_overrides, child_env, tmp_path_factory) -> str:
    """The workdir of an uninterrupted 4-step launcher run (checkpoints, metrics, hf_export)."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    args = [*runs.config_flags("tiny", run_overrides), f"--workdir={workdir}"]
    runs.check(runs.run_module("atpo_jax.launch", args, child_env))
    assert os.path.isfile(os.path.join(workdir, "hf_export", "config.json"))
    return workdir
