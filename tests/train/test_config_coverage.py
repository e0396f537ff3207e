"""Every leaf of the config is read by a run: no dead settings; and the paper's recipe end to end.

The settings dataclasses are instrumented so that every read of a field by the package's own code
is recorded (reads inside ``__post_init__`` validation, by the ConfigDict conversion, or by
``dataclasses`` helpers such as ``replace``/``asdict`` do not count: they would "read" a setting
nothing uses). Then each variant of ``configs/search_qa.py`` is built and trained for one step,
with the switches that take the code down its other branches (a policy that calls tools, the PPO
loss with a KL term, GRPO credit, padded rows, the dense retriever, an HTTP retriever). A config
leaf that none of these runs reads fails the test, naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys

import pytest

import atpo_jax
from atpo_jax import models
from atpo_jax.builder import build_run, default_workdir
from atpo_jax.config import default_config, run_settings
from atpo_jax.settings import field_types
from atpo_jax.tools.bm25 import LocalBM25Retriever
from atpo_jax.tools.retrieval_server import create_app, serve_in_thread
from atpo_jax.train.checkpointing import Checkpointer
from atpo_jax.train.metrics import read_metrics
from atpo_jax.train.settings import RunSettings
from atpo_jax.train.trainer import Trainer
from tests.train import runs

PACKAGE = str(pathlib.Path(atpo_jax.__file__).parent) + os.sep
# The conversion, the shared helpers and the run manifest (``train/workdir.py`` records every
# setting in run.json) read every field by construction.
NOT_CONSUMERS = {
    PACKAGE + "config.py",
    PACKAGE + "settings.py",
    PACKAGE + os.path.join("train", "workdir.py"),
}
# Settings validated today whose consumer is not written yet (none now). The test fails as soon
# as one of them is read, so remove it here when it gets its consumer.
PENDING: set[str] = set()


def settings_classes(cls: type = RunSettings, path: str = "") -> dict[str, tuple[type, str]]:
    """Every config leaf path -> (its settings dataclass, its field name)."""
    leaves = {}
    for field in dataclasses.fields(cls):
        kind = field_types(cls)[field.name]
        name = f"{path}{field.name}"
        if dataclasses.is_dataclass(kind):
            leaves.update(settings_classes(kind, name + "."))
        else:
            leaves[name] = (cls, field.name)
    return leaves


LEAVES = settings_classes()


class ReadRecorder:
    """Records (class, field) reads of the settings dataclasses from the package's code."""

    def __init__(self, monkeypatch):
        self.reads: set[tuple[type, str]] = set()
        self.validating = 0
        for cls in {c for c, _ in LEAVES.values()} | {RunSettings}:
            fields = frozenset(f.name for f in dataclasses.fields(cls))
            monkeypatch.setattr(cls, "__getattribute__", self._getattribute(cls, fields))
            if "__post_init__" in vars(cls):
                monkeypatch.setattr(cls, "__post_init__", self._validation(cls.__post_init__))

    def _getattribute(self, cls, fields):
        def getattribute(obj, name):
            if name in fields and not self.validating:
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PACKAGE) and caller not in NOT_CONSUMERS:
                    self.reads.add((cls, name))
            return object.__getattribute__(obj, name)

        return getattribute

    def _validation(self, post_init):
        def wrapped(obj):
            self.validating += 1
            try:
                post_init(obj)
            finally:
                self.validating -= 1

        return wrapped

    def unread(self) -> list[str]:
        return sorted(path for path, read in LEAVES.items() if read not in self.reads)


def _train_one_step(config, workdir: str) -> list[dict]:
    """What ``python -m atpo_jax.launch`` does with ``config``, for one step."""
    settings = run_settings(config)
    default_workdir(settings)
    trainer = Trainer(build_run(settings, workdir))
    trainer.train()
    return read_metrics(os.path.join(workdir, "metrics.jsonl"))


@pytest.fixture(scope="module")
def recorded_runs(world_dir, warm_model, tiny_qwen3, qa_files, world_dense_index, tmp_path_factory):
    """The reads of three runs that, together, take every branch a setting steers."""
    monkeypatch = pytest.MonkeyPatch()
    recorder = ReadRecorder(monkeypatch)
    root = tmp_path_factory.mktemp("coverage")
    short = {
        **runs.TINY,
        "train.steps": 1,
        "eval.max_questions": 2,
        "eval.batch_prompts": 2,
        "logging.plot": True,
    }
    server = serve_in_thread(
        create_app(LocalBM25Retriever(os.path.join(world_dir, "corpus.jsonl")))
    )
    try:
        # The tiny recipe as is: a fresh synthetic world, a random model, the warm start, AT²PO.
        tiny = runs.load_config(
            "tiny",
            {
                **short,
                **runs.SMALL_MODEL,
                "data.synthetic_dir": str(root / "world"),
                "sft.steps": 2,
            },
        )
        _train_one_step(tiny, str(root / "tiny"))
        # A policy that calls tools (the turn rules), PPO with a KL term, GRPO credit, padded rows,
        # searching the dense index (what --config.tools.method=dense --config.tools.index=... do),
        # with AEPO's chain rollout (its chains branch after tool rounds).
        tools = runs.load_config(
            "tiny",
            {
                **short,
                "data.synthetic_dir": world_dir,
                "model.path": warm_model,
                "sft.steps": 0,
                "loss.policy_loss": "ppo",
                "loss.kl_coef": 0.001,
                "credit.mode": "grpo",
                "train.packing": "padded",
                "rollout.trace_every": 1,
                "rollout.mode": "aepo",
                "rollout.beam_size": 2,
                **world_dense_index,
            },
        )
        metrics = _train_one_step(tools, str(root / "tools"))
        # The paper's recipe: a Hugging Face Qwen3, parquet files, an HTTP retriever.
        qwen = runs.load_config(
            "qwen3_4b",
            {
                **short,
                "model.path": tiny_qwen3,
                "data.train_files": qa_files["train"],
                "data.eval_files": qa_files["test"],
                "tools.retriever_url": server.url,
                "tools.cache_path": str(root / "cache.jsonl"),
                "rollout.max_prompt_len": 128,
                "rollout.max_response_len": 64,
                "rollout.kv_bucket": 64,
                "mesh.data": 1,
                "mesh.fsdp": -1,
            },
        )
        _train_one_step(qwen, str(root / "qwen"))
    finally:
        server.stop()
        monkeypatch.undo()
    return recorder, metrics, str(root / "qwen"), str(root / "tools")


def test_every_config_leaf_is_read_by_a_run(recorded_runs):
    recorder, tools_metrics, *_ = recorded_runs
    step = next(r for r in tools_metrics if r["step"] == 1)
    assert step["rollout/tool_calls"] > 0  # the turn rules after a tool call did run
    assert recorder.unread() == sorted(PENDING), (
        "config settings no run reads (dead, or a missing branch), or pending ones now read"
    )


def test_the_qwen3_4b_recipe_trains_one_step(recorded_runs):
    """The paper's recipe end to end on a tiny random Qwen3 (saved by transformers), parquet data
    and the HTTP retrieval server: float32 masters, bf16 compute, remat, the atpo loss."""
    workdir = recorded_runs[2]
    metrics = {r["step"]: r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))}
    step = metrics[1]
    assert -1.0 <= step["reward/mean"] <= 1.0
    assert step["rollout/generated_tokens"] > 0 and step["trained_tokens"] > 0
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
    # Exported in the dtype the starting checkpoint was saved in (float32 here), not bf16.
    assert models.checkpoint_dtype(os.path.join(workdir, "hf_export")) == "float32"
    with open(os.path.join(workdir, "eval_000001.json")) as f:
        assert json.load(f)["n"] == 2


def test_the_leaves_are_the_config_files_leaves():
    """The instrumented leaves are exactly the config's: nothing is defined twice."""

    def flat(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    assert sorted(flat(default_config().to_dict())) == sorted(LEAVES)
    for variant in runs.load_config_module().VARIANTS:
        assert sorted(flat(runs.load_config(variant).to_dict())) == sorted(LEAVES)


def test_the_tools_run_searched_the_dense_index(recorded_runs, world_dir, world_dense_index):
    """``tools.method=dense`` end to end: each observation after a search in the run's trace is
    the dense index's answer to that query (a retriever opened afresh gives the same passages)."""
    from atpo_jax.data.synthetic import load_tokenizer
    from atpo_jax.tools import extract_tool_input, format_observation, format_passages
    from atpo_jax.tools.dense import DenseRetriever

    _, tools_metrics, _, workdir = recorded_runs
    assert next(r for r in tools_metrics if r["step"] == 1)["rollout/tool_calls"] > 0
    retriever = DenseRetriever(world_dense_index["tools.index"])
    tokenizer = load_tokenizer(os.path.join(world_dir, "tokenizer"))
    with open(os.path.join(workdir, "traces", "trace_000001.jsonl")) as f:
        trees = [json.loads(line) for line in f]
    checked = 0
    for tree in trees:
        nodes = {node["id"]: node for node in tree["nodes"]}
        for node in tree["nodes"]:
            parent = nodes.get(node["parent"])
            query = extract_tool_input(parent["turn"], "search") if parent else ""
            if not query or "<result>" not in node["observation"]:
                continue
            hits = retriever.search([query.replace('"', "").strip()], 3)[0]
            want = format_observation(format_passages(hits, max_chars=1000))
            want = " ".join(
                tokenizer.decode(tokenizer.encode(want, add_special_tokens=False)).split()
            )
            got = " ".join(node["observation"].split())
            assert want.startswith(got) and len(got) > 20, (query, got, want)  # cut by the budget
            checked += 1
    assert checked > 0
