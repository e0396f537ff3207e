"""One RL step of the ``qwen3_4b`` recipe (shapes reduced) with a random Qwen3 at the real
vocabulary size (151,936 embedding rows), the real Qwen3 tokenizer, the paper's prompt and a small
BM25 corpus of real-looking passages."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.fidelity.qwen3_tokenizer import QWEN3_VOCAB_ROWS

PASSAGES = [
    (
        "Eiffel Tower",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.",
    ),
    (
        "Marie Curie",
        "Marie Skłodowska-Curie (1867–1934) won Nobel Prizes in physics and chemistry.",
    ),
    ("Mount Fuji", "Mount Fuji (富士山) is the highest mountain in Japan at 3,776 metres."),
    ("Python", "Python is a programming language; `def f(x): return x**2` defines a function."),
    ("Danube", "The Danube flows through Vienna, Budapest and Belgrade into the Black Sea."),
    ("São Paulo", "São Paulo is the most populous city in Brazil and the Southern Hemisphere."),
]
QUESTIONS = [
    ("in which city is the eiffel tower", ["Paris"]),
    ("how high is mount fuji in metres", ["3,776", "3776"]),
    ("which sea does the danube flow into", ["Black Sea"]),
    ("what is the most populous city in brazil", ["São Paulo"]),
]


@pytest.fixture(scope="module")
def qwen3_checkpoint(qwen3_dir, qwen3_tokenizer, tmp_path_factory) -> str:
    import torch
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=QWEN3_VOCAB_ROWS,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=151645,
        pad_token_id=151643,
    )
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("qwen3") / "random-qwen3")
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    qwen3_tokenizer.save_pretrained(path)
    return path


def test_one_rl_step_at_the_real_vocabulary(qwen3_checkpoint, tmp_path):
    from atpo_jax.builder import build_run, default_workdir
    from atpo_jax.config import run_settings
    from atpo_jax.data.prompts import build_messages
    from atpo_jax.data.rows import QARow, write_rows
    from atpo_jax.train.metrics import read_metrics
    from atpo_jax.train.trainer import Trainer
    from tests.train import runs

    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i, (title, text) in enumerate(PASSAGES):
            f.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{text}'}) + "\n")
    files = {}
    for split in ("train", "test"):
        rows = [
            QARow("nq", build_messages(q, "paper"), golds, extra_info={"split": split})
            for q, golds in QUESTIONS
        ]
        files[split] = str(tmp_path / f"{split}.parquet")
        write_rows(rows, files[split])
    config = runs.load_config(
        "qwen3_4b",
        {
            **runs.TINY,
            "train.steps": 1,
            "eval.max_questions": 2,
            "eval.batch_prompts": 2,
            "model.path": qwen3_checkpoint,
            "data.train_files": files["train"],
            "data.eval_files": files["test"],
            "tools.corpus": str(corpus),
            "rollout.max_prompt_len": 224,  # the paper prompt is 210 tokens here
            "rollout.max_response_len": 32,
            "rollout.kv_bucket": 64,
            "mesh.data": 1,
            "mesh.fsdp": -1,
        },
    )
    settings = run_settings(config)
    default_workdir(settings)
    workdir = str(tmp_path / "run")  # a fresh workdir: a run refuses a used one
    Trainer(build_run(settings, workdir)).train()
    step = next(r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["step"] == 1)
    assert step["rollout/generated_tokens"] > 0 and step["train/real_tokens"] > 0
    assert math.isfinite(step["reward/mean"])
    losses = {k: v for k, v in step.items() if "loss" in k and isinstance(v, float)}
    assert all(math.isfinite(v) for v in losses.values()), losses
