"""Fault tolerance: the retrieval service goes down mid-run and comes back."""

from __future__ import annotations

import json
import os

from atpo_jax.train.checkpointing import Checkpointer
from atpo_jax.train.metrics import read_metrics
from tests.train import runs
from tests.train.multidevice import run_python

# The trainer in a child process, searching through the HTTP retrieval server (in a thread of the
# child). The server is stopped before step 2 and restarted on the same port before step 3.
_OUTAGE = """
import json
from atpo_jax.tools.bm25 import LocalBM25Retriever
from atpo_jax.tools.retrieval_server import create_app, serve_in_thread
from atpo_jax.train.metrics import read_metrics
from atpo_jax.builder import build_run
from atpo_jax.train.trainer import Trainer
from tests.train.launch_with_test_reward import training_reward
from tests.train.runs import load_config
from atpo_jax.rewards.qa import RewardSettings

# The same stand-in training reward as the ``trained_run`` this run is compared with.
RewardSettings.score = training_reward
overrides = json.loads({overrides!r})
app = create_app(LocalBM25Retriever({corpus!r}), default_topk=3)
server = serve_in_thread(app)
port = server.port
overrides["tools.retriever_url"] = server.url
trainer = Trainer(build_run(load_config("tiny", overrides), {workdir!r}))
train_step = trainer.train_step
events = []


def step_with_outage(state, step):
    global server
    if step == 2:
        server.stop()
        events.append(("stopped", step))
    elif step == 3:
        server = serve_in_thread(app, port=port)
        events.append(("restarted", step))
    return train_step(state, step)


trainer.train_step = step_with_outage
trainer.train()
server.stop()
emit({{"events": events, "metrics": read_metrics({workdir!r} + "/metrics.jsonl")}})
"""


def test_retriever_outage_is_counted_and_survived(
    run_overrides, trained_run, world_dir, child_env, tmp_path
):
    workdir = str(tmp_path / "run")
    overrides = {**run_overrides, "tools.timeout_s": 2.0, "tools.retries": 2}
    code = _OUTAGE.format(
        overrides=json.dumps(overrides),
        corpus=os.path.join(world_dir, "corpus.jsonl"),
        workdir=workdir,
    )
    out = run_python(code, devices=1, timeout=300, env=child_env)
    assert out["events"] == [["stopped", 2], ["restarted", 3]]
    metrics = {r["step"]: r for r in out["metrics"]}
    assert sorted(metrics) == [0, 1, 2, 3, 4]

    # While the service was down every search failed, was counted, and ended its chain as a leaf.
    down = metrics[2]
    assert down["rollout/tool_calls"] > 0
    assert down["rollout/tool_failures"] == down["rollout/tool_calls"]
    # Before and after the outage every call succeeded.
    for step in (1, 3, 4):
        assert metrics[step]["rollout/tool_calls"] > 0, step
        assert metrics[step]["rollout/tool_failures"] == 0, step
        assert metrics[step]["rollout/tool_timeouts"] == 0, step
    # The run finished: final evaluation, complete last checkpoint.
    assert "eval/em" in metrics[4]
    reader = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert reader.latest_step() == 4
    reader.close()

    # Until the outage, searching over HTTP gave exactly what the embedded BM25 index gives.
    reference = {r["step"]: r for r in read_metrics(os.path.join(trained_run, "metrics.jsonl"))}
    assert runs.comparable(metrics[1]) == runs.comparable(reference[1])
