"""The paper's ablations on the synthetic task: AT²PO vs GRPO (chains) vs one component removed.

Variants (equal leaves per prompt, same warm start per seed):
  atpo             tree rollout + entropy expansion, tree credit, turn-level ratio (the method)
  random_expansion expansion picks uniformly at random          (no entropy-guided expansion)
  grpo_credit      GRPO outcome advantage on the tree's leaves   (no turn-wise credit)
  gspo_loss        sequence-level ratio                          (no turn-level objective)
  grpo_chain       independent chains + GRPO advantage + token PPO loss (the GRPO baseline)

For every seed the warm start (SFT) runs once (or is taken from step 0 of a finished
``benchmarks/default_run.py`` run in the same ``--workdir``, which is also the ``atpo`` run); each variant then trains from that checkpoint in its
own work directory, and the script prints mean ± std of the final held-out EM and the first step at
which held-out EM reaches ``--threshold`` (evaluated every ``--eval-every`` steps).

Run: ``python benchmarks/ablation.py [--seeds 0 1 2] [--steps 150] [--variants atpo grpo_chain]``.
It trains 5 x len(seeds) runs; on a 2-core CPU each takes several minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS: dict[str, list[str]] = {
    "atpo": [],
    "random_expansion": ["--config.rollout.expansion_mode=random"],
    "grpo_credit": ["--config.credit.mode=grpo"],
    "gspo_loss": ["--config.loss.policy_loss=gspo"],
    "grpo_chain": [
        "--config.rollout.mode=chain",
        "--config.credit.mode=grpo",
        "--config.loss.policy_loss=ppo",
        "--config.loss.clip_low=0.2",
        "--config.loss.clip_high=0.2",
        "--config.loss.loss_agg=token-mean",
    ],
}


def launch(workdir: str, args: list[str], resume: bool) -> None:
    command = [
        sys.executable,
        "-m",
        "atpo_jax.launch",
        "--config=configs/search_qa.py",
        f"--workdir={workdir}",
        *args,
    ]
    if resume:
        command.append("--resume")
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def eval_curve(workdir: str) -> dict[int, float]:
    curve = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "eval/em" in record:
                curve[int(record["step"])] = float(record["eval/em"])
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.6)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "ablation"))
    parser.add_argument(
        "--extra", nargs="*", default=[], help="more --config overrides for every run"
    )
    args = parser.parse_args()
    common = [
        f"--config.train.steps={args.steps}",
        f"--config.eval.every={args.eval_every}",
        "--config.checkpoint.export_hf=False",
        "--config.logging.plot=False",
        *args.extra,
    ]
    finals: dict[str, list[float]] = {v: [] for v in args.variants}
    lasts: dict[str, list[float]] = {v: [] for v in args.variants}
    reach: dict[str, list[float]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        base = os.path.join(args.workdir, f"seed{seed}_warm")
        atpo_run = os.path.join(args.workdir, f"seed{seed}_atpo")
        if not os.path.exists(os.path.join(base, "checkpoints", "0")) and os.path.exists(
            os.path.join(atpo_run, "checkpoints", "0")
        ):
            base = atpo_run  # a finished default run (benchmarks/default_run.py): its step 0
        seed_args = [f"--config.seed={seed}", *common]
        if not os.path.exists(os.path.join(base, "checkpoints", "0")):
            start = time.perf_counter()
            # Warm start and its evaluation only (train.steps=0); the variants resume from step 0.
            launch(base, [*seed_args, "--config.train.steps=0"], False)
            print(f"seed {seed}: warm start in {time.perf_counter() - start:.0f}s", flush=True)
        for variant in args.variants:
            workdir = os.path.join(args.workdir, f"seed{seed}_{variant}")
            if not os.path.exists(os.path.join(workdir, "done")):
                shutil.rmtree(workdir, ignore_errors=True)
                os.makedirs(os.path.join(workdir, "checkpoints"))
                shutil.copytree(
                    os.path.join(base, "checkpoints", "0"),
                    os.path.join(workdir, "checkpoints", "0"),
                )
                shutil.copytree(os.path.join(base, "synthetic"), os.path.join(workdir, "synthetic"))
                start = time.perf_counter()
                launch(workdir, [*seed_args, *VARIANTS[variant]], True)
                open(os.path.join(workdir, "done"), "w").close()
                print(f"seed {seed} {variant}: {time.perf_counter() - start:.0f}s", flush=True)
            curve = eval_curve(workdir)
            base_curve = eval_curve(base)
            curve.setdefault(0, base_curve.get(0, float("nan")))
            finals[variant].append(curve[max(curve)])
            # Less noisy than one evaluation of ~100 questions: the mean of the last three.
            lasts[variant].append(float(np.mean([curve[s] for s in sorted(curve)[-3:]])))
            hits = [s for s in sorted(curve) if curve[s] >= args.threshold]
            reach[variant].append(hits[0] if hits else float("nan"))
    print(
        f"\nHeld-out EM after {args.steps} RL steps, seeds {args.seeds} (threshold {args.threshold}):"
    )
    print(
        "| variant | final EM (mean ± std) | per seed | mean of the last 3 evaluations "
        "| first step with EM >= threshold |"
    )
    print("|---|---|---|---|---|")
    for variant in args.variants:
        em = np.array(finals[variant]) * 100
        last = np.array(lasts[variant]) * 100
        steps = ", ".join("-" if np.isnan(s) else str(int(s)) for s in reach[variant])
        print(
            f"| {variant} | {em.mean():.1f} ± {em.std():.1f} | {', '.join(f'{x:.1f}' for x in em)} "
            f"| {last.mean():.1f} ± {last.std():.1f} | {steps} |"
        )


if __name__ == "__main__":
    main()
