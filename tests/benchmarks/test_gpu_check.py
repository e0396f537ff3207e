"""The GPU check pack's dry run (``benchmarks/gpu_check.py --quick``) on the CPU: the script runs
every section, writes a well-formed report, and its correctness checks hold.

The dry run is split into two processes run side by side (the correctness sections, and the
training ones), each with ``--only``: almost all of its time is XLA compiling small programs on
one core, so two processes finish in about half the wall time of one on a 2-core machine.
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import subprocess
import sys
import types

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")
SECTIONS = [
    "model_logits",
    "cudnn_attention",
    "engine_greedy",
    "kernels",
    "alternatives",
    "decode",
    "train_step",
    "end_to_end",
]
GROUPS = (SECTIONS[:6], SECTIONS[6:])  # about equal halves of the dry run's time
TIMEOUT_S = 600


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _start(out: pathlib.Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, SCRIPT, "--quick", "--out", str(out), *args],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError(f"gpu_check.py --quick timed out\n{output[-6000:]}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The reports of the two --only halves, run side by side."""
    base = tmp_path_factory.mktemp("gpu_check")
    outs = [base / f"group{i}" for i in range(len(GROUPS))]
    procs = [
        _start(out, "--only", ",".join(group)) for out, group in zip(outs, GROUPS, strict=True)
    ]
    logs = [_finish(p) for p in procs]
    reports = [json.loads((out / "gpu_report.json").read_text()) for out in outs]
    markdowns = [(out / "gpu_report.md").read_text() for out in outs]
    return reports, markdowns, logs


def _run_sections(reports) -> dict[str, dict]:
    """Every section from the report of the half that ran it."""
    merged = {}
    for report, group in zip(reports, GROUPS, strict=True):
        for section in report["sections"]:
            if section["name"] in group:
                merged[section["name"]] = section
    return merged


def _checks(section) -> dict[str, dict]:
    return {c["name"]: c for c in section["checks"]}


def _measurements(section) -> dict[str, dict]:
    return {m["name"]: m for m in section["measurements"]}


def test_report_structure(dry_run):
    reports, markdowns, logs = dry_run
    for report, group, md, log in zip(reports, GROUPS, markdowns, logs, strict=True):
        assert report["schema"] == 1 and report["quick"] is True
        assert report["finished"] and report["summary"]["ok"] is True
        env = report["environment"]
        assert env["platform"] == "cpu" and env["device_count"] >= 1
        assert env["jax"] == jax.__version__ and env["jaxlib"] and env["flax"]
        assert "raw figures" in report["limits"]["description"]
        assert report["limits"]["peak_flops"] is None
        assert [s["name"] for s in report["sections"]] == SECTIONS
        for section in report["sections"]:
            if section["name"] in group:
                assert section["status"] == "ok", section
            else:
                assert section["status"] == "not_run"
                assert section["reason"] == "not selected by --only"
        # Progress lines carry timestamps and elapsed seconds.
        assert "] section model_logits" in log or "] section train_step" in log
        assert "## Correctness" in md and "## Measurements" in md and "**cpu**" in md
        for section in report["sections"]:
            for check in section["checks"]:
                assert check["name"].replace("|", "\\|") in md


def test_every_check_passes_under_its_tolerance(dry_run):
    sections = _run_sections(dry_run[0])
    statuses = {}
    for name, section in sections.items():
        for check in section["checks"]:
            statuses[check["status"]] = statuses.get(check["status"], 0) + 1
            if check["status"] == "pass":
                assert isinstance(check["tolerance"], (int, float)) and check["metric"]
                assert 0.0 <= check["max_error"] <= check["tolerance"], (name, check)
            else:
                # Nothing fails or crashes; whatever did not run says why.
                assert check["status"] in ("not_applicable", "not_run"), (name, check)
                assert check["reason"]
    assert set(statuses) == {"pass", "not_applicable", "not_run"}
    # Only cuDNN is not applicable on a CPU, and it says so.
    not_applicable = [
        c for s in sections.values() for c in s["checks"] if c["status"] == "not_applicable"
    ]
    assert len(not_applicable) == 6
    assert all("cudnn" in c["name"].lower() and "CUDA" in c["reason"] for c in not_applicable)


def test_correctness_values(dry_run):
    sections = _run_sections(dry_run[0])
    logits = _checks(sections["model_logits"])
    for family in ("qwen3", "llama", "qwen2"):
        # On a CPU the float32 device program is the reference program: no difference at all.
        assert logits[f"{family} logits, float32"]["max_error"] == 0.0
        # bfloat16 compute really differs from float32 (the check compares two computations),
        # by about bf16's rounding (2^-8 = 0.0039) per operation, not more.
        bf16 = logits[f"{family} logits, bfloat16 compute, float32 weights"]["max_error"]
        assert 1e-4 < bf16 < 0.05
    attention = _checks(sections["cudnn_attention"])
    assert 1e-4 < attention["causal_attention impl=xla bf16 forward"]["max_error"] < 0.05
    assert 1e-4 < attention["qwen3 model attention_impl=xla bf16 param grads"]["max_error"] < 0.05
    # Greedy decode through prefill, generate, fork and extend: 4 prompts x 10 tokens, 1 + 2
    # generated tokens copied into the two forks, then 4 rows x 5 more tokens = 63 tokens, each
    # the argmax of the full forward pass.
    engine = _checks(sections["engine_greedy"])["engine greedy == full-forward argmax, float32"]
    assert engine["generated_tokens"] == 4 * 10 + (1 + 2) + 4 * 5
    assert engine["exact_argmax_fraction"] == 1.0 and engine["max_error"] == 0.0
    kernels = _checks(sections["kernels"])
    assert len(kernels) == 13 and all(c["status"] == "pass" for c in kernels.values())
    for name in ("turn_ids_from_mask", "select_expansion_nodes k=6", "per_token_run_mean"):
        ints = next(c for n, c in kernels.items() if n.startswith(name) and "integer" in n)
        assert ints["metric"] == "mismatches" and ints["max_error"] == 0.0


def test_speed_and_end_to_end_figures(dry_run):
    sections = _run_sections(dry_run[0])
    decode = _measurements(sections["decode"])["decode, batch 4"]
    assert decode["value"] > 0 and decode["hbm_fraction"] is None  # no known limit on a CPU
    train = _measurements(sections["train_step"])
    step = train["train step, remat off"]
    assert step["value"] > 0 and step["compile_s"] > 0 and step["mfu"] is None
    assert train["train step, remat on"]["value"] is None  # --quick times one setting
    assert train["train step, remat on"]["not_run"].startswith("--quick")
    alternatives = _measurements(sections["alternatives"])
    ours = [m for m in alternatives.values() if "(ours)" in m["name"]]
    assert len(ours) == 4 and all(m["vs_ours"] == 1.0 for m in ours)
    e2e = _measurements(sections["end_to_end"])
    step = e2e["RL step 1 wall time (includes compilation)"]
    for phase in ("rollout", "reward", "credit", "packing", "update"):
        assert step[f"time/{phase}_s"] >= 0
    assert step["time/rollout_s"] > 0 and step["time/update_s"] > 0
    assert step["generated_tokens"] > 0 and step["train_real_tokens"] > 0
    # --quick's tree: a root, 2 chains and 1 x 2 branches, at least one node per turn.
    assert step["nodes_per_tree"] >= 1 + 2 + 2
    finite = _checks(sections["end_to_end"])["RL step 1: loss and reward metrics are finite"]
    assert finite["status"] == "pass" and finite["nonfinite"] == []


@pytest.fixture
def gpu_check_module(monkeypatch):
    """``benchmarks/gpu_check.py`` imported in this process; the benchmark modules it imports
    (top-level names such as ``kernels``) are removed from ``sys.modules`` afterwards."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    before = set(sys.modules)
    import gpu_check

    yield gpu_check
    for name in set(sys.modules) - before:
        module = sys.modules[name]
        if str(ROOT / "benchmarks") in str(getattr(module, "__file__", "") or ""):
            del sys.modules[name]


def test_budget_stops_new_sections(gpu_check_module, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the repo and benchmarks first
    code = gpu_check_module.main(["--quick", "--out", str(tmp_path), "--budget-s", "0"])
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert code == 0 and report["summary"]["ok"] is True
    assert [s["name"] for s in report["sections"]] == SECTIONS
    assert [s["status"] for s in report["sections"]] == ["not_run"] * len(SECTIONS)
    assert all(s["reason"].startswith("time budget: ") for s in report["sections"])
    assert "time budget" in (tmp_path / "gpu_report.md").read_text()


def test_an_installed_kernels_package_does_not_shadow_the_benchmark(monkeypatch, tmp_path):
    """CI's clean install had Hugging Face's ``kernels`` package, imported by transformers before
    this file's tests ran: ``from kernels import make_loss_inputs`` then found that module in
    ``sys.modules`` instead of ``benchmarks/kernels.py``."""
    monkeypatch.setitem(sys.modules, "kernels", types.ModuleType("kernels"))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("gpu_correctness", "gpu_speed", "atpo_benchmarks_kernels"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import gpu_correctness
    import gpu_speed

    assert gpu_speed.make_loss_inputs.__module__ == "atpo_benchmarks_kernels"
    assert (
        pathlib.Path(inspect.getfile(gpu_correctness.make_trees))
        == ROOT / "benchmarks" / "kernels.py"
    )
    for name in ("gpu_correctness", "gpu_speed", "atpo_benchmarks_kernels"):
        sys.modules.pop(name, None)


def test_unknown_section_is_one_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(tmp_path), "--only", "kernels,bogus"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--only: unknown section(s) ['bogus']; choose from model_logits" in proc.stderr
