"""``python -m atpo_jax.evaluate`` on a trained run's checkpoints and on its Hugging Face export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

from atpo_jax import evaluate
from atpo_jax.settings import ConfigError
from tests.train import runs
from tests.train.multidevice import run_python

_ADDED = ("checkpoint", "step", "eval_split")


def _trainer_eval(run: str, step: int) -> dict:
    with open(os.path.join(run, f"eval_{step:06d}.json")) as f:
        return json.load(f)


def _without_added(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in _ADDED}


def _table_row(results: dict, source: str) -> str:
    r = results["by_source"][source]
    return f"| {source} | {r['n']} | {100 * r['em']:.2f} | {100 * r['f1']:.2f} |"


def test_evaluate_an_orbax_checkpoint(trained_run, run_overrides, child_env, tmp_path):
    out = str(tmp_path / "out")
    args = [
        *runs.config_flags("tiny", run_overrides),
        f"--checkpoint={trained_run}/checkpoints",
        "--step=4",
        f"--workdir={out}",
    ]
    proc = runs.check(runs.run_module("atpo_jax.evaluate", args, child_env, timeout=180))
    with open(os.path.join(out, "evaluation_step_000004.json")) as f:
        results = json.load(f)
    assert results["step"] == 4 and results["checkpoint"] == f"{trained_run}/checkpoints"
    assert results["eval_split"] == "test" and results["n"] == 4
    # The same greedy evaluation as the trainer's own at the end of the run, answer for answer.
    assert _without_added(results) == _trainer_eval(trained_run, 4)
    assert f"Greedy evaluation of {trained_run}/checkpoints step 4 (4 questions):" in proc.stdout
    assert "| data_source | n | EM | F1 |" in proc.stdout
    for source in results["by_source"]:
        assert _table_row(results, source) in proc.stdout
    assert "| all questions | 4 |" in proc.stdout
    # The paper's Table 1 layout too; the synthetic sources are in its "other" section.
    assert "| | HotpotQA | 2Wiki | MuSiQue | Bamboogle | multi-hop avg | NQ |" in proc.stdout
    assert "None of the paper's seven benchmarks is in the evaluation data." in proc.stdout
    assert "Other data sources (not in the paper's Table 1):" in proc.stdout
    with open(os.path.join(out, "evaluation_step_000004_table1.json")) as f:
        table = json.load(f)
    assert table["other"]["sources"] == results["by_source"]
    assert table["multi_hop"]["status"] == table["single_hop"]["status"] == "absent"
    with open(os.path.join(out, "evaluation_step_000004_table1.md")) as f:
        assert f.read().startswith("| | HotpotQA | 2Wiki |")


def test_evaluate_a_hugging_face_export(trained_run, world_dir, child_env, tmp_path):
    # A copy of the run directory's export, evaluated with the default output location (the run).
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(os.path.join(trained_run, "metrics.jsonl"), run)
    shutil.copytree(os.path.join(trained_run, "hf_export"), run / "hf_export")
    overrides = {**runs.TINY, "data.synthetic_dir": world_dir}  # no model.path: the export is it
    args = [*runs.config_flags("tiny", overrides), f"--checkpoint={run / 'hf_export'}"]
    proc = runs.check(runs.run_module("atpo_jax.evaluate", args, child_env, timeout=180))
    with open(run / "evaluation_hf_export.json") as f:
        results = json.load(f)
    assert results["step"] is None and results["checkpoint"] == str(run / "hf_export")
    assert _without_added(results) == _trainer_eval(trained_run, 4)
    assert f"saved {run / 'evaluation_hf_export.json'}" in proc.stdout


def test_checkpoint_step_selection(trained_run, tmp_path):
    checkpoints = os.path.join(trained_run, "checkpoints")
    assert evaluate._checkpoint_step(checkpoints, None) == 4
    assert evaluate._checkpoint_step(checkpoints, 3) == 3
    with pytest.raises(ConfigError, match=r"--step=1: .* has complete checkpoints \[2, 3, 4\]"):
        evaluate._checkpoint_step(checkpoints, 1)
    # An interrupted save is not a checkpoint.
    partial = tmp_path / "checkpoints"
    (partial / "7.orbax-checkpoint-tmp" / "params").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        evaluate._checkpoint_step(str(partial), None)


def test_evaluate_errors(trained_run, run_overrides, world_dir, tmp_path):
    config = runs.load_config("tiny", run_overrides)
    with pytest.raises(ConfigError, match="--checkpoint=.*absent.* is not a directory"):
        evaluate.evaluate_checkpoint(config, str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="--step only applies to orbax"):
        evaluate.evaluate_checkpoint(config, os.path.join(trained_run, "hf_export"), step=3)
    # A model built from different settings than the run's: the message says what to pass.
    other = runs.load_config(
        "tiny", {**runs.TINY, "data.synthetic_dir": world_dir, "model.random.hidden_size": 32}
    )
    with pytest.raises(ConfigError, match="do not fit the model built from the config"):
        evaluate.evaluate_checkpoint(
            other, os.path.join(trained_run, "checkpoints"), workdir=str(tmp_path / "out")
        )


def test_evaluate_cli_exits_2(world_dir, child_env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [
        *runs.config_flags("tiny", {"data.synthetic_dir": world_dir}),
        f"--checkpoint={empty}",
    ]
    proc = runs.run_module("atpo_jax.evaluate", args, child_env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("configuration error: --checkpoint=") and "no complete checkpoint" in last
    )


def test_evaluate_on_an_8_device_mesh(trained_run, run_overrides, child_env, tmp_path):
    # The parameters sharded fsdp=8 (read from the checkpoint straight into their shards) and the
    # engine's KV cache over the mesh: the same greedy answers as the one-device trainer.
    out = run_python(
        f"""
        from atpo_jax.evaluate import evaluate_checkpoint
        from tests.train.runs import load_config

        config = load_config("tiny", {{**{run_overrides!r}, "mesh.data": 1, "mesh.fsdp": -1}})
        results, _ = evaluate_checkpoint(
            config, {trained_run + "/checkpoints"!r}, step=4, workdir={str(tmp_path)!r}
        )
        import jax
        emit({{"results": results, "devices": jax.device_count()}})
        """,
        devices=8,
        timeout=240,
        env={k: v for k, v in child_env.items() if k.startswith("JAX_")},  # the compile cache
    )
    assert out["devices"] == 8
    assert _without_added(out["results"]) == _trainer_eval(trained_run, 4)


def test_evaluating_the_paper_recipe_needs_no_training_files(
    tiny_qwen3, qa_files, world_dir, tmp_path
):
    """``qwen3_4b`` requires training files to train, not to evaluate a checkpoint; its Table 1
    names the paper's benchmarks found in the evaluation files (here: two questions labelled
    ``hotpotqa`` and ``nq``)."""
    from atpo_jax.data import read_rows, write_rows

    rows = read_rows(qa_files["test"])[:2]
    eval_file = str(tmp_path / "test.parquet")
    write_rows(
        [
            dataclasses.replace(r, data_source=s)
            for r, s in zip(rows, ("hotpotqa", "nq"), strict=True)
        ],
        eval_file,
    )
    config = runs.load_config(
        "qwen3_4b",
        {
            "data.eval_files": eval_file,
            "tools.corpus": os.path.join(world_dir, "corpus.jsonl"),
            "eval.max_questions": 2,
            "eval.batch_prompts": 2,
            "rollout.max_prompt_len": 128,
            "rollout.max_response_len": 16,
            "rollout.kv_bucket": 16,
        },
    )
    results, path = evaluate.evaluate_checkpoint(config, tiny_qwen3, workdir=str(tmp_path / "out"))
    assert results["n"] == 2 and results["eval_split"] == eval_file
    assert os.path.isfile(path)
    with open(path.replace(".json", "_table1.json")) as f:
        table = json.load(f)
    assert {k: v["n"] for k, v in table["benchmarks"].items()} == {"hotpotqa": 1, "nq": 1}
    assert (
        table["multi_hop"]["members"] == ["hotpotqa"] and table["multi_hop"]["status"] == "partial"
    )
    assert table["multi_hop"]["em"] == results["by_source"]["hotpotqa"]["em"]
    assert table["single_hop"]["members"] == ["nq"] and table["other"]["sources"] == {}
