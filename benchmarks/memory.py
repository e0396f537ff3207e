"""Per-device memory of the sharded RL train step for a Qwen3-4B-shaped policy (DESIGN.md §8).

The train step is ``policy.make_update_fn(..., mesh=mesh)``: one mini-batch of the paper's size
(8 prompts x 22 leaves = 176 rows of 2000 prompt + 6192 response tokens), accumulated over
micro-batches of ``--rows-per-device`` rows per device (2 x 8192 = 16384 tokens per device, the
paper's per-GPU token budget), AdamW, float32 master weights and optimizer state with bfloat16
compute (the ``qwen3_4b`` recipe's mixed precision), per-layer remat. It is
compiled for a simulated mesh of 8 CPU devices from abstract shapes only
(``jax.ShapeDtypeStruct`` with shardings; the model comes from ``nnx.eval_shape``), and XLA's
``memory_analysis()`` of the compiled, partitioned program gives the bytes per device:
arguments (parameter, optimizer-state and batch shards), outputs, temporaries, and their total
(arguments + outputs - donated aliases + temporaries).

All 36 layers are compiled (about a minute per mesh on 2 CPU cores). ``--fit-layers 2 4``
compiles shallower models instead and extrapolates every figure linearly to ``--layers``: with
the layers unrolled and rematerialised each figure is ``a + b * layers`` (per-layer parameters,
optimizer state, gradients and saved layer inputs; the recomputed working set of one layer does
not depend on the depth). On fsdp=8 the 2/4-layer extrapolation gives the 36-layer figures to
0.01 GB.

Attention: compiled here with the XLA kernel, whose [rows, kv_heads, group*T, T] float32 scores
dominate the temporaries at 8192 tokens; on GPU the cuDNN flash kernel (``attention_impl=cudnn``)
never materialises them. ``--gpu`` compiles (and runs) on the local GPU(s) instead, with cuDNN
attention, and then also times the step: tokens/s and MFU (needs a GPU; none was available when
this was written).

Run: ``python benchmarks/memory.py`` (about 5 minutes on 2 cores), options ``--meshes 1,8,1
2,4,1 1,4,2``, ``--rows-per-device 2``, ``--layers 36``, ``--fit-layers 2 4``; on a GPU machine
``python benchmarks/memory.py --gpu [--model 0.6b|4b|tiny]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--gpu" not in sys.argv:
    # Before JAX starts: 8 simulated CPU devices.
    os.environ["JAX_PLATFORMS"] = "cpu"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    # XLA:CPU expands optimization barriers before scheduling, which undoes remat (the forward
    # activations stay live, exactly as without remat); keeping them gives the schedule that
    # GPU/TPU compile. Only the memory analysis runs here, never the program.
    flags += ["--xla_disable_hlo_passes=cse_barrier_expander"]
    os.environ["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from atpo_jax import models  # noqa: E402
from atpo_jax import parallel as sharding  # noqa: E402
from atpo_jax.train import flops, policy  # noqa: E402
from atpo_jax.train import optimizer as opt  # noqa: E402
from atpo_jax.train.packed_update import PackedUpdate  # noqa: E402
from atpo_jax.train.packing import PackedBatch  # noqa: E402

GB = 1e9
HBM_GB = 80.0
PROMPT, RESPONSE = 2000, 6192  # ALGORITHM.md §5: 2000 prompt + 6192 response tokens
MINI_BATCH_ROWS = 8 * 22  # 8 prompts x 22 leaves per update


def model_config(name: str, layers: int | None = None, attention_impl: str = "xla"):
    """Qwen3-4B / Qwen3-0.6B / tiny shapes: float32 masters, bf16 compute, per-layer remat."""
    shapes = {
        "4b": dict(
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=9728,
            num_layers=36,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
        ),
        "0.6b": dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_layers=28,
            num_heads=16,
            num_kv_heads=8,
            head_dim=128,
        ),
        "tiny": dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=384,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
        ),
    }[name]
    if layers is not None:
        shapes["num_layers"] = layers
    return models.ModelConfig(
        model_type="qwen3",
        qk_norm=True,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        remat=True,
        attention_impl=attention_impl,
        **shapes,
    )


def abstract_rows(rows: int, prompt: int, response: int, mesh) -> policy.PolicyRows:
    batch = sharding.batch_sharding(mesh)

    def leaf(width: int, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((rows, width), dtype, sharding=batch)

    return policy.PolicyRows(
        input_ids=leaf(prompt + response, jnp.int32),
        attention_mask=leaf(prompt + response, jnp.int32),
        response=leaf(response, jnp.int32),
        loss_mask=leaf(response, jnp.int32),
        advantages=leaf(response, jnp.float32),
        old_log_probs=leaf(response, jnp.float32),
        ref_log_probs=leaf(response, jnp.float32),
    )


def with_shardings(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def compile_step(config, mesh, *, mini_rows: int, micro_rows: int, prompt: int, response: int):
    """The compiled update program on ``mesh`` (abstract arguments only); returns it and seconds."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0))))
    params = with_shardings(params, sharding.param_shardings(mesh, params))
    tx = opt.build_optimizer(opt.OptimizerSettings(learning_rate=1e-6))
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = with_shardings(opt_state, sharding.param_shardings(mesh, opt_state))
    rows = abstract_rows(mini_rows, prompt, response, mesh)
    update = policy.make_update_fn(graphdef, tx, policy.LossSettings(), micro_rows, mesh=mesh)
    start = time.perf_counter()
    compiled = update.lower(params, opt_state, rows).compile()
    return compiled, time.perf_counter() - start


def abstract_packed(sequences: int, tokens: int, rows: int, response: int, mesh):
    """A ``train.packing`` micro-batch: one sequence of ``tokens`` per batch device and the
    mini-batch's ``rows`` (what ``packing.pack_mini_batch`` gives every micro-batch)."""
    batch = sharding.batch_sharding(mesh)

    def leaf(shape, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=batch)

    seq, row = (sequences, tokens), (rows, response)
    return PackedBatch(
        tokens=leaf(seq, jnp.int32),
        positions=leaf(seq, jnp.int32),
        visible_end=leaf(seq, jnp.int32),
        predictor=leaf(seq, jnp.int32),
        row_index=leaf(row, jnp.int32),
        loss_mask=leaf(row, jnp.int32),
        advantages=leaf(row, jnp.float32),
        old_log_probs=leaf(row, jnp.float32),
        ref_log_probs=leaf(row, jnp.float32),
    )


def compile_packed_step(config, mesh, *, tokens: int, mini_rows: int, response: int):
    """The packed update's two programs on ``mesh`` (gradient accumulation of one micro-batch,
    then the optimizer step); returns their memory figures per device and the seconds taken.

    The accumulation program's arguments are the parameters, the gradient accumulator and the
    micro-batch; the optimizer state stays resident meanwhile, so it is added to that program's
    total (and to its arguments) to give the step's peak."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0))))
    params = with_shardings(params, sharding.param_shardings(mesh, params))
    tx = opt.build_optimizer(opt.OptimizerSettings(learning_rate=1e-6))
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = with_shardings(opt_state, sharding.param_shardings(mesh, opt_state))
    ways = sharding.batch_parallelism(mesh)
    batch = abstract_packed(ways, tokens, mini_rows, response, mesh)
    totals = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding.replicated(mesh))
    update = PackedUpdate(graphdef, tx, policy.LossSettings(), mesh=mesh)
    start = time.perf_counter()
    accumulate = memory_figures(update._accumulate.lower(params, params, batch, totals).compile())
    apply = memory_figures(update._apply.lower(params, opt_state, params).compile())
    state_gb = (
        sum(
            np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(opt_state)
        )
        / GB
    )
    accumulate["arguments"] += state_gb
    accumulate["total"] += state_gb
    peak = accumulate if accumulate["total"] >= apply["total"] else apply
    return peak, time.perf_counter() - start


def memory_figures(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {
        "arguments": m.argument_size_in_bytes / GB,
        "outputs": m.output_size_in_bytes / GB,
        "aliased": m.alias_size_in_bytes / GB,
        "temp": m.temp_size_in_bytes / GB,
        "total": total / GB,
    }


def extrapolate(points: dict[int, dict[str, float]], layers: int) -> dict[str, float]:
    """Each figure as a + b * layers through the measured layer counts (least squares)."""
    counts = sorted(points)
    if len(counts) == 1:
        return points[counts[0]]
    out = {}
    for key in points[counts[0]]:
        b, a = np.polyfit(counts, [points[c][key] for c in counts], 1)
        out[key] = float(a + b * layers)
    return out


def mesh_label(sizes: tuple[int, int, int]) -> str:
    return ",".join(f"{n}={s}" for n, s in zip(sharding.MESH_AXES, sizes, strict=True) if s > 1)


def cpu_table(args: argparse.Namespace) -> None:
    print(
        f"Qwen3-4B-shaped policy (float32 masters, bf16 compute, remat, tied embeddings), "
        f"{jax.device_count()} simulated "
        f"devices; mini-batch {args.mini_rows} rows x {args.prompt}+{args.response} tokens, "
        f"{args.rows_per_device} rows x {args.prompt + args.response} tokens per device per "
        "micro-batch; AdamW; XLA attention."
    )
    if args.fit_layers != [args.layers]:
        print(
            f"Compiled with {', '.join(map(str, args.fit_layers))} layers and extrapolated "
            f"linearly to {args.layers} (see the module docstring)."
        )
    header = f"| mesh | micro rows | arguments GB | outputs GB | temp GB | total GB | fits {HBM_GB:.0f} GB |"
    print()
    print(header)
    print("|---|---|---|---|---|---|---|")
    for sizes in args.meshes:
        mesh = sharding.make_mesh(sharding.MeshSettings(*sizes))
        ways = sharding.batch_parallelism(mesh)
        micro_rows = args.rows_per_device * ways
        points = {}
        for layers in args.fit_layers:
            if args.packing == "padded":
                compiled, seconds = compile_step(
                    model_config("4b", layers),
                    mesh,
                    mini_rows=args.mini_rows,
                    micro_rows=micro_rows,
                    prompt=args.prompt,
                    response=args.response,
                )
                points[layers] = memory_figures(compiled)
            else:
                points[layers], seconds = compile_packed_step(
                    model_config("4b", layers),
                    mesh,
                    tokens=args.tokens_per_device,
                    mini_rows=args.mini_rows,
                    response=args.response,
                )
            print(
                f"    [{mesh_label(sizes)}: {layers} layers compiled in {seconds:.0f}s, total "
                f"{points[layers]['total']:.2f} GB/device]",
                file=sys.stderr,
                flush=True,
            )
        f = extrapolate(points, args.layers)
        fits = "yes" if f["total"] <= HBM_GB else "NO"
        micro = (
            micro_rows if args.packing == "padded" else f"{ways} x {args.tokens_per_device} tokens"
        )
        print(
            f"| {mesh_label(sizes)} | {micro} | {f['arguments']:.2f} | {f['outputs']:.2f} | "
            f"{f['temp']:.2f} | {f['total']:.2f} | {fits} |",
            flush=True,
        )


def gpu_run(args: argparse.Namespace) -> None:
    """On the local GPU(s): memory of the compiled step, then tokens/s and MFU of real steps."""
    devices = jax.devices()
    if devices[0].platform != "gpu":
        raise SystemExit("--gpu needs a GPU (jax.devices() has none)")
    config = model_config(args.model, attention_impl="cudnn")
    mesh = sharding.make_mesh(sharding.MeshSettings(1, -1, 1))
    ways = sharding.batch_parallelism(mesh)
    micro_rows = args.rows_per_device * ways
    mini_rows = micro_rows * args.micro_batches
    compiled, seconds = compile_step(
        config, mesh, mini_rows=mini_rows, micro_rows=micro_rows, prompt=args.prompt,
        response=args.response,
    )  # fmt: skip
    f = memory_figures(compiled)
    print(f"{args.model} on {len(devices)} x {devices[0].device_kind}, compiled in {seconds:.0f}s")
    print(
        f"per device: arguments {f['arguments']:.2f} GB, temp {f['temp']:.2f} GB, total {f['total']:.2f} GB"
    )

    model = models.CausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    params = sharding.shard_params(params, mesh)
    tx = opt.build_optimizer(opt.OptimizerSettings(learning_rate=1e-6))
    o_shard = sharding.param_shardings(mesh, jax.eval_shape(tx.init, params))
    opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    rng = np.random.default_rng(0)
    length = args.prompt + args.response
    rows = policy.PolicyRows(
        input_ids=rng.integers(0, config.vocab_size, (mini_rows, length)).astype(np.int32),
        attention_mask=np.ones((mini_rows, length), np.int32),
        response=rng.integers(0, config.vocab_size, (mini_rows, args.response)).astype(np.int32),
        loss_mask=np.ones((mini_rows, args.response), np.int32),
        advantages=rng.normal(size=(mini_rows, args.response)).astype(np.float32),
        old_log_probs=np.full((mini_rows, args.response), -5.0, np.float32),
        ref_log_probs=np.zeros((mini_rows, args.response), np.float32),
    )
    rows = sharding.shard_batch(rows, mesh)
    update = policy.make_update_fn(graphdef, tx, policy.LossSettings(), micro_rows, mesh=mesh)
    params, opt_state, metrics = update(params, opt_state, rows)  # compile + warm up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        params, opt_state, metrics = update(params, opt_state, rows)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    tokens = mini_rows * length
    # Forward + backward (3x) + the remat recomputation of the forward (1x).
    used = flops.forward_flops_per_token(config, length) * tokens * 4
    peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops_per_device()
    mfu = flops.mfu(used / len(devices), seconds, peak)
    print(
        f"train step: {tokens / seconds:,.0f} tokens/s ({tokens / seconds / len(devices):,.0f} "
        f"per device), MFU {mfu if mfu is None else f'{100 * mfu:.1f}%'} "
        f"(median of {args.repeats}, {seconds:.3f}s per step, loss {float(metrics['loss']):.4f})"
    )


def parse_mesh(text: str) -> tuple[int, int, int]:
    sizes = tuple(int(x) for x in text.split(","))
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"mesh {text!r}: want data,fsdp,tensor")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--meshes", type=parse_mesh, nargs="+", default=[(1, 8, 1), (2, 4, 1), (1, 4, 2)],
        help="data,fsdp,tensor sizes (8 devices)",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, default=36, help="depth the table reports")
    parser.add_argument(
        "--fit-layers", type=int, nargs="+", default=None,
        help="compile these depths and extrapolate (default: compile --layers itself)",
    )  # fmt: skip
    parser.add_argument("--rows-per-device", type=int, default=2)
    parser.add_argument(
        "--packing", choices=("padded", "tree"), default="padded",
        help="tree: the packed update (tree attention) on --tokens-per-device per micro-batch",
    )  # fmt: skip
    parser.add_argument("--tokens-per-device", type=int, default=16384)
    parser.add_argument("--mini-rows", type=int, default=MINI_BATCH_ROWS)
    parser.add_argument("--prompt", type=int, default=PROMPT)
    parser.add_argument("--response", type=int, default=RESPONSE)
    parser.add_argument("--gpu", action="store_true", help="compile and time on the local GPU(s)")
    parser.add_argument("--model", choices=("tiny", "0.6b", "4b"), default="0.6b")
    parser.add_argument("--micro-batches", type=int, default=2, help="--gpu: per mini-batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override device peak")
    args = parser.parse_args()
    args.fit_layers = args.fit_layers or [args.layers]
    if args.gpu:
        gpu_run(args)
    else:
        cpu_table(args)


if __name__ == "__main__":
    main()
