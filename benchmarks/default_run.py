"""The README's default run, three seeds: wall time, warm-start EM, EM after RL, and a plot.

Runs ``python -m atpo_jax.launch --config=configs/search_qa.py --config.seed=S`` for each seed (the
embedded default: synthetic world, tiny Llama, supervised warm start, AT²PO), times it, and reads the
held-out evaluations from ``metrics.jsonl``: step 0 is the warm-started policy, the last step the policy
after RL. Prints a markdown table and writes ``--plot`` (held-out EM per seed and per hop count, and the
training reward).

Run: ``python benchmarks/default_run.py [--seeds 0 1 2] [--plot docs/images/default_run.png]``.
Each run keeps every checkpoint (``checkpoint.keep``) in ``<workdir>/seed<S>_atpo``.
``benchmarks/ablation.py`` does not reuse these runs: its sweeps (``<workdir>/<world>/...``) train
their own shared warm start per (world, seed), with the protocol's settings (docs/ablation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ablation import ROOT, launch  # noqa: E402

HOPS = ("synthetic_1hop", "synthetic_2hop", "synthetic_3hop")


def read_metrics(workdir: str) -> tuple[dict[int, dict], list[tuple[int, float]]]:
    """Evaluations by step, and (step, mean training reward) pairs."""
    evals, rewards = {}, []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval/em" in record:
                evals[int(record["step"])] = record
            elif "reward/mean" in record:
                rewards.append((int(record["step"]), float(record["reward/mean"])))
    return evals, rewards


def run_seed(workdir: str, seed: int, extra: list[str] = ()) -> float:
    """Runs the default config for ``seed`` (plus ``extra`` flags) unless already done; returns
    its wall seconds."""
    done = os.path.join(workdir, "done")
    flags = [f"--config.seed={seed}", "--config.checkpoint.keep=1000", *extra]
    if os.path.exists(done):
        with open(done) as f:
            record = json.load(f)
        if record["flags"] == flags:
            return float(record["seconds"])
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    launch(workdir, flags, resume=False)
    seconds = time.perf_counter() - start
    with open(done, "w") as f:
        json.dump({"seconds": seconds, "flags": flags}, f)
    return seconds


def training_cost(workdir: str) -> dict[str, float]:
    """The policy passes' cost over the run: update + scoring seconds, computed / real tokens,
    compiled micro-batch shapes (``train/programs``; 0 for the padded layout)."""
    seconds = computed = real = programs = 0.0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "train/computed_tokens" in record:
                seconds += record.get("time/update_s", 0.0) + record.get("time/log_probs_s", 0.0)
                computed += record["train/computed_tokens"]
                real += record["train/real_tokens"]
                programs = max(programs, record.get("train/programs", 0.0))
    return {
        "update_s": seconds,
        "computed_per_real": computed / max(real, 1.0),
        "programs": int(programs),
    }


def plot(runs: dict[int, tuple[dict[int, dict], list[tuple[int, float]]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for seed, (evals, rewards) in runs.items():
        steps = sorted(evals)
        axes[0].plot(
            steps, [100 * evals[s]["eval/em"] for s in steps], marker="o", label=f"seed {seed}"
        )
        for hop, style in zip(HOPS, ("-", "--", ":"), strict=True):
            key = f"eval/em/{hop}"
            axes[1].plot(
                steps,
                [100 * evals[s].get(key, np.nan) for s in steps],
                style,
                color=f"C{seed % 10}",
                label=f"seed {seed}, {hop.split('_')[1]}",
            )
        r_steps, r = zip(*rewards, strict=True)
        window = 10
        smooth = np.convolve(r, np.ones(window) / window, mode="valid")
        axes[2].plot(r_steps[window - 1 :], smooth, label=f"seed {seed}")
    axes[0].set(
        title="held-out EM (all questions)", xlabel="RL step (0 = warm start)", ylabel="EM %"
    )
    axes[1].set(title="held-out EM by number of searches needed", xlabel="RL step", ylabel="EM %")
    axes[2].set(title="training reward (EM), 10-step mean", xlabel="RL step", ylabel="reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "ablation"))
    parser.add_argument("--plot", default=os.path.join(ROOT, "runs", "default_run.png"))
    parser.add_argument(
        "--flag",
        action="append",
        default=[],
        help="an extra launcher flag for every seed, e.g. --flag=--config.train.packing=padded "
        "(the runs then go to <workdir>/seed<S>_<flags>)",
    )
    args = parser.parse_args()
    runs, rows = {}, []
    suffix = "_".join(f.split("=")[-1] for f in args.flag) or "atpo"
    for seed in args.seeds:
        workdir = os.path.join(args.workdir, f"seed{seed}_{suffix}")
        seconds = run_seed(workdir, seed, args.flag)
        evals, rewards = read_metrics(workdir)
        runs[seed] = (evals, rewards)
        first, last = evals[min(evals)], evals[max(evals)]
        rows.append((seed, seconds, first, last, max(evals)))
        cost = training_cost(workdir)
        print(
            f"seed {seed}: {seconds / 60:.1f} min; update {cost['update_s']:.0f} s, computed / "
            f"real tokens {cost['computed_per_real']:.3f}, programs {cost['programs']}",
            flush=True,
        )
    print("\n| seed | wall time | warm-start EM | EM after RL (step) | gain | 3-hop EM warm → RL |")
    print("|---|---|---|---|---|---|")
    gains = []
    for seed, seconds, first, last, step in rows:
        gain = 100 * (last["eval/em"] - first["eval/em"])
        gains.append(gain)
        hop3 = "eval/em/synthetic_3hop"
        print(
            f"| {seed} | {seconds / 60:.1f} min | {100 * first['eval/em']:.1f} | "
            f"{100 * last['eval/em']:.1f} ({step}) | {gain:+.1f} | "
            f"{100 * first.get(hop3, np.nan):.1f} → {100 * last.get(hop3, np.nan):.1f} |"
        )
    print(f"\nmean gain {np.mean(gains):+.1f} ± {np.std(gains):.1f} points")
    plot(runs, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
