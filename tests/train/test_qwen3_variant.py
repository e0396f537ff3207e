"""The paper's ``qwen3_4b`` variant, end to end on a tiny random Qwen3 and the retrieval server."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import httpx
import pytest

from atpo_jax.train.checkpointing import Checkpointer
from atpo_jax.train.metrics import read_metrics
from tests.train import runs
from tests.train.multidevice import REPO_ROOT


@pytest.fixture(scope="module")
def retriever_url(world_dir, child_env):
    """``python -m atpo_jax.tools.retrieval_server`` over the world's corpus, on a free port."""
    port = runs.free_port()
    corpus = os.path.join(world_dir, "corpus.jsonl")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atpo_jax.tools.retrieval_server",
            f"--corpus={corpus}",
            f"--port={port}",
        ],
        env=child_env,
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        runs.wait_for(healthy, proc, timeout=120, what="the retrieval server")
        yield f"http://127.0.0.1:{port}/retrieve"
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_qwen3_4b_variant_runs_one_step(tiny_qwen3, qa_files, retriever_url, child_env, tmp_path):
    workdir = str(tmp_path / "run")
    overrides = {
        # What the variant requires.
        "model.path": tiny_qwen3,
        "data.train_files": qa_files["train"],
        "data.eval_files": qa_files["test"],
        "tools.retriever_url": retriever_url,
        # Shapes reduced; everything else is the paper's recipe (bf16, remat, atpo loss, ...).
        "rollout.initial_rollouts": 2,
        "rollout.expansion_iterations": 1,
        "rollout.beam_size": 1,
        "rollout.samples_per_tree": 3,
        "rollout.max_prompt_len": 128,
        "rollout.max_response_len": 64,
        "rollout.num_slots": 16,
        "rollout.kv_bucket": 64,
        "train.steps": 1,
        "train.prompts_per_step": 2,
        "train.mini_batch_prompts": 2,
        "train.micro_batch_rows": 3,
        "eval.max_questions": 2,
        "eval.batch_prompts": 2,
    }
    args = [*runs.config_flags("qwen3_4b", overrides), f"--workdir={workdir}"]
    proc = runs.check(runs.run_module("atpo_jax.launch", args, child_env, timeout=300))
    assert "Held-out evaluation after 1 steps" in proc.stdout
    assert "| all questions | 2 |" in proc.stdout

    metrics = {r["step"]: r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))}
    step = metrics[1]
    assert -1.0 <= step["reward/mean"] <= 1.0
    assert step["rollout/generated_tokens"] > 0
    assert step["trained_tokens"] > 0
    assert step["lr"] == pytest.approx(1e-6)  # the paper's learning rate
    for key in ("update/loss", "update/entropy", "update/grad_norm", "update/ppo_kl"):
        assert math.isfinite(step[key]), key
    assert "eval/em" in metrics[1] and "eval/em" in metrics[0]

    reader = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert reader.all_steps() == [0, 1]
    reader.close()
    with open(os.path.join(workdir, "hf_export", "config.json")) as f:
        exported = json.load(f)
    assert exported["model_type"] == "qwen3" and exported["num_hidden_layers"] == 2
    with open(os.path.join(workdir, "eval_000001.json")) as f:
        assert json.load(f)["n"] == 2
