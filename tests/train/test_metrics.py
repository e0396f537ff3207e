"""MetricsWriter (JSONL, TensorBoard, W&B), read_metrics, plots, PhaseTimer, ProgressBar."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import sys
import types

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from atpo_jax.train import metrics as M


def _strict_json(line: str):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=reject)


def read_tensorboard(logdir: str) -> list[tuple[int, str, float | None]]:
    """(step, tag, scalar or None for a histogram) from tensorboardX event files (TFRecords)."""
    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4  # length, its CRC, payload, payload CRC
            for value in event.summary.value:
                scalar = None if value.HasField("histo") else value.simple_value
                out.append((event.step, value.tag, scalar))
    return out


def test_jsonl_round_trip_with_non_finite_values_and_arrays(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False, is_main_process=True) as writer:
        writer.write(
            1,
            {
                "reward/mean": 0.25,
                "em": np.float32(0.5),
                "loss": jnp.asarray(1.5),
                "nan": float("nan"),
                "pos_inf": np.inf,
                "neg_inf": -math.inf,
                "tool_calls": 3,
                "skipped": np.bool_(True),
                "per_depth": np.asarray([1.0, np.nan, 2.0]),
                "grid": jnp.asarray([[1, 2], [3, 4]]),
            },
        )
        writer.write(2, {"reward/mean": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = _strict_json(lines[0])  # strict JSON: no NaN / Infinity tokens
    assert first["nan"] is None and first["pos_inf"] == "inf" and first["neg_inf"] == "-inf"
    assert first["tool_calls"] == 3 and isinstance(first["tool_calls"], int)

    records = M.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    r = records[0]
    assert r["reward/mean"] == 0.25 and r["em"] == 0.5 and r["loss"] == 1.5
    assert math.isnan(r["nan"]) and r["pos_inf"] == math.inf and r["neg_inf"] == -math.inf
    assert r["skipped"] == 1
    assert r["per_depth"][0] == 1.0 and math.isnan(r["per_depth"][1]) and r["per_depth"][2] == 2.0
    assert r["grid"] == [[1, 2], [3, 4]]
    assert isinstance(r["time"], float)


def test_bad_metric_values_and_reserved_names(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False, is_main_process=True) as writer:
        with pytest.raises(TypeError, match="metric 'name'"):
            writer.write(0, {"name": "text"})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write(0, {"step": 1.0})


def test_resumed_run_records_are_merged_later_values_winning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with M.MetricsWriter(tmp_path, tensorboard=False, is_main_process=True) as writer:
        for step in (1, 2, 3):
            writer.write(step, {"em": step / 10, "stale": 1.0})
    # Killed after logging step 3, resumed from the step-2 checkpoint: steps 3, 4 logged again.
    with M.MetricsWriter(tmp_path, tensorboard=False, is_main_process=True) as writer:
        writer.write(3, {"em": 0.33})
        writer.write(3, {"eval/em": 0.5})  # a second record for the same step
        writer.write(4, {"em": 0.4})
    merged = M.read_metrics(path)
    assert [r["step"] for r in merged] == [1, 2, 3, 4]
    assert merged[2]["em"] == 0.33 and merged[2]["eval/em"] == 0.5
    raw = M.read_metrics(path, merge_steps=False)
    assert [r["step"] for r in raw] == [1, 2, 3, 3, 3, 4]


def test_truncated_last_line_is_ignored_but_corruption_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "em": 0.1}\n{"step": 2, "em"')
    assert [r["step"] for r in M.read_metrics(path)] == [1]
    path.write_text('{"step": 1, "em": 0.1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        M.read_metrics(path)
    path.write_text('{"em": 0.1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected a JSON object with a 'step'"):
        M.read_metrics(path)


def test_tensorboard_gets_scalars_and_histograms(tmp_path):
    with M.MetricsWriter(tmp_path, is_main_process=True) as writer:
        writer.write(5, {"reward/mean": 0.75, "hist": np.asarray([1.0, 2.0, 3.0])})
        writer.write(6, {"reward/mean": 1.25})
    events = read_tensorboard(str(tmp_path / "tensorboard"))
    assert (5, "reward/mean", 0.75) in events
    assert (6, "reward/mean", 1.25) in events
    assert (5, "hist", None) in events


def test_non_main_process_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    writer = M.MetricsWriter(workdir, wandb_project="p", is_main_process=False)
    writer.write(1, {"em": 1.0})
    assert writer.plot() is None
    writer.close()
    assert not workdir.exists()


def test_wandb_logging_when_the_project_is_set(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", data, step))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    with M.MetricsWriter(
        tmp_path,
        tensorboard=False,
        wandb_project="atpo",
        wandb_config={"lr": 1e-6},
        is_main_process=True,
    ) as writer:
        writer.write(7, {"em": 0.5, "nan": float("nan")})
    assert calls[0][0] == "init"
    assert calls[0][1]["project"] == "atpo" and calls[0][1]["config"] == {"lr": 1e-6}
    assert calls[1] == ("log", {"em": 0.5, "nan": None}, 7)
    assert calls[2] == ("finish",)


def test_wandb_missing_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with M.MetricsWriter(
        tmp_path, tensorboard=False, wandb_project="atpo", is_main_process=True
    ) as w:
        w.write(1, {"em": 1.0})
    assert "wandb is not installed" in caplog.text
    assert M.read_metrics(tmp_path / "metrics.jsonl")[0]["em"] == 1.0


def test_learning_curve_png_has_one_panel_per_key(tmp_path):
    with M.MetricsWriter(tmp_path, tensorboard=False, is_main_process=True) as writer:
        for step in range(1, 6):
            writer.write(step, {"reward/mean": step / 5, "em": step / 10, "nan_once": np.nan})
        png = writer.plot(keys=("reward/mean", "em", "eval/em"))
    assert png == os.path.join(tmp_path, "learning_curves.png")
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (3 * 260, 700)  # figsize (7, 2.6 per panel) at 100 dpi
    assert image.std() > 0.05  # something is drawn

    single = tmp_path / "plots" / "em.png"
    M.plot_learning_curves(tmp_path / "metrics.jsonl", single, keys=("em",), title="run")
    assert matplotlib.image.imread(single).shape[:2] == (260, 700)
    with pytest.raises(ValueError, match="keys is empty"):
        M.plot_learning_curves(tmp_path / "metrics.jsonl", single, keys=())


def test_phase_timer_accumulates_and_resets(monkeypatch):
    clock = iter([10.0, 12.5, 20.0, 21.0, 30.0, 30.25, 31.0])
    monkeypatch.setattr(M.time, "perf_counter", lambda: next(clock))
    timer = M.PhaseTimer()
    with timer.phase("rollout"):
        pass
    with timer.phase("rollout"):
        pass
    timer.add("tools", 4.0)
    assert timer.pop() == {"time/rollout_s": 3.5, "time/tools_s": 4.0}
    assert timer.pop() == {}
    with pytest.raises(RuntimeError), timer.phase("update"):
        raise RuntimeError  # still timed
    assert timer.pop() == {"time/update_s": 0.25}


def test_progress_bar_counts_and_shows_metrics():
    bar = M.ProgressBar(10, initial=3, enabled=False)
    bar.update({"reward/mean": 0.5, "em": jnp.asarray(0.25), "other": 1.0})
    bar.update(steps=2)
    assert bar.n == 6
    bar.close()
    shown = M.ProgressBar(4, enabled=True, postfix_keys=("em",))
    shown.update({"em": 0.123456})
    assert shown._bar.postfix == "em=0.1235"
    shown.close()
