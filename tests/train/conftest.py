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
    from atpo_jax.builder import load_data
    from atpo_jax.config import run_settings

    path = str(tmp_path_factory.mktemp("world") / "synthetic")
    load_data(run_settings(runs.load_config("tiny", {"data.synthetic_dir": path})), path)
    return path


@pytest.fixture(scope="session")
def warm_model(world_dir, tmp_path_factory) -> str:
    """A Hugging Face checkpoint of a small policy after 100 supervised steps on the demos."""
    from flax import nnx

    from atpo_jax.builder import load_data, policy_model
    from atpo_jax.config import run_settings
    from atpo_jax.data.synthetic import read_demos
    from atpo_jax.models import save_pretrained
    from atpo_jax.train.sft import SFTSettings, encode_demonstrations, run_sft

    settings = run_settings(
        runs.load_config("tiny", {**runs.TINY, **runs.SMALL_MODEL, "data.synthetic_dir": world_dir})
    )
    data = load_data(settings, world_dir)
    model, initial = policy_model(settings, data.tokenizer)
    rows = encode_demonstrations(
        data.tokenizer,
        read_demos(data.demos),
        settings.rollout.max_prompt_len,
        settings.rollout.max_response_len,
    )
    sft = SFTSettings(steps=100, batch_size=16, learning_rate=1e-2, warmup_steps=10)
    params, losses = run_sft(nnx.graphdef(model), initial(), rows, sft, settings.optim, seed=0)
    assert float(losses[-1]) < 0.5 * float(losses[0])
    path = str(tmp_path_factory.mktemp("warm") / "hf")
    save_pretrained(nnx.merge(nnx.graphdef(model), params), path, tokenizer=data.tokenizer)
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
    """The workdir of an uninterrupted 4-step launcher run (checkpoints, metrics, hf_export).

    It trains on the stand-in hashed reward (``launch_with_test_reward``): the 4-step policy
    answers nothing right, so the real reward is the same everywhere and no update would move it;
    evaluation keeps the real reward."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    args = [*runs.config_flags("tiny", run_overrides), f"--workdir={workdir}"]
    runs.check(runs.run_module(runs.TEST_REWARD_LAUNCHER, args, child_env))
    assert os.path.isfile(os.path.join(workdir, "hf_export", "config.json"))
    return workdir


@pytest.fixture(scope="session")
def tiny_qwen3(world_dir, tmp_path_factory) -> str:
    """A random 2-layer Qwen3 saved by transformers, with the synthetic world's tokenizer."""
    import torch
    import transformers

    from atpo_jax.data.synthetic import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(world_dir, "tokenizer"))
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3")
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qa_files(world_dir, tmp_path_factory) -> dict[str, str]:
    """Small Search-R1-format parquet files (``train``, ``test``) with the world's questions."""
    from atpo_jax.data import read_rows, write_rows

    root = tmp_path_factory.mktemp("qa")
    files = {"train": str(root / "train.parquet"), "test": str(root / "test.parquet")}
    write_rows(read_rows(os.path.join(world_dir, "train.parquet"))[:16], files["train"])
    write_rows(read_rows(os.path.join(world_dir, "test.parquet"))[:8], files["test"])
    return files


@pytest.fixture(scope="session")
def world_dense_index(world_dir, tmp_path_factory) -> dict[str, str]:
    """The settings of ``tools.method=dense`` over the world's corpus: a dense index built here
    with a tiny random e5-style encoder (tests/tools/dense_helpers.py)."""
    from atpo_jax.models.text_encoder import TextEncoder
    from atpo_jax.tools.dense_index import build_dense_index
    from tests.tools.dense_helpers import save_tiny_bert

    root = tmp_path_factory.mktemp("dense")
    encoder, index = str(root / "encoder"), str(root / "index")
    save_tiny_bert(encoder)
    build_dense_index(
        TextEncoder.from_pretrained(encoder, max_length=32, batch_size=64),
        os.path.join(world_dir, "corpus.jsonl"),
        index,
        shard_size=64,
        progress=False,
    )
    return {"tools.method": "dense", "tools.index": index, "tools.encoder": encoder}
