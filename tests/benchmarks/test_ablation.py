"""benchmarks/ablation.py without training: the bootstrap statistics against NumPy loops and known
distributions, the equal-token rule, the sweep plan (skip / resume / start / conflict) on a
hand-made workdir tree, and the report on hand-written metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "ablation.py"
spec = importlib.util.spec_from_file_location("ablation_benchmark", PATH)
ablation = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = ablation  # dataclasses look their module up there
spec.loader.exec_module(ablation)


def test_bootstrap_matches_a_numpy_loop():
    values = np.array([0.61, 0.72, 0.55, 0.80, 0.67])
    ci = ablation.bootstrap_ci(values, resamples=2000, seed=7)
    rng = np.random.default_rng(7)
    indices = rng.integers(0, len(values), size=(2000, len(values)))
    means = []
    for r in range(2000):
        total = 0.0
        for k in range(len(values)):
            total += values[indices[r, k]]
        means.append(total / len(values))
    means.sort()

    # np.percentile's linear interpolation at 2.5% and 97.5% of 2000 sorted means.
    def quantile(q):
        position = q * (len(means) - 1)
        lo = int(np.floor(position))
        return means[lo] + (position - lo) * (means[lo + 1] - means[lo])

    assert ci["mean"] == pytest.approx(values.mean())
    assert ci["low"] == pytest.approx(quantile(0.025))
    assert ci["high"] == pytest.approx(quantile(0.975))
    assert ci["n"] == 5
    # Deterministic: the same seed gives the same interval; the default is 10,000 resamples.
    assert ablation.bootstrap_ci(values) == ablation.bootstrap_ci(values)
    assert ablation.bootstrap_indices(5).shape == (10_000, 5)


def test_bootstrap_hand_computed_cases():
    # Two values: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    ci = ablation.bootstrap_ci([0.0, 1.0])
    assert (ci["mean"], ci["low"], ci["high"]) == (0.5, 0.0, 1.0)
    one = ablation.bootstrap_ci([0.3])
    assert (one["low"], one["high"]) == (pytest.approx(0.3), pytest.approx(0.3))
    assert np.isnan(ablation.bootstrap_ci([])["mean"])


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(123)
    trials, covered = 300, 0
    for t in range(trials):
        sample = rng.normal(2.0, 1.0, size=30)
        ci = ablation.bootstrap_ci(sample, resamples=1000, seed=t)
        covered += ci["low"] <= 2.0 <= ci["high"]
    # The percentile bootstrap slightly under-covers at n = 30 (about 0.93-0.94).
    assert 0.88 <= covered / trials <= 0.98


def test_paired_difference_uses_the_seeds_both_have():
    atpo = {0: 0.50, 1: 0.60, 2: 0.70, 3: 0.40}
    variant = {0: 0.40, 1: 0.50, 2: 0.60, 4: 0.99}
    diff = ablation.paired_difference(variant, atpo)
    assert diff["per_seed"] == pytest.approx({0: -0.1, 1: -0.1, 2: -0.1})
    assert diff["mean"] == pytest.approx(-0.1)
    assert diff["low"] == pytest.approx(-0.1) and diff["high"] == pytest.approx(-0.1)
    assert diff["n"] == 3
    # Pairing removes the between-seed spread that the unpaired intervals carry.
    noisy = {s: v + 0.02 * (-1) ** s for s, v in {0: 0.5, 1: 0.9, 2: 0.3, 3: 0.7}.items()}
    base = {0: 0.5, 1: 0.9, 2: 0.3, 3: 0.7}
    paired = ablation.paired_difference(noisy, base)
    unpaired = ablation.bootstrap_ci(list(noisy.values()))
    assert paired["high"] - paired["low"] < 0.2 * (unpaired["high"] - unpaired["low"])


def test_final_em_and_equal_token_rule():
    assert ablation.final_em({20: 0.1, 40: 0.2, 60: 0.3, 80: 0.5}) == pytest.approx(1 / 3)
    assert ablation.final_em({20: 0.4}) == pytest.approx(0.4)
    assert ablation.equal_token_chains([600, 640], [1000, 1040]) == 5  # 8 x 620 / 1020 = 4.9
    assert ablation.equal_token_chains([10], [1000]) == 2


def _write_metrics(workdir, evals, train=()):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        for step, record in train:
            f.write(json.dumps({"step": step, "reward/mean": 0.0, **record}) + "\n")
        for step, em in evals:
            f.write(json.dumps({"step": step, "eval/em": em, "eval/em/synthetic_1hop": em}) + "\n")


def _checkpoint(workdir, step):
    os.makedirs(os.path.join(workdir, "checkpoints", str(step), "params"), exist_ok=True)


def test_sweep_plan_skips_resumes_starts_and_refuses(tmp_path):
    root = str(tmp_path)
    common = ablation.common_flags("noisy", 0, 120, 20, [])
    assert "--config.data.synthetic.world=noisy" in common
    assert "--config.rollout.max_response_len=416" in common
    specs = {v: ablation.variant_spec(root, "noisy", 0, v, common) for v in ablation.EQUAL_LEAVES}
    warm = ablation.warm_spec(root, "noisy", 0, common)
    assert warm.workdir == os.path.join(root, "noisy", "seed0_warm")
    assert "--config.train.steps=0" in warm.flags and "--config.loss.kl_coef=0.001" in warm.flags
    assert specs["grpo_chain"].config == "tiny_grpo"
    assert specs["atpo"].workdir == os.path.join(root, "noisy", "seed0_atpo")

    # Nothing there: every run starts.
    assert {ablation.plan_action(s) for s in [warm, *specs.values()]} == {"start"}
    # The warm start without its marker (stopped) starts again; with it, it is skipped.
    _checkpoint(warm.workdir, 0)
    open(os.path.join(warm.workdir, "run.json"), "w").close()
    assert ablation.plan_action(warm) == "start"
    with open(os.path.join(warm.workdir, "done"), "w") as f:
        json.dump(warm.marker(), f)
    assert ablation.plan_action(warm) == "skip"
    # A variant stopped after a checkpoint past step 0 resumes; one with only the copied step 0
    # (or a partial save) starts afresh; a finished one is skipped; other flags: a conflict.
    atpo, random_, credit, gspo = (specs[v] for v in ablation.EQUAL_LEAVES[:4])
    for s in (atpo, random_):
        _checkpoint(s.workdir, 0)
        open(os.path.join(s.workdir, "run.json"), "w").close()
    _checkpoint(atpo.workdir, 40)
    os.makedirs(os.path.join(random_.workdir, "checkpoints", "20.orbax-checkpoint-tmp-1"))
    assert ablation.plan_action(atpo) == "resume"
    assert ablation.plan_action(random_) == "start"
    os.makedirs(credit.workdir)
    with open(os.path.join(credit.workdir, "done"), "w") as f:
        json.dump(credit.marker(), f)
    assert ablation.plan_action(credit) == "skip"
    os.makedirs(gspo.workdir)
    with open(os.path.join(gspo.workdir, "done"), "w") as f:
        json.dump({"config": "tiny", "flags": ["--config.train.steps=60"]}, f)
    assert ablation.plan_action(gspo) == "conflict"
    with pytest.raises(SystemExit, match="seed0_gspo_loss"):
        ablation.run_phase([gspo], 1, {})

    with pytest.raises(ValueError, match="chain count"):
        ablation.variant_spec(root, "noisy", 0, "grpo_chain_tokens", common)
    tokens = ablation.variant_spec(root, "noisy", 0, "grpo_chain_tokens", common, chains=5)
    assert tokens.flags[-2:] == (
        "--config.rollout.samples_per_tree=5",
        "--config.rollout.initial_rollouts=5",
    )


def test_equal_tokens_is_measured_once_all_seeds_are_done_then_kept(tmp_path):
    root = str(tmp_path)
    for seed in (0, 1):
        for variant, tokens in (("atpo", 600.0), ("grpo_chain", 1000.0)):
            directory = ablation.run_dir(root, "easy", seed, variant)
            _write_metrics(directory, [], [(1, {"rollout/generated_tokens": tokens + seed})])
            if (seed, variant) != (1, "grpo_chain"):
                open(os.path.join(directory, "done"), "w").close()
    assert ablation.resolve_equal_tokens(root, "easy", [0, 1]) is None
    open(os.path.join(ablation.run_dir(root, "easy", 1, "grpo_chain"), "done"), "w").close()
    record = ablation.resolve_equal_tokens(root, "easy", [0, 1])
    assert record["chains"] == 5 and record["atpo_tokens_per_step"] == pytest.approx(600.5)
    # Kept: later runs do not move it.
    _write_metrics(
        ablation.run_dir(root, "easy", 0, "atpo"), [], [(2, {"rollout/generated_tokens": 1})]
    )
    assert ablation.resolve_equal_tokens(root, "easy", [0, 1]) == record


def test_report_from_hand_written_metrics(tmp_path):
    root = str(tmp_path)
    runs, warm = {}, {}
    for seed in (0, 1, 2):
        warm_dir = ablation.run_dir(root, "easy", seed, "warm")
        _write_metrics(warm_dir, [(0, 0.5 + 0.1 * seed)])
        warm[seed] = warm_dir
        warm_evals = ablation.read_run_metrics(warm_dir)[0]
        for variant, gain in (("atpo", 0.2), ("grpo_chain", 0.1)):
            directory = ablation.run_dir(root, "easy", seed, variant)
            train = [
                (s, {"reward/mean": 0.1 * s, "tree/leaves_disagree": 0.5,
                     "tree/entropy_depth_0": 1.0, "rollout/generated_tokens": 100.0 * (1 + seed)})
                for s in range(1, 13)
            ]  # fmt: skip
            _write_metrics(
                directory, [(s, 0.5 + 0.1 * seed + gain * s / 120) for s in (20, 40)], train
            )
            # A resumed run repeats its last steps: the last record of a step wins.
            _write_metrics(directory, [(s, 0.5 + 0.1 * seed + gain * s / 120) for s in (40, 60)])
            runs.setdefault(variant, {})[seed] = ablation.run_summary(directory, warm_evals)
    summary = runs["atpo"][1]
    assert summary["evaluated_steps"] == [20, 40, 60]
    assert summary["curves"]["eval/em"][0] == pytest.approx(0.6)  # the warm start's step 0
    assert summary["final_em"] == pytest.approx(0.6 + 0.2 * 40 / 120)
    assert summary["final_em_by_hop"]["synthetic_1hop"] == pytest.approx(summary["final_em"])
    assert summary["run_means"]["rollout/generated_tokens"] == pytest.approx(200.0)

    rows = ablation.comparison(runs, ["atpo", "grpo_chain"])
    assert rows["grpo_chain"]["vs_atpo"]["mean"] == pytest.approx(-0.1 * 40 / 120)
    assert rows["grpo_chain"]["vs_atpo"]["high"] == pytest.approx(-0.1 * 40 / 120)
    assert rows["atpo"]["tokens_per_step"]["mean"] == pytest.approx(200.0)
    table = ablation.comparison_table("Comparison 1", rows)
    assert "| grpo_chain | 63.3 [" in table and "| -3.3 [-3.3, -3.3] |" in table
    quality = ablation.warm_quality(warm)
    assert quality["summary"]["eval/em"]["mean"] == pytest.approx(0.6)
    assert "| seed 2 | 70.0 | 70.0 |" in ablation.warm_table(quality)
    assert "0.50 [0.50, 0.50]" in ablation.diagnostics_table(runs)
    path = tmp_path / "plot.png"
    ablation.plot(runs, str(path), "easy")
    assert path.stat().st_size > 0


def test_docs_hold_the_same_protocol_as_the_script():
    doc = ablation.__doc__
    protocol = doc[doc.index("Task: a synthetic world") : doc.index("Usage\n-----")].strip()
    text = (PATH.parents[1] / "docs" / "ablation.md").read_text()
    block = text[text.index("```text\n") + len("```text\n") :]
    assert block[: block.index("\n```")].strip() == protocol


def test_launcher_processes_share_a_compilation_cache_that_keeps_every_program(tmp_path):
    env = ablation.compilation_cache_env(str(tmp_path / "xla"))
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "xla")
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
    assert env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] == "0"
    assert env["PATH"] == os.environ["PATH"]  # this process's environment otherwise
    assert ablation.compilation_cache_env(None) == dict(os.environ)  # no cache: unchanged
    spec = ablation.warm_spec(str(tmp_path / "sweep"), "mixed", 3, [])
    assert spec.cache_dir == str(tmp_path / "sweep" / "xla_cache")


def _finished_run(workdir, marker, *, warm=False):
    os.makedirs(os.path.join(workdir, "checkpoints", "0"))
    os.makedirs(os.path.join(workdir, "checkpoints", "20"))
    os.makedirs(os.path.join(workdir, "tensorboard"))
    files = {
        "done": json.dumps(marker),
        "metrics.jsonl": json.dumps({"step": 20, "eval/em": 0.5}) + "\n",
        "run.json": "{}",
        "eval_000020.json": "{}",
        "run.log.txt": "not archived",
        os.path.join("checkpoints", "0", "params"): "weights",
        os.path.join("checkpoints", "20", "params"): "later weights",
        os.path.join("tensorboard", "events"): "events",
    }
    if warm:
        os.makedirs(os.path.join(workdir, "synthetic"))
        files[os.path.join("synthetic", "world.json")] = "{}"
    for name, text in files.items():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)


def _tree(directory):
    return sorted(
        os.path.relpath(os.path.join(d, f), directory)
        for d, _, names in os.walk(directory)
        for f in names
    )


def test_archive_keeps_records_and_the_warm_start_and_restores_only_what_is_missing(tmp_path):
    root, archive = str(tmp_path / "runs"), str(tmp_path / "archive")
    warm = ablation.warm_spec(root, "mixed", 0, ["--config.seed=0"])
    atpo = ablation.variant_spec(root, "mixed", 0, "atpo", ["--config.seed=0"])
    _finished_run(warm.workdir, warm.marker(), warm=True)
    _finished_run(atpo.workdir, atpo.marker())
    ablation.archive_run(warm.workdir, archive)
    ablation.archive_run(atpo.workdir, archive)
    assert _tree(os.path.join(archive, "mixed", "seed0_warm")) == [
        os.path.join("checkpoints", "0", "params"),
        "done",
        "eval_000020.json",
        "metrics.jsonl",
        "run.json",
        os.path.join("synthetic", "world.json"),
    ]
    # A variant keeps only its records: no checkpoints, no tensorboard, no other files.
    assert _tree(os.path.join(archive, "mixed", "seed0_atpo")) == [
        "done",
        "eval_000020.json",
        "metrics.jsonl",
        "run.json",
    ]
    with open(os.path.join(archive, "mixed", "equal_tokens.json"), "w") as f:
        json.dump({"chains": 6}, f)

    # A new checkout: everything is restored, the sweep plan skips both runs and the report's
    # metrics read back.
    fresh = str(tmp_path / "fresh")
    restored = ablation.restore_archive(archive, fresh, "mixed")
    assert [os.path.basename(d) for d in restored] == ["seed0_atpo", "seed0_warm"]
    for spec in (warm, atpo):
        moved = ablation.RunSpec(
            spec.world,
            spec.seed,
            spec.variant,
            spec.workdir.replace(root, fresh),
            spec.config,
            spec.flags,
        )
        assert ablation.plan_action(moved) == "skip"
    assert ablation.read_run_metrics(os.path.join(fresh, "mixed", "seed0_atpo"))[0] == {
        20: {"step": 20, "eval/em": 0.5}
    }
    assert os.path.exists(os.path.join(fresh, "mixed", "seed0_warm", "checkpoints", "0", "params"))
    with open(os.path.join(fresh, "mixed", "equal_tokens.json")) as f:
        assert json.load(f) == {"chains": 6}

    # A run the checkout has finished itself is not overwritten; a missing one is.
    with open(os.path.join(fresh, "mixed", "seed0_atpo", "metrics.jsonl"), "w") as f:
        f.write("local\n")
    ablation.shutil.rmtree(os.path.join(fresh, "mixed", "seed0_warm"))
    restored = ablation.restore_archive(archive, fresh, "mixed")
    assert [os.path.basename(d) for d in restored] == ["seed0_warm"]
    with open(os.path.join(fresh, "mixed", "seed0_atpo", "metrics.jsonl")) as f:
        assert f.read() == "local\n"
    assert ablation.restore_archive(archive, fresh, "easy") == []
