"""GPU check pack: proves and measures the accelerator path in one run of at most 8 minutes on an H200.

Sections, in order (each writes its entries to the report as it goes):

  environment      JAX/jaxlib/flax/optax/CUDA versions, devices, the limits used for fractions
  model_logits     Qwen3/Llama/Qwen2 logits on the device (float32 at default and highest matmul
                   precision, bf16 compute) vs float32 on the CPU
  cudnn_attention  attention_impl=cudnn vs xla, forward and gradients, kernel and whole model
  engine_greedy    Engine greedy decode (prefill, generate, fork, extend) == full-forward argmax
  kernels          every AT²PO kernel jitted on the device vs the CPU
  alternatives     CPU-driven choices vs their natural alternatives, timed in the same run: KV
                   keys transposed vs not, our attention vs jax.nn.dot_product_attention
                   (XLA/cuDNN), the 2-D Linear vs an einsum, the AT²PO loss vs PPO and a floor
  decode           Qwen3-0.6B-shaped decode tokens/s at batch 64 and 256, fraction of HBM bandwidth
  train_step       Qwen3-0.6B-shaped train-step MFU at 4 x 4096 tokens, remat off and on
  end_to_end       one (two, budget allowing) full RL steps of a Qwen3-0.6B-shaped policy with the
                   paper's tree shape and reduced lengths, with the trainer's phase breakdown

Correctness checks compare with a float32 CPU reference (``jax.devices("cpu")``) under stated
tolerances. On a CPU-only machine the device is the CPU itself: every check still runs (the report
names the platform) except those that need a GPU (cuDNN), which are recorded as not applicable
with the reason. ``--quick`` runs the same code paths with tiny shapes on the CPU (its test keeps
this script from rotting). No new section starts after ``--budget-s`` seconds; those not started
are recorded with the reason. The exit status is 0 when no check failed and nothing crashed.

Run: ``python benchmarks/gpu_check.py --out DIR [--quick] [--budget-s S] [--only a,b]``; writes
``DIR/gpu_report.json`` and ``DIR/gpu_report.md`` after every entry.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SECTIONS = (
    ("model_logits", "model logits vs float32 CPU (Qwen3, Llama, Qwen2)"),
    ("cudnn_attention", "attention_impl=cudnn vs xla, forward and gradients"),
    ("engine_greedy", "engine greedy decode == full-forward argmax"),
    ("kernels", "AT2PO kernels jitted on the device vs the CPU"),
    ("alternatives", "CPU-driven choices vs their alternatives, same run"),
    ("decode", "decode tokens/s and fraction of HBM bandwidth"),
    ("train_step", "train-step MFU, remat off and on"),
    ("end_to_end", "full RL step: tree rollout -> credit -> update"),
)
# The project's run-time dependencies (setup.cfg): the environment section says which are absent.
REQUIRED = ("jax", "flax", "optax", "orbax.checkpoint", "transformers", "chex", "absl",
            "ml_collections", "numpy", "bm25s", "faiss", "fastapi", "uvicorn", "httpx", "pyarrow",
            "tokenizers", "jinja2", "safetensors", "tensorboardX", "matplotlib", "tqdm")  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="directory for gpu_report.json and .md")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (a dry run)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new section after this many seconds (default 420; --quick: 300)",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated sections to run (default all): {', '.join(n for n, _ in SECTIONS)}",
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="override peak bf16 TFLOP/s"
    )
    parser.add_argument("--hbm-tbps", type=float, default=None, help="override HBM TB/s")
    args = parser.parse_args(argv)
    names = [n for n, _ in SECTIONS]
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(names)}")
    if args.budget_s is None:
        args.budget_s = 300.0 if args.quick else 420.0
    return args


def environment(jax) -> dict:
    """Versions, devices and backend facts of this run."""
    import jaxlib

    device = jax.devices()[0]
    env = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "devices": [str(d) for d in jax.devices()],
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    for package in ("flax", "optax", "numpy", "orbax-checkpoint", "transformers"):
        try:
            env[package.split("-")[0]] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package.split("-")[0]] = None
    env["missing_packages"] = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    try:
        from jax.extend import backend

        env["platform_version"] = backend.get_backend().platform_version
    except Exception as e:  # noqa: BLE001 - older/newer JAX: recorded, not fatal
        env["platform_version"] = f"unavailable ({type(e).__name__}: {e})"
    env["cuda"] = cuda_versions()
    try:
        env["environment_info"] = jax.print_environment_info(return_string=True)
    except Exception as e:  # noqa: BLE001
        env["environment_info"] = f"unavailable ({type(e).__name__}: {e})"
    try:
        commit = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        env["git_commit"] = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def cuda_versions() -> dict | str:
    """CUDA runtime/driver/cuDNN/... versions as jaxlib's CUDA plugin reports them (its
    ``*_get_version`` functions; a private module, so read defensively)."""
    try:
        from jax._src.lib import cuda_versions as versions
    except ImportError as e:
        return f"unavailable ({e})"
    if versions is None:
        return "no CUDA plugin loaded"
    out = {}
    for name in sorted(dir(versions)):
        if name.endswith("_get_version"):
            try:
                out[name.removesuffix("_get_version")] = getattr(versions, name)()
            except Exception as e:  # noqa: BLE001 - one unreadable version is no reason to stop
                out[name.removesuffix("_get_version")] = f"unavailable ({type(e).__name__})"
    return out


def limits_of(device, args, flops) -> tuple[dict, object]:
    """The peak FLOP/s and HBM bandwidth fractions are taken of, and where they come from."""
    from gpu_speed import Limits

    peak = flops.peak_flops_per_device(device)
    bandwidth = flops.peak_bandwidth_per_device(device)
    source = "vendor datasheet (atpo_jax/train/flops.py)"
    if args.peak_tflops or args.hbm_tbps:
        source = "command line"
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak
        bandwidth = args.hbm_tbps * 1e12 if args.hbm_tbps else bandwidth
    if peak is None and bandwidth is None:
        description = (
            f"no peak FLOP/s or bandwidth known for {device.platform} device kind "
            f"{device.device_kind!r}: raw figures and same-run ratios only"
        )
    else:
        description = (
            f"{device.device_kind}: dense bf16 peak "
            f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}, HBM "
            f"{'unknown' if bandwidth is None else f'{bandwidth / 1e12:.2f} TB/s'} ({source})"
        )
    record = {"peak_flops": peak, "hbm_bytes_per_s": bandwidth, "description": description}
    return record, Limits(peak_flops=peak, bandwidth=bandwidth)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick:
        # Before JAX starts: the dry run is a CPU run unless the caller chose a platform, and
        # its many small programs compile with LLVM's optimisations off (about 2.5x faster to
        # compile on XLA:CPU; a dry run's speed figures mean nothing anyway).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import jax
    from gpu_report import Report

    report = Report(
        args.out,
        budget_s=args.budget_s,
        header={"command": " ".join(["benchmarks/gpu_check.py", *sys.argv[1:]]),
                "quick": args.quick},
    )  # fmt: skip
    report.log(f"GPU check pack{' (--quick)' if args.quick else ''}: report in {args.out}")
    env = environment(jax)
    report.set("environment", env)
    report.log(
        f"platform {env['platform']} ({env['device_kind']} x {env['device_count']}), jax "
        f"{env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}; "
        f"missing packages: {env['missing_packages'] or 'none'}"
    )
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError as e:
        report.log(f"no CPU device for the float32 reference ({e}); run with JAX_PLATFORMS unset")
        report.set("fatal", f"no CPU device: {e}; unset JAX_PLATFORMS or add cpu to it")
        report.finish()
        return 1

    import gpu_correctness as correctness
    import gpu_speed as speed

    from atpo_jax.train import flops

    device = jax.devices()[0]
    gpu = device.platform == "gpu"
    limit_record, limits = limits_of(device, args, flops)
    report.set("limits", limit_record)
    report.log(f"limits: {limit_record['description']}")
    csizes = correctness.QUICK if args.quick else correctness.FULL
    ssizes = speed.QUICK if args.quick else speed.FULL
    report.set("sizes", {"correctness": vars(csizes), "speed": vars(ssizes)})
    impl = "cudnn" if gpu else "xla"

    def alternatives(section):
        comparisons = {
            "decode attention": lambda: speed.compare_decode_attention(
                section, ssizes, limits, gpu
            ),
            "training attention": lambda: speed.compare_training_attention(
                section, ssizes, limits, gpu
            ),
            "MLP matmuls": lambda: speed.compare_linear(section, ssizes, limits),
            "AT2PO loss": lambda: speed.compare_loss(section, ssizes, limits),
        }
        for name, comparison in comparisons.items():
            with section.guard(name):  # one that crashes does not stop the others
                comparison()

    runners = {
        "model_logits": lambda s: correctness.check_model_logits(s, csizes, cpu, device),
        "cudnn_attention": lambda s: correctness.check_cudnn_attention(s, csizes, cpu, device),
        "engine_greedy": lambda s: correctness.check_engine_greedy(s, csizes, cpu, device),
        "kernels": lambda s: correctness.check_kernels(s, csizes, cpu, device),
        "alternatives": alternatives,
        "decode": lambda s: speed.measure_decode(s, ssizes, limits),
        "train_step": lambda s: speed.measure_train_step(s, ssizes, limits, impl),
        "end_to_end": lambda s: speed.run_end_to_end(s, ssizes, report, impl),
    }
    for name, title in SECTIONS:
        if args.only and name not in args.only:
            report.skip(name, title, "not selected by --only")
        elif report.over_budget():
            report.skip(
                name,
                title,
                f"time budget: {report.elapsed():.0f} s elapsed > --budget-s {args.budget_s:g}",
            )
        else:
            with report.section(name, title) as section:
                runners[name](section)
    summary = report.finish()
    report.log(f"done in {report.elapsed():.0f} s: {summary}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
