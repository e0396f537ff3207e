"""benchmarks/rollout.py's parent process without running engines: each variant's child gets the
benchmark's settings with that variant's overrides (a variant overriding a setting once failed
with "got multiple values for keyword argument")."""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import subprocess
import sys

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "rollout.py"
spec = importlib.util.spec_from_file_location("rollout_benchmark", PATH)
rollout = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = rollout
spec.loader.exec_module(rollout)


def _flags(cmd: list[str]) -> dict[str, str]:
    return {cmd[i][2:]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}


def test_children_get_the_settings_with_each_variants_overrides(monkeypatch):
    calls = []

    def fake_run(cmd, env, capture_output, text):
        calls.append((cmd, env))
        stdout = rollout.RESULT_TAG + json.dumps({"variant": len(calls)}) + "\n"
        return subprocess.CompletedProcess(cmd, 0, stdout=stdout, stderr="")

    monkeypatch.setattr(rollout.subprocess, "run", fake_run)
    args = argparse.Namespace(
        prompts=8,
        response=2048,
        hidden=128,
        layers=4,
        decode_chunk=32,
        tool_latency_ms=200.0,
        repeats=2,
        pool=0.0,
        rejoin=1,
        quick=False,
    )
    assert rollout._child(args, "old", "/src/old") == {"variant": 1}
    rollout._child(args, "new", "/src/new", rejoin=3)
    rollout._child(args, "new", "/src/new", decode_chunk=16)
    rollout._child(args, "new", "/src/new", pool=0.1)
    flags = [_flags(cmd) for cmd, _ in calls]
    assert [f["engine"] for f in flags] == ["old", "new", "new", "new"]
    assert [f["rejoin"] for f in flags] == ["1", "3", "1", "1"]
    assert [f["decode-chunk"] for f in flags] == ["32", "32", "16", "32"]
    assert [f["pool"] for f in flags] == ["0.0", "0.0", "0.0", "0.1"]
    assert all(f["prompts"] == "8" and f["response"] == "2048" for f in flags)
    assert calls[0][1]["PYTHONPATH"].split(":")[0] == "/src/old"
