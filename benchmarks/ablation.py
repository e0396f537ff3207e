"""The paper's ablations on the synthetic task: AT²PO vs one component removed vs the GRPO chain baseline.

Protocol (fixed on 2026-12-03, before any result of it was read; docs/ablation.md holds the same text)
------------------------------------------------------------------------------------------------------

Task: a synthetic world (``--world``: easy, ambiguous, long, noisy, mixed;
``atpo_jax.data.synthetic.WORLDS``), the ``tiny`` run of ``configs/search_qa.py`` (its model, warm
start, reward and 120 RL steps of 16 prompts), evaluated every 20 steps on the held-out test split.
Per world only the response budget grows with the world's longest demonstration
(``rollout.max_response_len``: easy 224, ambiguous 256, noisy 416, long 448, mixed 480). A world with
retrieval noise is searched through it in training and evaluation alike (its manifest's rate and seed).

Variants (everything else equal):

  atpo              tree rollout + entropy-guided expansion, tree credit, turn-level ratio (the method)
  random_expansion  expansion picks uniformly at random           (no entropy-guided expansion)
  grpo_credit       GRPO outcome advantage on the tree's leaves    (no turn-wise credit)
  gspo_loss         sequence-level ratio                           (no turn-level objective)
  grpo_chain        ``configs/search_qa.py:tiny_grpo``: the paper's GRPO chain baseline with the
                    reference script's settings (8 independent chains, GRPO advantage, token PPO loss
                    with clip 0.2/0.2 and dual clip 3, token-mean, low-variance KL 0.001, the chain
                    rollout's EOS call-limit rule and failure text)
  grpo_chain_tokens grpo_chain with ``n`` chains per prompt instead of 8, ``n`` chosen so that its
                    generated tokens per step match AT²PO's (comparison 2)

Seeds: 0, 1, 2, 3, 4 (at least five). For each (world, seed) one warm start (the supervised pass,
``train.steps=0``) is trained once; every variant starts from a copy of its step-0 checkpoint, so
all variants of a seed start from the same policy. The warm start is run with ``loss.kl_coef=0.001``
only so that its checkpoint also holds the KL reference grpo_chain needs (a copy of the warm-started
weights; the warm start itself does not depend on it). Its held-out evaluation (EM overall and by hop)
is reported as the warm-start quality: where RL starts.

Metric: held-out EM of a run = the mean of its last 3 evaluations (steps 80, 100, 120). Per variant:
the mean over seeds with a 95% percentile-bootstrap confidence interval over seeds (10,000
resamples of the seeds with replacement, NumPy ``default_rng(0)``), and the paired difference against
atpo: per seed (variant − atpo), its mean and the same bootstrap interval of that mean.

Comparison 1, equal leaves per prompt: every variant has 8 leaf rows per prompt (trees: 4 initial
chains + 2 rounds x 2 expansions; chains: 8).
Comparison 2, equal generated tokens per step: atpo vs grpo_chain_tokens. A tree re-uses its prefixes,
so at 8 leaves it samples fewer tokens than 8 chains. Rule: once atpo and grpo_chain have finished
for every seed of the sweep, ``n = round(8 x T_atpo / T_chain)`` (at least 2), where ``T`` is the mean
``rollout/generated_tokens`` per RL step over all steps and seeds of that variant's runs; ``n`` is
written to ``<workdir>/<world>/equal_tokens.json`` and kept from then on. Both comparisons report every
variant's measured generated tokens per step.

Diagnostics per variant (from each run's ``metrics.jsonl``; docs/ablation.md says what each means):
learning curves of held-out EM (overall and by hop), training reward, tool calls per chain, sampler
entropy by tree depth, the share of prompts whose leaves disagree (where credit has signal), and how
often expansion picks the decisive turn (rows of the harder worlds record ``decisive_hop``).

History rule: if the task or the protocol is changed after results were seen, every version tried is
reported with its results (docs/ablation.md, "History"), not only the last one.

Usage
-----

``python benchmarks/ablation.py --world mixed --seeds 0 1 2 3 4 [--jobs N] [--archive DIR] [--out R.json] [--plot P.png]``

Runs go to ``<workdir>/<world>/seed<S>_<variant>`` (``seed<S>_warm``: the warm start); each run's
launcher output goes to ``<run>.log``. ``--jobs N`` runs up to N launcher processes at once (the warm
starts first, then the variants of comparison 1, then grpo_chain_tokens). A run that finished has a
``done`` marker (its flags) and is skipped; a run that stopped part way is continued with ``--resume``
from its newest checkpoint; a marker whose flags differ from this sweep's stops the script (use
another ``--workdir``). ``--report-only`` launches nothing and reports what is there.
``--archive DIR`` copies each finished run's records (a warm start's step-0 checkpoint and world
too) to ``DIR/<world>`` and restores from there what the workdir lacks: commit it to continue a
sweep in another checkout. All runs share JAX's compilation cache in ``<workdir>/xla_cache``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/search_qa.py"

SEEDS = (0, 1, 2, 3, 4)
LEAVES = 8  # leaf rows per prompt of the tiny run (and chains of tiny_grpo)
LAST_EVALS = 3
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95

# rollout.max_response_len per world: the longest demonstration (seed 0), rounded up to 32.
RESPONSE_BUDGET = {"easy": 224, "ambiguous": 256, "noisy": 416, "long": 448, "mixed": 480}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A variant: the config variant of ``configs/search_qa.py`` and the flags on top."""

    config: str
    flags: tuple[str, ...] = ()
    description: str = ""


VARIANTS: dict[str, Variant] = {
    "atpo": Variant("tiny", (), "tree, entropy expansion, tree credit, turn-level ratio"),
    "random_expansion": Variant(
        "tiny", ("--config.rollout.expansion_mode=random",), "expansion picks at random"
    ),
    "grpo_credit": Variant(
        "tiny", ("--config.credit.mode=grpo",), "GRPO outcome advantage on the tree's leaves"
    ),
    "gspo_loss": Variant("tiny", ("--config.loss.policy_loss=gspo",), "sequence-level ratio"),
    "grpo_chain": Variant("tiny_grpo", (), "tiny_grpo: 8 chains, GRPO, token PPO loss, KL 0.001"),
    # Its chain count is set by the equal-token rule (chain_flags).
    "grpo_chain_tokens": Variant("tiny_grpo", (), "tiny_grpo at AT²PO's generated tokens per step"),
}
EQUAL_LEAVES = ("atpo", "random_expansion", "grpo_credit", "gspo_loss", "grpo_chain")
EQUAL_TOKENS = ("atpo", "grpo_chain_tokens")
WARM = "warm"


def compilation_cache_env(cache_dir: str | None) -> dict[str, str]:
    """The environment of a launcher process: this one's, plus JAX's persistent compilation cache
    in ``cache_dir`` (when given) with every program cached however fast it compiled.

    Every run of a sweep compiles the same programs (same model, same shapes); from the second run
    on they load from the cache instead (a 10-step mixed-world run: 245 s without, 103 s with, the
    metrics identical but for timings). JAX's default threshold caches only programs that took over
    a second to compile, which leaves out most of the tiny model's."""
    env = dict(os.environ)
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def launch(
    workdir: str,
    args: Sequence[str],
    resume: bool,
    *,
    config: str = "tiny",
    log: str | None = None,
    cache_dir: str | None = None,
) -> None:
    """``python -m atpo_jax.launch --config=configs/search_qa.py[:config] --workdir=...`` (stdout to
    ``log``, or discarded; stderr to ``log`` too when given), with the compilation cache of
    :func:`compilation_cache_env` in ``cache_dir`` when given."""
    env = compilation_cache_env(cache_dir)
    spec = CONFIG if config == "tiny" else f"{CONFIG}:{config}"
    command = [sys.executable, "-m", "atpo_jax.launch", f"--config={spec}", f"--workdir={workdir}"]
    command += list(args)
    if resume:
        command.append("--resume")
    if log is None:
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=env)
        return
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(command)}\n")
        f.flush()
        subprocess.run(command, cwd=ROOT, check=True, stdout=f, stderr=subprocess.STDOUT, env=env)


# ---------------------------------------------------------------------------------- statistics


def bootstrap_indices(n: int, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """[resamples, n] indices of ``n`` values drawn with replacement (NumPy ``default_rng(seed)``)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(
    values: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
    """The mean of ``values`` and its percentile-bootstrap interval: the ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles of the means of ``resamples`` resamples with replacement.
    One value gives a zero-width interval; none gives NaNs."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    means = x[bootstrap_indices(x.size, resamples, seed)].mean(axis=1)
    low, high = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"mean": float(x.mean()), "low": float(low), "high": float(high), "n": int(x.size)}


def paired_difference(
    values: Mapping[int, float], reference: Mapping[int, float], **bootstrap: float
) -> dict:
    """Per seed ``values[s] - reference[s]`` over the seeds both have, with the mean difference and
    its bootstrap interval (:func:`bootstrap_ci`)."""
    seeds = sorted(set(values) & set(reference))
    diffs = {s: float(values[s]) - float(reference[s]) for s in seeds}
    return {"per_seed": diffs, **bootstrap_ci([diffs[s] for s in seeds], **bootstrap)}


def final_em(evals: Mapping[int, float], last: int = LAST_EVALS) -> float:
    """The protocol's metric: the mean held-out EM of the run's last ``last`` evaluations."""
    steps = sorted(evals)[-last:]
    return float(np.mean([evals[s] for s in steps])) if steps else float("nan")


def equal_token_chains(atpo_tokens: Sequence[float], chain_tokens: Sequence[float]) -> int:
    """The equal-token rule: ``round(LEAVES x mean(atpo) / mean(chain))`` chains, at least 2."""
    return max(2, int(round(LEAVES * float(np.mean(atpo_tokens)) / float(np.mean(chain_tokens)))))


# ---------------------------------------------------------------------------------- metrics


def read_run_metrics(workdir: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """A run's evaluations and training-step records by step (the last record of a step wins: a
    resumed run repeats the steps after its last checkpoint)."""
    evals: dict[int, dict] = {}
    train: dict[int, dict] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return evals, train
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            step = int(record["step"])
            if "eval/em" in record:
                evals[step] = record
            elif "reward/mean" in record:
                train[step] = record
    return evals, train


# ---------------------------------------------------------------------------------- the sweep plan


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One launcher run of the sweep."""

    world: str
    seed: int
    variant: str  # a VARIANTS key, or WARM
    workdir: str
    config: str
    flags: tuple[str, ...]

    @property
    def log(self) -> str:
        return self.workdir + ".log"

    @property
    def cache_dir(self) -> str:
        """The sweep's compilation cache: ``<workdir>/xla_cache``, shared by all its runs."""
        return os.path.join(os.path.dirname(os.path.dirname(self.workdir)), "xla_cache")

    def marker(self) -> dict:
        return {"config": self.config, "flags": list(self.flags)}


def run_dir(root: str, world: str, seed: int, variant: str) -> str:
    return os.path.join(root, world, f"seed{seed}_{variant}")


def common_flags(world: str, seed: int, steps: int, eval_every: int, extra: Sequence[str]) -> list:
    return [
        f"--config.seed={seed}",
        f"--config.data.synthetic.world={world}",
        f"--config.rollout.max_response_len={RESPONSE_BUDGET[world]}",
        f"--config.train.steps={steps}",
        f"--config.eval.every={eval_every}",
        "--config.checkpoint.export_hf=False",
        "--config.logging.plot=False",
        *extra,
    ]


def chain_flags(chains: int) -> tuple[str, ...]:
    return (
        f"--config.rollout.samples_per_tree={chains}",
        f"--config.rollout.initial_rollouts={chains}",
    )


def warm_spec(root: str, world: str, seed: int, common: Sequence[str]) -> RunSpec:
    flags = (*common, "--config.train.steps=0", "--config.loss.kl_coef=0.001")
    return RunSpec(world, seed, WARM, run_dir(root, world, seed, WARM), "tiny", flags)


def variant_spec(
    root: str, world: str, seed: int, variant: str, common: Sequence[str], chains: int | None = None
) -> RunSpec:
    v = VARIANTS[variant]
    flags = (*common, *v.flags)
    if variant == "grpo_chain_tokens":
        if chains is None:
            raise ValueError("grpo_chain_tokens needs its chain count (the equal-token rule)")
        flags += chain_flags(chains)
    return RunSpec(world, seed, variant, run_dir(root, world, seed, variant), v.config, flags)


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of ``<workdir>/checkpoints/<step>`` folders (partial saves have other names)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def plan_action(spec: RunSpec) -> str:
    """What the sweep does with ``spec``: ``skip`` (finished with these flags), ``conflict`` (finished
    with other flags: the sweep stops), ``resume`` (a variant stopped part way: a run manifest and
    a checkpoint after step 0) or ``start`` (anything else: the folder is cleared first)."""
    done = os.path.join(spec.workdir, "done")
    if os.path.exists(done):
        with open(done) as f:
            try:
                recorded = json.load(f)
            except json.JSONDecodeError:
                recorded = None
        return "skip" if recorded == spec.marker() else "conflict"
    started = os.path.exists(os.path.join(spec.workdir, "run.json"))
    if spec.variant != WARM and started and any(s > 0 for s in checkpoint_steps(spec.workdir)):
        return "resume"
    return "start"


def execute(spec: RunSpec, action: str, warm_dir: str | None) -> float:
    """Runs ``spec`` (``start`` or ``resume``); writes its ``done`` marker; returns its seconds."""
    start = time.perf_counter()
    if action not in ("start", "resume"):
        raise ValueError(f"cannot execute action {action!r}")
    if action == "start":
        shutil.rmtree(spec.workdir, ignore_errors=True)
        if os.path.exists(spec.log):
            os.remove(spec.log)
        if spec.variant != WARM:  # a variant starts as a resume of a copy of its warm start
            os.makedirs(os.path.join(spec.workdir, "checkpoints"))
            shutil.copytree(
                os.path.join(warm_dir, "checkpoints", "0"),
                os.path.join(spec.workdir, "checkpoints", "0"),
            )
            shutil.copytree(
                os.path.join(warm_dir, "synthetic"), os.path.join(spec.workdir, "synthetic")
            )
    resume = spec.variant != WARM or action == "resume"
    launch(
        spec.workdir, spec.flags, resume, config=spec.config, log=spec.log, cache_dir=spec.cache_dir
    )
    with open(os.path.join(spec.workdir, "done"), "w") as f:
        json.dump(spec.marker(), f)
    return time.perf_counter() - start


# What a finished run keeps in an archive: its records (everything the report reads), and for a
# warm start also what its variants start from (the step-0 checkpoint and the generated world).
ARCHIVED_FILES = ("done", "metrics.jsonl", "run.json")
ARCHIVED_WARM_DIRS = (os.path.join("checkpoints", "0"), "synthetic")


def archive_run(workdir: str, archive: str) -> str:
    """Copies a finished run's records (``ARCHIVED_FILES`` and its ``eval_*.json``; for a warm
    start also ``ARCHIVED_WARM_DIRS``) to ``<archive>/<world>/<run>``; returns that folder.

    A sweep on the 2-core machine takes longer than a session and the machine is not kept: the
    archive (a few MB per seed, committed) is what lets a later checkout continue it."""
    world, name = os.path.basename(os.path.dirname(workdir)), os.path.basename(workdir)
    target = os.path.join(archive, world, name)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    for entry in sorted(os.listdir(workdir)):
        if entry in ARCHIVED_FILES or (entry.startswith("eval_") and entry.endswith(".json")):
            shutil.copy2(os.path.join(workdir, entry), os.path.join(target, entry))
    if name.endswith("_" + WARM):
        for sub in ARCHIVED_WARM_DIRS:
            shutil.copytree(os.path.join(workdir, sub), os.path.join(target, sub))
    return target


def restore_archive(archive: str, root: str, world: str) -> list[str]:
    """Copies the archived runs of ``world`` that ``root`` has not finished into ``root`` (and the
    equal-token record if ``root`` lacks it); returns the restored run folders."""
    source = os.path.join(archive, world)
    if not os.path.isdir(source):
        return []
    restored = []
    for name in sorted(os.listdir(source)):
        origin, target = os.path.join(source, name), os.path.join(root, world, name)
        if name == "equal_tokens.json":
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(origin, target)
            continue
        if not os.path.exists(os.path.join(origin, "done")) or os.path.exists(
            os.path.join(target, "done")
        ):
            continue
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(origin, target)
        restored.append(target)
    return restored


def run_phase(
    specs: Sequence[RunSpec],
    jobs: int,
    warm_dirs: Mapping[tuple, str],
    archive: str | None = None,
) -> None:
    """Runs the specs that need running, at most ``jobs`` launcher processes at once; each run that
    finishes is archived to ``archive`` (:func:`archive_run`) when given."""
    actions = [(spec, plan_action(spec)) for spec in specs]
    conflicts = [spec.workdir for spec, action in actions if action == "conflict"]
    if conflicts:
        raise SystemExit(
            "finished runs with other settings than this sweep's (their done marker records "
            f"them): {', '.join(conflicts)}; use another --workdir"
        )
    todo = [(spec, action) for spec, action in actions if action in ("start", "resume")]
    for spec, action in actions:
        if action == "skip":
            print(f"{spec.world} seed {spec.seed} {spec.variant}: done", flush=True)

    failed = []

    def one(item):
        spec, action = item
        warm = warm_dirs.get((spec.world, spec.seed))
        try:
            seconds = execute(spec, action, warm)
        except subprocess.CalledProcessError as e:
            failed.append(f"{spec.workdir} (exit {e.returncode}; see {spec.log})")
            print(
                f"{spec.world} seed {spec.seed} {spec.variant}: FAILED, see {spec.log}", flush=True
            )
            return
        if archive:
            archive_run(spec.workdir, archive)
        print(f"{spec.world} seed {spec.seed} {spec.variant}: {action}, {seconds:.0f}s", flush=True)

    # The other runs go on when one fails; the sweep stops after the phase (rerun to resume).
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, item) for item in todo]:
            future.result()
    if failed:
        raise SystemExit("runs failed: " + "; ".join(failed))


def tokens_per_step(workdir: str) -> float:
    _, train = read_run_metrics(workdir)
    values = [
        r["rollout/generated_tokens"] for r in train.values() if "rollout/generated_tokens" in r
    ]
    return float(np.mean(values)) if values else float("nan")


def resolve_equal_tokens(
    root: str, world: str, seeds: Sequence[int], *, write: bool = True
) -> dict | None:
    """The equal-token chain count: read from ``equal_tokens.json``, else measured by the rule once
    atpo and grpo_chain are done for every seed (then written there, with ``write``); None before."""
    path = os.path.join(root, world, "equal_tokens.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    runs = {v: [run_dir(root, world, s, v) for s in seeds] for v in ("atpo", "grpo_chain")}
    if not all(os.path.exists(os.path.join(d, "done")) for ds in runs.values() for d in ds):
        return None
    atpo = [tokens_per_step(d) for d in runs["atpo"]]
    chain = [tokens_per_step(d) for d in runs["grpo_chain"]]
    record = {
        "chains": equal_token_chains(atpo, chain),
        "seeds": list(seeds),
        "atpo_tokens_per_step": float(np.mean(atpo)),
        "grpo_chain_tokens_per_step": float(np.mean(chain)),
        "rule": f"round({LEAVES} x atpo / grpo_chain tokens per step), at least 2",
    }
    if write:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    return record


# ---------------------------------------------------------------------------------- the report

DIAGNOSTIC_KEYS = (
    "reward/mean",
    "rollout/tool_calls_per_chain",
    "rollout/generated_tokens",
    "tree/leaves_disagree",
    "tree/decisive_pick_rate",
    "update/entropy",
)


def run_summary(workdir: str, warm_evals: Mapping[int, dict]) -> dict:
    """One run's curves and summary numbers (the warm start's step-0 evaluation prepended)."""
    evals, train = read_run_metrics(workdir)
    evals = {**{s: r for s, r in warm_evals.items() if s == 0}, **evals}
    rl_evals = {s: r["eval/em"] for s, r in evals.items() if s > 0}
    eval_keys = sorted({k for r in evals.values() for k in r if k.startswith("eval/")})
    train_keys = sorted(
        {
            k
            for r in train.values()
            for k in r
            if k in DIAGNOSTIC_KEYS or k.startswith("tree/entropy_depth_")
        }
    )
    curves = {
        key: {int(s): float(r[key]) for s, r in sorted(evals.items()) if key in r}
        for key in eval_keys
    }
    curves.update(
        {
            key: {int(s): float(r[key]) for s, r in sorted(train.items()) if key in r}
            for key in train_keys
        }
    )
    means = {key: float(np.mean(list(curves[key].values()))) for key in train_keys}
    return {
        "final_em": final_em(rl_evals),
        "final_em_by_hop": {
            key.rsplit("/", 1)[1]: final_em({s: v for s, v in curves[key].items() if s > 0})
            for key in eval_keys
            if key.startswith("eval/em/")
        },
        "evaluated_steps": sorted(rl_evals),
        "run_means": means,
        "curves": curves,
    }


def warm_quality(warm_dirs: Mapping[int, str]) -> dict:
    """The warm starts' step-0 held-out evaluation per seed, and mean with CI per metric."""
    per_seed = {}
    for seed, directory in warm_dirs.items():
        evals, _ = read_run_metrics(directory)
        if 0 in evals:
            per_seed[seed] = {k: float(v) for k, v in evals[0].items() if k.startswith("eval/")}
    keys = sorted({k for r in per_seed.values() for k in r})
    return {
        "per_seed": per_seed,
        "summary": {k: bootstrap_ci([r[k] for r in per_seed.values() if k in r]) for k in keys},
    }


def comparison(runs: Mapping[str, Mapping[int, dict]], variants: Iterable[str]) -> dict:
    """Per variant: mean final EM with CI, per-seed values, tokens per step, paired difference
    against atpo."""
    reference = {s: r["final_em"] for s, r in runs.get("atpo", {}).items()}
    out = {}
    for variant in variants:
        per_seed = {s: r["final_em"] for s, r in runs.get(variant, {}).items()}
        if not per_seed:
            continue
        tokens = [
            r["run_means"].get("rollout/generated_tokens", np.nan) for r in runs[variant].values()
        ]
        row = {
            "per_seed": per_seed,
            **bootstrap_ci(list(per_seed.values())),
            "tokens_per_step": bootstrap_ci([t for t in tokens if np.isfinite(t)]),
        }
        if variant != "atpo" and reference:
            row["vs_atpo"] = paired_difference(per_seed, reference)
        out[variant] = row
    return out


def _pct(ci: Mapping[str, float]) -> str:
    if not ci.get("n"):
        return "–"
    return f"{100 * ci['mean']:.1f} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"


def comparison_table(title: str, rows: Mapping[str, dict]) -> str:
    lines = [
        f"### {title}",
        "",
        "| variant | held-out EM % (mean [95% CI]) | vs atpo, points (mean [95% CI]) | per seed "
        "| generated tokens / step |",
        "|---|---|---|---|---|",
    ]
    for variant, row in rows.items():
        diff = _pct(row["vs_atpo"]) if "vs_atpo" in row else "–"
        seeds = ", ".join(f"{s}: {100 * v:.1f}" for s, v in sorted(row["per_seed"].items()))
        tokens = row["tokens_per_step"]
        tok = f"{tokens['mean']:.0f}" if tokens.get("n") else "–"
        lines.append(f"| {variant} | {_pct(row)} | {diff} | {seeds} | {tok} |")
    return "\n".join(lines)


def warm_table(warm: Mapping) -> str:
    summary = warm["summary"]
    if not summary:
        return "### Warm start\n\n(no warm start evaluated yet)"
    keys = ["eval/em", *sorted(k for k in summary if k.startswith("eval/em/"))]
    header = " | ".join(k.replace("eval/em/synthetic_", "").replace("eval/em", "all") for k in keys)
    lines = [
        "### Warm start (step 0, held-out EM %, mean [95% CI] over seeds)",
        "",
        f"| | {header} |",
        "|---|" + "---|" * len(keys),
        "| mean | " + " | ".join(_pct(summary[k]) for k in keys) + " |",
    ]
    for seed, row in sorted(warm["per_seed"].items()):
        cells = " | ".join(f"{100 * row[k]:.1f}" if k in row else "–" for k in keys)
        lines.append(f"| seed {seed} | {cells} |")
    return "\n".join(lines)


def diagnostics_table(runs: Mapping[str, Mapping[int, dict]]) -> str:
    keys = ("rollout/tool_calls_per_chain", "tree/leaves_disagree", "tree/decisive_pick_rate")
    lines = [
        "### Diagnostics (mean over the run's steps, mean [95% CI] over seeds)",
        "",
        "| variant | tool calls / chain | prompts whose leaves disagree | decisive-turn pick rate |",
        "|---|---|---|---|",
    ]
    for variant, seeds in runs.items():
        cells = []
        for key in keys:
            values = [r["run_means"][key] for r in seeds.values() if key in r["run_means"]]
            ci = bootstrap_ci(values)
            cells.append(f"{ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]" if values else "–")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_band(curves: Sequence[Mapping[int, float]]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Steps every seed has, the mean over seeds and the bootstrap CI half-widths there."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    mean, low, high = [], [], []
    for step in steps:
        ci = bootstrap_ci([c[step] for c in curves], resamples=2000)
        mean.append(ci["mean"])
        low.append(ci["low"])
        high.append(ci["high"])
    return steps, np.array(mean), np.array([low, high])


def plot(runs: Mapping[str, Mapping[int, dict]], path: str, world: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for seeds in runs.values() for r in seeds.values() for k in r["curves"]})
    hops = [k for k in keys if k.startswith("eval/em/")]
    depths = [k for k in keys if k.startswith("tree/entropy_depth_")]
    panels = [
        ("eval/em", "held-out EM (all)", 1),
        *[(k, f"held-out EM, {k.rsplit('_', 1)[1]}", 1) for k in hops],
        ("reward/mean", "training reward (10-step mean)", 10),
        ("rollout/tool_calls_per_chain", "tool calls per chain (10-step mean)", 10),
        ("tree/leaves_disagree", "prompts whose leaves disagree (10-step mean)", 10),
        ("tree/decisive_pick_rate", "expansion picks at the decisive turn (10-step mean)", 10),
        *[(k, f"sampler entropy, depth {k.rsplit('_', 1)[1]} (10-step mean)", 10) for k in depths],
    ]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (key, title, window) in zip(axes.flat, panels, strict=False):
        for i, (variant, seeds) in enumerate(runs.items()):
            curves = [r["curves"][key] for r in seeds.values() if key in r["curves"]]
            if not curves:
                continue
            if window > 1:
                curves = [_smooth(c, window) for c in curves]
            steps, mean, band = curve_band(curves)
            if not steps:
                continue
            ax.plot(steps, mean, color=f"C{i}", label=variant, marker="o" if window == 1 else None)
            ax.fill_between(steps, band[0], band[1], color=f"C{i}", alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"world {world}: mean over seeds, 95% bootstrap band", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _smooth(curve: Mapping[int, float], window: int) -> dict[int, float]:
    steps = sorted(curve)
    values = np.array([curve[s] for s in steps])
    window = min(window, len(values))  # a short run (a quick check) is drawn unsmoothed
    if window == 0:
        return {}
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    return dict(zip(steps[window - 1 :], smooth.tolist(), strict=True))


def first_reach(curve: Mapping[int, float], threshold: float) -> int | None:
    hits = [s for s in sorted(curve) if curve[s] >= threshold]
    return hits[0] if hits else None


# ---------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--world", default="easy", choices=sorted(RESPONSE_BUDGET))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="launcher processes at once")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "ablation"))
    parser.add_argument(
        "--out", default="", help="JSON of everything (default <world>/results.json)"
    )
    parser.add_argument("--plot", default="", help="learning curves (default <world>/ablation.png)")
    parser.add_argument(
        "--threshold", type=float, default=0.7, help="also report the first step EM >= this"
    )
    parser.add_argument("--report-only", action="store_true", help="launch nothing")
    parser.add_argument(
        "--archive",
        default="",
        help="a folder (e.g. benchmarks/results/ablation) that finished runs are copied to and "
        "restored from: commit it to continue a sweep in another checkout",
    )
    parser.add_argument(
        "--flag",
        action="append",
        default=[],
        help="an extra launcher flag for every run (warm start included), e.g. "
        "--flag=--config.sft.steps=300; recorded in each run's done marker",
    )
    args = parser.parse_args()
    root, world = args.workdir, args.world
    if "atpo" not in args.variants:
        args.variants.insert(0, "atpo")  # the reference of every paired difference
    common = {s: common_flags(world, s, args.steps, args.eval_every, args.flag) for s in args.seeds}
    warm = {s: warm_spec(root, world, s, common[s]) for s in args.seeds}
    warm_dirs = {(world, s): spec.workdir for s, spec in warm.items()}
    leaves_variants = [v for v in args.variants if v != "grpo_chain_tokens"]
    archive = os.path.abspath(args.archive) if args.archive else None
    if archive:
        for directory in restore_archive(archive, root, world):
            print(f"restored from the archive: {directory}", flush=True)
    if not args.report_only:
        run_phase(list(warm.values()), args.jobs, warm_dirs, archive)
        phase = [
            variant_spec(root, world, s, v, common[s]) for v in leaves_variants for s in args.seeds
        ]
        run_phase(phase, args.jobs, warm_dirs, archive)
    equal = None
    if "grpo_chain_tokens" in args.variants:
        equal = resolve_equal_tokens(root, world, args.seeds, write=not args.report_only)
        if equal is None:
            print("grpo_chain_tokens waits for atpo and grpo_chain on every seed", flush=True)
        elif not args.report_only:
            phase = [
                variant_spec(root, world, s, "grpo_chain_tokens", common[s], equal["chains"])
                for s in args.seeds
            ]
            run_phase(phase, args.jobs, warm_dirs, archive)
        if equal is not None and archive and not args.report_only:
            os.makedirs(os.path.join(archive, world), exist_ok=True)
            shutil.copy2(
                os.path.join(root, world, "equal_tokens.json"),
                os.path.join(archive, world, "equal_tokens.json"),
            )

    warm_evals = {s: read_run_metrics(warm[s].workdir)[0] for s in args.seeds}
    runs: dict[str, dict[int, dict]] = {}
    for variant in args.variants:
        for s in args.seeds:
            directory = run_dir(root, world, s, variant)
            if os.path.exists(os.path.join(directory, "done")):
                runs.setdefault(variant, {})[s] = run_summary(directory, warm_evals[s])
    results = {
        "world": world,
        "seeds": args.seeds,
        "steps": args.steps,
        "protocol": "benchmarks/ablation.py module docstring (docs/ablation.md)",
        "flags": {v: [*VARIANTS[v].flags] for v in args.variants},
        "configs": {v: VARIANTS[v].config for v in args.variants},
        "equal_tokens": equal,
        "warm_start": warm_quality({s: warm[s].workdir for s in args.seeds}),
        "equal_leaves": comparison(runs, [v for v in EQUAL_LEAVES if v in args.variants]),
        "equal_tokens_comparison": comparison(
            runs, [v for v in EQUAL_TOKENS if v in args.variants]
        ),
        "first_step_at_threshold": {
            v: {
                s: first_reach(r["curves"].get("eval/em", {}), args.threshold)
                for s, r in seeds.items()
            }
            for v, seeds in runs.items()
        },
        "runs": runs,
    }
    out = args.out or os.path.join(root, world, "results.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1, allow_nan=True)
    print(f"\n## world {world}, seeds {args.seeds}, {args.steps} RL steps\n")
    print(warm_table(results["warm_start"]) + "\n")
    print(comparison_table("Comparison 1: equal leaves per prompt", results["equal_leaves"]) + "\n")
    title = "Comparison 2: equal generated tokens per step"
    if equal:
        title += f" (grpo_chain_tokens: {equal['chains']} chains)"
    print(comparison_table(title, results["equal_tokens_comparison"]) + "\n")
    print(diagnostics_table(runs) + "\n")
    print(f"results: {out}")
    if runs:
        path = args.plot or os.path.join(root, world, "ablation.png")
        plot(runs, path, world)
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
