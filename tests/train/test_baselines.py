"""The paper's baselines as runs: each ``tiny_*`` baseline recipe trains from the warm policy, and
``python -m atpo_jax.evaluate`` on its checkpoint prints the paper's Table-1 layout.

The AEPO run is the ``qwen3_4b_aepo`` shape at tiny size (4 initial chains that branch with beam
2 up to 8, entropy-balanced clipping): its chains must branch (``rollout/branch_copies`` > 0).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from atpo_jax.builder import build_run
from atpo_jax.config import run_settings
from atpo_jax.data import read_rows, write_rows
from atpo_jax.train.metrics import read_metrics
from atpo_jax.train.trainer import Trainer
from tests.train import runs

METHODS = ("grpo", "gspo", "aepo")
# One question of each of the paper's benchmarks (and one more NQ) for the evaluation files.
BENCHMARKS = (
    "hotpotqa",
    "2wikimultihopqa",
    "musique",
    "bamboogle",
    "nq",
    "triviaqa",
    "popqa",
    "nq",
)


def short(world_dir: str, warm_model: str) -> dict:
    """One step of a tiny baseline recipe from the warm policy: its rollout shape kept (8 rows
    per question; AEPO 4 chains + branches), fewer prompts and tokens."""
    return {
        "data.synthetic_dir": world_dir,
        "model.path": warm_model,
        "sft.steps": 0,
        "train.steps": 1,
        "train.prompts_per_step": 2,
        "train.mini_batch_prompts": 2,
        "train.micro_batch_tokens": 1024,
        "rollout.max_response_len": 128,
        "rollout.num_slots": 18,
        "rollout.trace_every": 0,
        "eval.every": 0,
        "eval.max_questions": 8,
        "eval.batch_prompts": 8,
        "checkpoint.every": 1,
        "logging.tensorboard": False,
        "logging.plot": False,
    }


@pytest.fixture(scope="module")
def baseline_runs(world_dir, warm_model, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("baselines")
    workdirs = {}
    for method in METHODS:
        workdir = str(root / method)
        config = runs.load_config(f"tiny_{method}", short(world_dir, warm_model))
        Trainer(build_run(run_settings(config), workdir)).train()
        workdirs[method] = workdir
    return workdirs


@pytest.fixture(scope="module")
def benchmark_eval_file(world_dir, tmp_path_factory) -> str:
    """The world's test questions labelled with the paper's benchmark names."""
    rows = read_rows(os.path.join(world_dir, "test.parquet"))[: len(BENCHMARKS)]
    path = str(tmp_path_factory.mktemp("bench") / "test.parquet")
    write_rows(
        [dataclasses.replace(r, data_source=s) for r, s in zip(rows, BENCHMARKS, strict=True)],
        path,
    )
    return path


def trained_step(workdir: str) -> dict:
    return next(r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["step"] == 1)


def test_the_aepo_baseline_branches(baseline_runs):
    step = trained_step(baseline_runs["aepo"])
    assert step["rollout/branch_copies"] > 0
    assert step["rollout/tool_calls"] > 0
    # 2 questions x 8 chains, each a leaf: 4 initial per question, the rest copies or fresh.
    assert step["rollout/branch_copies"] + step["rollout/fresh_chains"] == 2 * (8 - 4)


@pytest.mark.parametrize("method", ["grpo", "gspo"])
def test_the_chain_baselines_do_not_branch(baseline_runs, method):
    step = trained_step(baseline_runs[method])
    assert step["rollout/branch_copies"] == 0 and step["rollout/fresh_chains"] == 0
    assert step["rollout/nodes_per_tree"] >= 8 + 1  # 8 independent chains below the root


@pytest.mark.parametrize("method", METHODS)
def test_evaluate_prints_the_table1_layout_for_each_baseline(
    method, baseline_runs, benchmark_eval_file, world_dir, warm_model, child_env, tmp_path
):
    overrides = {
        **short(world_dir, warm_model),
        "data.source": "files",
        "data.eval_files": benchmark_eval_file,
        "tools.corpus": os.path.join(world_dir, "corpus.jsonl"),
    }
    out = str(tmp_path / "eval")
    proc = runs.run_module(
        "atpo_jax.evaluate",
        [
            *runs.config_flags(f"tiny_{method}", overrides),
            f"--checkpoint={baseline_runs[method]}/checkpoints",
            f"--workdir={out}",
        ],
        child_env,
    )
    runs.check(proc)
    printed = proc.stdout
    assert "The paper's Table 1" in printed
    header = next(line for line in printed.splitlines() if "HotpotQA" in line)
    for label in ("HotpotQA", "2Wiki", "MuSiQue", "Bamboogle", "NQ", "TriviaQA", "PopQA"):
        assert label in header
    [table_file] = [f for f in os.listdir(out) if f.endswith("_table1.json")]
    with open(os.path.join(out, table_file)) as f:
        table = json.load(f)
    assert {k: v["n"] for k, v in table["benchmarks"].items()} == {
        "hotpotqa": 1,
        "2wikimultihopqa": 1,
        "musique": 1,
        "bamboogle": 1,
        "nq": 2,
        "triviaqa": 1,
        "popqa": 1,
    }
    assert table["multi_hop"]["status"] == table["single_hop"]["status"] == "complete"
    # The single-hop average weighs NQ's two questions twice (question-weighted).
    em = {k: v["em"] for k, v in table["benchmarks"].items()}
    want = (2 * em["nq"] + em["triviaqa"] + em["popqa"]) / 4
    assert table["single_hop"]["em"] == pytest.approx(want)
