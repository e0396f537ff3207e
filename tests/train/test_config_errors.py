"""Clear errors: one message naming the setting (or file), before anything is compiled."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import pytest

from atpo_jax.builder import build_run
from atpo_jax.config import run_settings
from atpo_jax.data import read_rows, write_rows
from atpo_jax.settings import ConfigError
from atpo_jax.train.optimizer import adamw, build_schedule
from tests.train import runs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rollout.expansion_mode": "foo"}, "rollout.expansion_mode='foo' is not one of"),
        ({"rollout.samples_per_tree": 7}, "rollout.samples_per_tree=7 but the tree grows"),
        ({"rollout.mode": "chain"}, "set credit.mode='grpo'"),
        ({"credit.node_value_mode": "mean"}, "credit.node_value_mode='mean' is not one of"),
        ({"loss.policy_loss": "dpo"}, "loss.policy_loss='dpo' is not one of"),
        ({"loss.old_log_probs": "cached"}, "loss.old_log_probs='cached'"),
        ({"train.mini_batch_prompts": 3}, "train.mini_batch_prompts=3 must divide"),
        (
            {"train.packing": "padded", "train.micro_batch_rows": 5},
            "train.micro_batch_rows=5 must divide",
        ),
        ({"train.packing": "dense"}, "train.packing='dense' is not one of"),
        ({"train.micro_batch_tokens": 0}, "train.micro_batch_tokens=0 must be >= 1"),
        ({"train.steps": -1}, "train.steps must be >= 0"),
        ({"train.ppo_epochs": 0}, "train.ppo_epochs >= 1"),
        ({"train.log_every": 0}, "train.log_every=0 must be >= 1"),
        ({"model.attention_impl": "flash"}, "model.attention_impl='flash' is not one of"),
    ],
)
def test_invalid_values_name_the_setting(overrides, message, tmp_path):
    config = runs.load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_settings(config)
    # The builder validates first: no data is built, nothing compiled.
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "synthetic").exists()


def test_cudnn_attention_needs_a_gpu():
    settings = run_settings(runs.load_config("tiny", {"model.attention_impl": "cudnn"}))
    if jax.default_backend() == "gpu":
        settings.model.check_backend()  # accepted where the kernel exists
    else:
        with pytest.raises(ConfigError, match="model.attention_impl='cudnn' needs a CUDA GPU"):
            settings.model.check_backend()


def test_qwen3_4b_needs_model_data_and_retriever(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_run(runs.load_config("qwen3_4b"), str(tmp_path))
    message = str(err.value)
    for setting in ("model.path", "data.train_files", "tools.retriever_url"):
        assert setting in message
    # Only the missing ones are named.
    config = runs.load_config("qwen3_4b", {"model.path": "/ckpt/Qwen3-4B"})
    with pytest.raises(ConfigError) as err:
        build_run(config, str(tmp_path))
    assert "model.path" not in str(err.value).split(":")[0]
    assert "data.train_files" in str(err.value)


def _files_config(model_dir: str, overrides: dict) -> dict:
    return {"model.path": model_dir, "tools.corpus": "unused", **overrides}


def test_missing_model_path_directory(tiny_qwen3, qa_files, tmp_path):
    missing = str(tmp_path / "no-such-model")
    config = runs.load_config(
        "qwen3_4b",
        {"model.path": missing, "data.train_files": qa_files["train"], "tools.corpus": "x"},
    )
    with pytest.raises(ConfigError, match="data.tokenizer_path=.*no-such-model.* does not exist"):
        build_run(config, str(tmp_path / "run"))
    config = runs.load_config(
        "qwen3_4b",
        {
            "model.path": missing,
            "data.tokenizer_path": tiny_qwen3,
            "data.train_files": qa_files["train"],
            "tools.corpus": "x",
        },
    )
    with pytest.raises(ConfigError, match="tools.corpus='x' does not exist"):
        build_run(config, str(tmp_path / "run"))


def test_unreadable_data_files(tiny_qwen3, qa_files, tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    bad_jsonl = tmp_path / "bad.jsonl"
    rows = read_rows(qa_files["train"])[:2]
    write_rows(rows, bad_jsonl)
    with open(bad_jsonl, "a") as f:
        f.write('{"data_source": "x", "prompt": \n')
    wrong_type = tmp_path / "train.csv"
    wrong_type.write_text("a,b\n")
    cases = [
        ({"data.train_files": str(tmp_path / "absent.parquet")}, r"data.train_files=.*absent"),
        (
            {"data.train_files": str(garbage)},
            r"data.train_files: .*garbage.parquet: not a readable",
        ),
        ({"data.train_files": str(bad_jsonl)}, r"data.train_files: .*bad.jsonl line 3"),
        ({"data.train_files": str(wrong_type)}, r"data.train_files: .*unsupported dataset file"),
        (
            {"data.train_files": qa_files["train"], "data.eval_files": str(garbage)},
            r"data.eval_files: .*garbage.parquet",
        ),
    ]
    for overrides, message in cases:
        config = runs.load_config("qwen3_4b", _files_config(tiny_qwen3, overrides))
        with pytest.raises(ConfigError, match=message):
            build_run(config, str(tmp_path / "run"))


def test_unreadable_corpus_and_tokenizer(tiny_qwen3, qa_files, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "1", "contents": "a"}\nnot json\n')
    config = runs.load_config(
        "qwen3_4b",
        {
            "model.path": tiny_qwen3,
            "data.train_files": qa_files["train"],
            "tools.corpus": str(corpus),
        },
    )
    with pytest.raises(ConfigError, match="tools.corpus=.*corpus.jsonl"):
        build_run(config, str(tmp_path / "run"))
    empty = tmp_path / "empty"
    empty.mkdir()
    config = runs.load_config(
        "qwen3_4b",
        {
            "model.path": tiny_qwen3,
            "data.tokenizer_path": str(empty),
            "data.train_files": qa_files["train"],
            "tools.corpus": str(corpus),
        },
    )
    with pytest.raises(ConfigError, match="data.tokenizer_path=.*empty.*no tokenizer"):
        build_run(config, str(tmp_path / "run"))


def test_unreachable_retriever(world_dir, tmp_path):
    url = f"http://127.0.0.1:{runs.free_port()}/retrieve"
    config = runs.load_config(
        "tiny",
        {
            "data.synthetic_dir": world_dir,
            "tools.retriever_url": url,
            "tools.timeout_s": 1.0,
            "tools.retries": 1,
        },
    )
    with pytest.raises(ConfigError, match=f"tools.retriever_url='{url}'.*did not answer"):
        build_run(config, str(tmp_path / "run"))
    for overrides, message in [
        ({"tools.retries": 0}, "tools.retries=0"),
        ({"tools.retriever_url": "127.0.0.1:8000"}, "tools.retriever_url='127.0.0.1:8000'"),
    ]:
        config = runs.load_config(
            "tiny", {"data.synthetic_dir": world_dir, "tools.retriever_url": url, **overrides}
        )
        with pytest.raises(ConfigError, match=message):
            build_run(config, str(tmp_path / "run"))


@pytest.mark.parametrize(
    ("variant", "overrides", "message"),
    [
        ("tiny", {"rollout.expansion_mode": "foo"}, "rollout.expansion_mode='foo'"),
        ("qwen3_4b", {}, "the qwen3_4b variant needs model.path"),
        (
            "tiny",
            {"tools.retriever_url": "http://127.0.0.1:9/retrieve", "tools.retries": 1},
            "tools.retriever_url=",
        ),
        ("tiny", {"rollout.beam": 4}, "--config.rollout.beam names no setting"),
    ],
    ids=["invalid-value", "missing-model-path", "unreachable-retriever", "unknown-setting"],
)
def test_launcher_exits_2_with_one_message(
    variant, overrides, message, world_dir, child_env, tmp_path
):
    overrides = {"data.synthetic_dir": world_dir, **overrides}
    args = [*runs.config_flags(variant, overrides), f"--workdir={tmp_path / 'run'}"]
    proc = runs.run_module("atpo_jax.launch", args, child_env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("configuration error: ") and message in last, proc.stderr[-4000:]


def test_launcher_reports_a_corrupt_data_file(tiny_qwen3, tmp_path, child_env):
    garbage = tmp_path / "train.parquet"
    garbage.write_bytes(b"\0" * 64)
    overrides = {"model.path": tiny_qwen3, "data.train_files": str(garbage), "tools.corpus": "x"}
    args = [*runs.config_flags("qwen3_4b", overrides), f"--workdir={tmp_path / 'run'}"]
    proc = runs.run_module("atpo_jax.launch", args, child_env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("configuration error: data.train_files: ") and str(garbage) in last


# --- sizes, counts and numbers are checked with the settings (issue 20, item 7) -------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seed": -1}, "seed=-1 must be in [0, 2**63)"),
        ({"train.prompts_per_step": 0}, "train.prompts_per_step=0 must be >= 1"),
        ({"train.mini_batch_prompts": 0}, "train.mini_batch_prompts=0 must be >= 1"),
        (
            {"train.packing": "padded", "train.micro_batch_rows": 0},
            "train.micro_batch_rows=0 must be >= 1 (rows per micro-batch with "
            "train.packing='padded')",
        ),
        ({"rollout.decode_chunk": 0}, "rollout.decode_chunk must be >= 1, got 0"),
        ({"eval.batch_prompts": 0}, "eval.batch_prompts=0 must be >= 1"),
        ({"sft.batch_size": 0}, "sft.batch_size=0 must be >= 1"),
        # tiny grows 4 + 2 x 2 = 8 chains per tree: 9 slots with the prompt's.
        ({"rollout.num_slots": 8}, "rollout.num_slots=8 cannot hold one tree: it needs 1 + chains"),
        ({"model.random.head_dim": 15}, "model.random.head_dim=15 must be even"),
        ({"data.synthetic.num_countries": 1}, "data.synthetic.num_countries=1 must be >= 2"),
        (
            {"data.synthetic.validation_fraction": 0.0},
            "data.synthetic.validation_fraction=0.0 must be in (0, 1) (each split needs questions)",
        ),
        (
            {"data.synthetic.validation_fraction": 0.5, "data.synthetic.test_fraction": 0.5},
            "data.synthetic.validation_fraction + test_fraction = 1.0 must be < 1",
        ),
        (
            {"data.synthetic.demo_mistake_weights": (0.0, 0.0, 0.0)},
            "data.synthetic.demo_mistake_weights=(0.0, 0.0, 0.0) must be finite, >= 0 and not all 0",
        ),
        # NaN passes no comparison, inf most of them: each one is named.
        ({"loss.max_log_ratio": NAN}, "loss.max_log_ratio must be a finite number, got nan"),
        ({"loss.kl_coef": INF}, "loss.kl_coef must be a finite number, got inf"),
        ({"optim.grad_clip_norm": NAN}, "optim.grad_clip_norm=nan must be a finite number"),
        ({"optim.learning_rate": INF}, "optim.learning_rate=inf must be a finite number"),
        ({"rollout.expansion_penalty": NAN}, "rollout.expansion_penalty must be a finite number"),
        ({"rollout.temperature": INF}, "rollout.temperature must be a finite number >= 0"),
        ({"reward.python_bonus": NAN}, "reward.python_bonus must be a finite number (0: off)"),
        ({"tools.timeout_s": INF}, "tools.timeout_s=inf / tools.retries=4: the timeout must be"),
        ({"sft.learning_rate": NAN}, "sft.learning_rate=nan must be a finite number > 0"),
        # tiny: 120 steps x 1 update each.
        (
            {"optim.schedule": "cosine", "optim.warmup_steps": 120},
            "optim.schedule='cosine' decays over the run's 120 optimizer updates (train.steps x "
            "train.ppo_epochs x train.prompts_per_step / train.mini_batch_prompts), which must "
            "exceed optim.warmup_steps=120",
        ),
        (
            {"optim.warmup_steps": 121},
            "optim.warmup_steps=121 is longer than the run's 120 optimizer updates",
        ),
    ],
)
def test_sizes_and_numbers_fail_when_the_settings_are_built(overrides, message, tmp_path):
    config = runs.load_config("tiny", overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_settings(config)
    # Before the synthetic world, the model or the warm start: build_run stops at the settings.
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "synthetic").exists()


def test_a_schedule_horizon_given_by_the_run_is_accepted():
    # The decay ends after the warm-up (121 > 120); an explicit total_steps is the user's horizon.
    run_settings(runs.load_config("tiny", {"optim.schedule": "cosine", "optim.warmup_steps": 119}))
    run_settings(
        runs.load_config(
            "tiny",
            {"optim.schedule": "linear", "optim.warmup_steps": 500, "optim.total_steps": 1000},
        )
    )
    run_settings(runs.load_config("tiny", {"train.steps": 0, "optim.warmup_steps": 10}))


def test_one_sft_step_without_warmup_trains_at_the_peak_rate():
    # sft.warmup_steps=0 is no warm-up: the old floor of one warm-up step made the only update's
    # learning rate 0, so sft.steps=1 trained nothing.
    settings = run_settings(runs.load_config("tiny", {"sft.steps": 1, "sft.warmup_steps": 0}))
    optim = settings.sft.optimizer(settings.optim)
    assert float(build_schedule(optim)(0)) == pytest.approx(settings.sft.learning_rate)
    params = {"w": jnp.ones((2, 2))}
    optimizer = adamw(optim)
    updates, _ = optimizer.update({"w": jnp.ones((2, 2))}, optimizer.init(params), params)
    assert float(jnp.abs(updates["w"]).min()) > 0


def _files_run(tmp_path, train_file: str) -> dict:
    """A files run whose training file is read before anything else needs to exist."""
    return runs.load_config(
        "qwen3_4b",
        {
            "model.path": str(tmp_path),
            "data.train_files": train_file,
            "tools.corpus": "x",
        },
    )


def test_empty_training_file_and_empty_gold_are_configuration_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match=rf"data.train_files: {empty} has no rows"):
        build_run(_files_run(tmp_path, str(empty)), str(tmp_path / "run"))
    record = {
        "data_source": "nq",
        "prompt": [{"role": "user", "content": "who?"}],
        "reward_model": {"style": "rule", "ground_truth": {"target": [""]}},
    }
    blank = tmp_path / "blank_gold.jsonl"
    blank.write_text(json.dumps(record) + "\n")
    with pytest.raises(ConfigError, match=rf"{blank} line 1: reward_model.ground_truth.target"):
        build_run(_files_run(tmp_path, str(blank)), str(tmp_path / "run"))
