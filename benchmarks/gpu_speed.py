"""The GPU check pack's speed and end-to-end sections.

Every speed figure is a ratio measured in the same run (contenders timed in turn within each
repeat, ``timing.interleaved_median_seconds``) or a fraction of the device's physical limit (peak
dense bf16 FLOP/s and HBM bandwidth from ``atpo_jax/train/flops.py``; on a device whose limits are
unknown only the raw figures and ratios are reported). Compile time is reported apart: the first
call of a fresh program minus its warm median (or an explicit ``lower().compile()``).

Alternatives: each CPU-driven choice is timed against its natural alternative, so the report says
whether it holds on this platform:
- KV cache keys stored transposed, [kv_heads, head_dim, len] (ours), vs [kv_heads, len, head_dim],
  and ``jax.nn.dot_product_attention`` (XLA; and cuDNN on a GPU) on a decode step;
- our grouped XLA causal attention vs ``jax.nn.dot_product_attention`` (XLA; cuDNN on a GPU),
  forward + backward at training length;
- the 2-D ``Linear`` matmul (``[B*T, in] @ [in, out]``) vs a batched einsum, forward + backward;
- the AT²PO loss (pure-JAX run mean off CPU) vs explicit turn ids, PPO and a bandwidth floor.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import decode_throughput  # noqa: E402
from gpu_correctness import (  # noqa: E402
    TOL_BF16,
    TOL_BF16_GRAD,
    cast_floats,
    load_benchmark,
    max_rel_error,
    norm_rel_error,
    reference_params,
)
from model import qwen3_0p6b_config, train_step_mfu  # noqa: E402
from timing import interleaved_median_seconds  # noqa: E402

from atpo_jax import kernels, models  # noqa: E402
from atpo_jax.models.attention import causal_attention, masked_attention  # noqa: E402
from atpo_jax.models.layers import matmul  # noqa: E402
from atpo_jax.train import flops  # noqa: E402

make_loss_inputs = load_benchmark("kernels").make_loss_inputs  # not `import kernels`: see there

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Limits:
    """The device's physical limits the fractions are taken of (None: unknown, not reported)."""

    peak_flops: float | None
    bandwidth: float | None


@dataclasses.dataclass(frozen=True)
class SpeedSizes:
    """Shapes of the speed sections (Qwen3-0.6B-shaped on the full run, tiny on ``--quick``)."""

    qwen3_0p6b: bool  # the model has Qwen3-0.6B's shape (else a tiny Qwen3)
    repeats: int
    decode_batches: tuple[int, ...]
    decode_prompt: int
    decode_new_tokens: int
    decode_kv_bucket: int
    train_remat: tuple[bool, ...]  # the remat settings timed
    train_batch: int
    train_seq: int
    attention_batch: int  # decode-step attention: rows, cached length, layers
    attention_kv_len: int
    attention_layers: int
    train_attention_batch: int  # training attention at train_seq tokens
    linear_tokens: int
    loss_rows: int
    loss_length: int
    e2e_tree: tuple[int, int, int, int]  # initial chains, expansion rounds, branches, leaves
    e2e_prompts: int
    e2e_response_len: int
    e2e_micro_batch_tokens: int
    e2e_steps: int


FULL = SpeedSizes(
    qwen3_0p6b=True, repeats=3, decode_batches=(64, 256), decode_prompt=512, train_remat=(False, True),
    decode_new_tokens=256, decode_kv_bucket=256, train_batch=4, train_seq=4096,
    attention_batch=64, attention_kv_len=1024, attention_layers=28, train_attention_batch=4,
    linear_tokens=16384, loss_rows=1408, loss_length=6192, e2e_tree=(10, 2, 6, 22),
    e2e_prompts=2, e2e_response_len=256,
    e2e_micro_batch_tokens=16384, e2e_steps=2,
)  # fmt: skip
QUICK = SpeedSizes(
    qwen3_0p6b=False, repeats=1, decode_batches=(4,), train_remat=(False,), decode_prompt=16,
    decode_new_tokens=24,
    decode_kv_bucket=32, train_batch=2, train_seq=64, attention_batch=4, attention_kv_len=64,
    attention_layers=2, train_attention_batch=2, linear_tokens=128, loss_rows=16, loss_length=256,
    e2e_tree=(2, 1, 2, 4), e2e_prompts=1, e2e_response_len=32, e2e_micro_batch_tokens=1024, e2e_steps=1,
)  # fmt: skip


def speed_model(sizes: SpeedSizes, **runtime) -> models.ModelConfig:
    """Qwen3-0.6B's shape (vocabulary 151,936) or, on ``--quick``, a tiny Qwen3."""
    if sizes.qwen3_0p6b:
        return qwen3_0p6b_config(**runtime)
    return models.ModelConfig(
        model_type="qwen3",
        vocab_size=1024,  # >= the synthetic world's tokenizer (the end-to-end step needs it)
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        qk_norm=True,
        tie_word_embeddings=True,
        **runtime,
    )


def random_params(config: models.ModelConfig):
    """Random weights of ``config`` on the default device: drawn on the host for a small model
    (no initialiser program to compile: ``--quick``'s budget), by the model's initialiser in one
    jitted program for a large one (drawing 600M numbers on the host takes seconds)."""
    if flops.param_count(config) <= 50_000_000:
        return jax.device_put(cast_floats(reference_params(config), config.param_dtype))
    return nnx.state(nnx.jit(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))())


def _fraction(value: float | None, limit: float | None) -> float | None:
    return None if not limit or value is None else value / limit


# ---------------------------------------------------------------------------------- decode


def measure_decode(section, sizes: SpeedSizes, limits: Limits) -> None:
    """Engine decode tokens/s and the fraction of the HBM bound, bf16 weights and KV cache."""
    config = speed_model(sizes, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = random_params(config)
    for batch in sizes.decode_batches:
        name = f"decode, batch {batch}"
        with section.guard(name):
            r = decode_throughput(
                config,
                batch=batch,
                prompt_len=sizes.decode_prompt,
                new_tokens=sizes.decode_new_tokens,
                repeats=max(sizes.repeats, 3),  # a difference of two timings: take medians
                kv_bucket=sizes.decode_kv_bucket,
                bandwidth=limits.bandwidth,
                params=params,
            )
            section.measure(
                name,
                r["tokens_per_s"],
                "tokens/s",
                step_ms=r["step_s"] * 1e3,
                hbm_fraction=r.get("hbm_fraction"),
                gb_per_step=r["bytes_per_step"] / 1e9,
                compile_s=r["compile_s"],
                prompt=sizes.decode_prompt,
                new_tokens=sizes.decode_new_tokens,
            )


# ---------------------------------------------------------------------------------- train step


def measure_train_step(section, sizes: SpeedSizes, limits: Limits, attention_impl: str) -> None:
    """Train-step MFU (forward + backward + AdamW, float32 masters, bf16 compute) with per-layer
    remat off and on (``--quick``: off only; its end-to-end step runs remat), at ``train_batch``
    rows of ``train_seq`` tokens."""
    seconds = {}
    params = random_params(speed_model(sizes, param_dtype=jnp.float32))  # both variants' weights
    for remat in (False, True):
        name = f"train step, remat {'on' if remat else 'off'}"
        if remat not in sizes.train_remat:
            section.measure(name, None, "tokens/s", not_run="--quick: one remat setting")
            continue
        with section.guard(name):
            config = speed_model(
                sizes,
                dtype=jnp.bfloat16,
                param_dtype=jnp.float32,
                remat=remat,
                attention_impl=attention_impl,
            )
            r = train_step_mfu(
                config,
                sizes.train_batch,
                sizes.train_seq,
                sizes.repeats,
                limits.peak_flops,
                params=params,
            )
            seconds[remat] = r["seconds"]
            section.measure(
                name,
                r["tokens_per_s"],
                "tokens/s",
                step_ms=r["seconds"] * 1e3,
                tflops=r["tflops"],
                mfu=r.get("mfu"),
                compile_s=r["compile_s"],
                batch=sizes.train_batch,
                seq=sizes.train_seq,
                attention_impl=attention_impl,
            )
    if len(seconds) == 2:
        section.measure("remat on / remat off, step time", seconds[True] / seconds[False], "x")


# ---------------------------------------------------------------------------------- alternatives


def _first_call(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def compare(
    section,
    title: str,
    ours: tuple[str, Callable[[], object]],
    others: dict[str, Callable[[], object]],
    *,
    repeats: int,
    error: Callable[[object, object], float],
    tolerance: float,
    work: Callable[[float], dict[str, float | None]],
    timing_only: tuple[str, ...] = (),
) -> None:
    """Times ``ours`` against ``others`` in the same run and records each as ms, its ratio to
    ours, its compile time and ``work(seconds)`` (throughput figures); checks that every
    contender computes what ours computes (``error`` <= ``tolerance``), except the
    ``timing_only`` references, which compute something else. An alternative that does not run
    here (say, a cuDNN shape it does not support) is recorded with its error and left out; ours
    failing fails the comparison."""
    name, fn = ours
    first, want = _first_call(fn)
    contenders, firsts = {name: fn}, {name: first}
    for other, other_fn in others.items():
        try:
            firsts[other], got = _first_call(other_fn)
        except Exception as e:  # noqa: BLE001 - an alternative that cannot run is a finding
            section.measure(
                f"{title}: {other}", None, "ms", unsupported=f"{type(e).__name__}: {e}"[:500]
            )
            continue
        contenders[other] = other_fn
        if other in timing_only:
            continue
        section.check(
            f"{title}: {other} computes what {name} computes",
            error=error(got, want),
            tolerance=tolerance,
            metric="max|d|/max|ref| (outputs) or |d|/|ref| (gradients)",
        )
    times = interleaved_median_seconds(list(contenders.values()), repeats=repeats, warmup=1)
    base = times[0]
    for contender, seconds in zip(contenders, times, strict=True):
        section.measure(
            f"{title}: {contender}",
            seconds * 1e3,
            "ms",
            vs_ours=seconds / base,
            compile_s=max(0.0, firsts[contender] - seconds),
            **work(seconds),
        )
    # The verdict is among the alternatives to our choice, not the timing-only references.
    best = min((t, c) for t, c in zip(times, contenders, strict=True) if c not in timing_only)
    if best[1] == name:
        section.note(f"{title}: ours ({name}) is fastest here")
    else:
        section.note(
            f"{title}: {best[1]} is {base / best[0]:.2f}x faster than ours ({name}) here: "
            "the CPU-driven choice does not hold on this platform"
        )


def _flops_work(work_flops: float, limits: Limits):
    """A ``compare`` work function: TFLOP/s and the fraction of the peak for ``work_flops``."""
    return lambda sec: {
        "tflops": work_flops / sec / 1e12,
        "mfu": _fraction(work_flops / sec, limits.peak_flops),
    }


def _rng_bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def compare_decode_attention(section, sizes: SpeedSizes, limits: Limits, gpu: bool) -> None:
    """One decode step's attention over ``attention_layers`` layers of a bf16 KV cache."""
    config = speed_model(sizes)
    b, s, layers = sizes.attention_batch, sizes.attention_kv_len, sizes.attention_layers
    n, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    rng = np.random.default_rng(0)
    q = _rng_bf16(rng, (b, 1, n, d))
    keys = [_rng_bf16(rng, (b, k, s, d)) for _ in range(layers)]  # [S, D] per head
    values = [_rng_bf16(rng, (b, k, s, d)) for _ in range(layers)]
    lengths = jnp.asarray(rng.integers(s // 2, s + 1, b), jnp.int32)
    mask = (jnp.arange(s)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    keys_t = [x.swapaxes(-1, -2) for x in keys]  # ours: [kv_heads, head_dim, len]
    keys_bskd = [x.transpose(0, 2, 1, 3) for x in keys]  # jax.nn's [B, S, K, D]
    values_bskd = [x.transpose(0, 2, 1, 3) for x in values]

    def summed(attend):
        # Every layer's output is used (nothing is dead code); one call reads the whole cache.
        # Arrays are arguments, never closed over (XLA would embed them as constants).
        step = jax.jit(lambda q, kv, mask, lengths: sum(
            attend(i, q, *kv, mask, lengths) for i in range(layers)))  # fmt: skip
        return lambda kv: step(q, kv, mask, lengths)

    ours = summed(lambda i, q, kt, v, mask, _: masked_attention(q, kt[i], v[i], mask))
    # Keys stored [len, head_dim]: the same kernel, the transposition left to XLA's layout pass.
    plain = summed(
        lambda i, q, kk, v, mask, _: masked_attention(q, kk[i].swapaxes(-1, -2), v[i], mask)
    )

    def dpa(implementation):
        return summed(
            lambda i, q, kk, v, _, lengths: jax.nn.dot_product_attention(
                q, kk[i], v[i], key_value_seq_lengths=lengths, implementation=implementation
            )
        )

    others = {
        "keys [len, head_dim]": lambda: plain((keys, values)),
        "jax.nn.dot_product_attention xla": lambda: dpa("xla")((keys_bskd, values_bskd)),
    }
    if gpu:
        others["jax.nn.dot_product_attention cudnn"] = lambda: dpa("cudnn")(
            (keys_bskd, values_bskd)
        )
    else:
        section.not_applicable(
            "decode attention: jax.nn.dot_product_attention cudnn", "cuDNN needs a CUDA GPU"
        )
    moved = 2 * layers * b * k * s * d * 2  # every layer's bf16 keys and values, read once
    compare(
        section,
        f"decode attention ({layers} layers, batch {b}, {s} cached)",
        ("keys [head_dim, len] (ours)", lambda: ours((keys_t, values))),
        others,
        repeats=sizes.repeats * 2,
        error=max_rel_error,
        tolerance=TOL_BF16,
        work=lambda sec: {"hbm_fraction": _fraction(moved / sec, limits.bandwidth)},
    )


def compare_training_attention(section, sizes: SpeedSizes, limits: Limits, gpu: bool) -> None:
    """Causal self-attention forward + backward (padded rows) at ``train_seq`` tokens, bf16."""
    config = speed_model(sizes)
    b, t = sizes.train_attention_batch, sizes.train_seq
    n, k, d = config.num_heads, config.num_kv_heads, config.head_dim
    rng = np.random.default_rng(1)
    q, cot = _rng_bf16(rng, (b, t, n, d)), _rng_bf16(rng, (b, t, n, d))
    kk, v = _rng_bf16(rng, (b, t, k, d)), _rng_bf16(rng, (b, t, k, d))
    lengths = jnp.asarray([t - i * t // (4 * b) for i in range(b)], jnp.int32)
    real = (jnp.arange(t)[None, :] < lengths[:, None])[:, :, None, None]

    def fwd_bwd(attend):
        def loss(q, kk, v, lengths, real, cot):
            out = attend(q, kk, v, lengths).astype(jnp.float32)
            return jnp.sum(jnp.where(real, out * cot, 0.0))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return lambda: grad(q, kk, v, lengths, real, cot)

    def dpa(implementation):
        return lambda q, kk, v, lengths: jax.nn.dot_product_attention(
            q, kk, v, is_causal=True, key_value_seq_lengths=lengths, implementation=implementation
        )

    others = {"jax.nn.dot_product_attention xla": fwd_bwd(dpa("xla"))}
    if gpu:
        others["causal_attention impl=cudnn"] = fwd_bwd(
            lambda q, kk, v, lengths: causal_attention(q, kk, v, lengths, impl="cudnn")
        )
    else:
        section.not_applicable(
            "training attention: causal_attention impl=cudnn", "cuDNN needs a CUDA GPU"
        )
    # Causal attention FLOPs, forward x 3 for forward + backward (the MFU convention).
    work_flops = 3 * 4 * b * n * d * t * (t + 1) / 2
    compare(
        section,
        f"training attention fwd+bwd (batch {b} x {t} tokens)",
        ("grouped XLA kernel (ours)",
         fwd_bwd(lambda q, kk, v, lengths: causal_attention(q, kk, v, lengths, impl="xla"))),
        others,
        repeats=sizes.repeats,
        error=norm_rel_error,
        tolerance=TOL_BF16_GRAD,
        work=_flops_work(work_flops, limits),
    )  # fmt: skip


def compare_linear(section, sizes: SpeedSizes, limits: Limits) -> None:
    """The MLP's matmuls (4 x up then down projection) forward + backward, bf16: our 2-D matmul
    vs a batched einsum over [B, T, in]."""
    config = speed_model(sizes)
    h, f, tokens = config.hidden_size, config.intermediate_size, sizes.linear_tokens
    rng = np.random.default_rng(2)
    x = _rng_bf16(rng, (4, tokens // 4, h))
    weights = [(_rng_bf16(rng, (h, f)) * h**-0.5, _rng_bf16(rng, (f, h)) * f**-0.5)
               for _ in range(4)]  # fmt: skip

    def fwd_bwd(mm):
        def loss(x, weights):
            for up, down in weights:
                x = mm(mm(x, up), down)
            return jnp.sum(x.astype(jnp.float32))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return lambda: grad(x, weights)

    work_flops = 3 * 2 * tokens * h * f * 2 * len(weights)
    compare(
        section,
        f"MLP matmuls fwd+bwd ({tokens} tokens, {h} -> {f})",
        ("2-D matmul (ours)", fwd_bwd(matmul)),
        {"batched einsum": fwd_bwd(lambda a, w: jnp.einsum("btd,df->btf", a, w))},
        repeats=sizes.repeats,
        error=norm_rel_error,
        tolerance=TOL_BF16_GRAD,
        work=_flops_work(work_flops, limits),
    )  # fmt: skip


def compare_loss(section, sizes: SpeedSizes, limits: Limits) -> None:
    """``atpo_policy_loss`` forward + backward (the turn mean from the mask: pure JAX off CPU)
    vs explicit turn ids (segment sums), PPO, and a one-pass bandwidth floor."""
    rows, length = sizes.loss_rows, sizes.loss_length
    new, old, adv, mask = (jnp.asarray(x) for x in make_loss_inputs(rows, length))
    turn_ids = kernels.turn_ids_from_mask(mask)

    def fwd_bwd(loss):
        grad = jax.jit(jax.value_and_grad(lambda *a: loss(*a)[0]))
        return lambda: grad(new, old, adv, mask, turn_ids)

    floor = jax.jit(lambda *a: (jnp.sum(a[0]), a[0] + a[1] + a[2] + a[3]))
    moved = 5 * rows * length * 4  # the floor reads 4 float32 arrays and writes 1
    compare(
        section,
        f"AT2PO loss fwd+bwd ({rows} x {length} tokens)",
        ("atpo_policy_loss, turns from the mask (ours)",
         fwd_bwd(lambda lp, o, a, m, _: kernels.atpo_policy_loss(lp, o, a, m))),
        {
            "atpo_policy_loss, explicit turn_ids":
                fwd_bwd(lambda lp, o, a, m, t: kernels.atpo_policy_loss(lp, o, a, m, turn_ids=t)),
            "ppo_policy_loss": fwd_bwd(lambda lp, o, a, m, _: kernels.ppo_policy_loss(lp, o, a, m)),
            "bandwidth floor (read 4 arrays, write 1)": lambda: floor(new, old, adv, mask),
        },
        repeats=sizes.repeats * 2,
        error=norm_rel_error,  # float32 value and gradient: the same objective either way
        tolerance=1e-5,
        timing_only=("ppo_policy_loss", "bandwidth floor (read 4 arrays, write 1)"),
        work=lambda sec: {"floor_hbm_fraction": _fraction(moved / sec, limits.bandwidth)},
    )  # fmt: skip


# ---------------------------------------------------------------------------------- end to end


def _search_qa_config(variant: str):
    """``configs/search_qa.py:<variant>`` as a ConfigDict (the file the launcher reads)."""
    path = os.path.join(ROOT, "configs", "search_qa.py")
    spec = importlib.util.spec_from_file_location("search_qa_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def run_end_to_end(section, sizes: SpeedSizes, report, attention_impl: str) -> None:
    """Full RL steps (tree rollout -> reward -> credit -> update) through ``build_run`` and
    ``Trainer.train_step``: a random Qwen3-0.6B-shaped policy (a checkpoint written here, float32
    masters, bf16 compute, remat), the synthetic world's questions and BM25 corpus, the paper's
    tree (10 chains + 2 x 6 branches = 22 leaves per prompt; ``--quick``: 2 + 1 x 2 = 4) with
    reduced lengths. Step 1 includes compilation; step 2 (when the budget allows) is warm."""
    missing = [m for m in ("ml_collections", "bm25s") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"the end-to-end step needs the project's dependencies {missing} (configs, the BM25 "
            f"retriever): pip install {' '.join(missing)} (or pip install -e .)"
        )
    from atpo_jax.builder import build_run
    from atpo_jax.config import run_settings
    from atpo_jax.train.trainer import Trainer

    config = speed_model(sizes, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    chains, rounds, branches, leaves = sizes.e2e_tree
    with tempfile.TemporaryDirectory(prefix="gpu_check_e2e_") as tmp:
        start = time.perf_counter()
        structure = nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))
        policy = nnx.merge(nnx.graphdef(structure), random_params(config))
        models.save_pretrained(policy, os.path.join(tmp, "policy"), dtype=jnp.bfloat16)
        del policy
        section.measure("random policy checkpoint written", time.perf_counter() - start, "s")
        cfg = _search_qa_config("tiny")
        cfg.update_from_flattened_dict(
            {
                "model.path": os.path.join(tmp, "policy"),
                "model.dtype": "bfloat16",
                "model.param_dtype": "float32",
                "model.remat": True,
                "model.attention_impl": attention_impl,
                "sft.steps": 0,
                "eval.every": 0,
                "rollout.initial_rollouts": chains,
                "rollout.expansion_iterations": rounds,
                "rollout.beam_size": branches,
                "rollout.samples_per_tree": leaves,
                "rollout.max_response_len": sizes.e2e_response_len,
                # One attended-length bucket: every bucket is one more decode program to compile
                # (the tiny variant's prompts fit in its max_prompt_len of 64).
                "rollout.kv_bucket": 16 * -(-(64 + sizes.e2e_response_len) // 16),
                "rollout.num_slots": (2 + chains + rounds * branches) * sizes.e2e_prompts,
                "rollout.trace_every": 0,
                "train.prompts_per_step": sizes.e2e_prompts,
                "train.mini_batch_prompts": sizes.e2e_prompts,
                "train.micro_batch_tokens": sizes.e2e_micro_batch_tokens,
                "train.steps": sizes.e2e_steps,
                "logging.tensorboard": False,
                "logging.plot": False,
                **(
                    {}
                    if sizes.qwen3_0p6b
                    else {  # a smaller world: quicker to build and tokenize on --quick
                        "data.synthetic.num_countries": 3,
                        "data.synthetic.num_people": 24,
                        "data.synthetic.num_companies": 12,
                    }
                ),
            }
        )
        settings = run_settings(cfg)
        start = time.perf_counter()
        trainer = Trainer(build_run(settings, os.path.join(tmp, "run")))
        state = trainer.initial_state()
        jax.block_until_ready(state.params)
        section.measure("build_run + initial state", time.perf_counter() - start, "s")
        walls = []
        for step in range(1, sizes.e2e_steps + 1):
            if step > 1 and report.over_budget():
                section.measure(f"RL step {step}", None, "s", not_run="time budget exceeded")
                break
            start = time.perf_counter()
            state, metrics = trainer.train_step(state, step)
            jax.block_until_ready(state.params)
            walls.append(time.perf_counter() - start)
            phases = {k: round(v, 3) for k, v in metrics.items() if k.startswith("time/")}
            section.measure(
                f"RL step {step} wall time" + (" (includes compilation)" if step == 1 else ""),
                walls[-1],
                "s",
                **phases,
                generated_tokens=metrics.get("rollout/generated_tokens"),
                train_real_tokens=metrics.get("train/real_tokens"),
                train_computed_tokens=metrics.get("train/computed_tokens"),
                nodes_per_tree=metrics.get("rollout/nodes_per_tree"),
                generated_tokens_per_s=metrics.get("throughput/generated_tokens_per_s"),
                train_tokens_per_s=metrics.get("throughput/train_tokens_per_s"),
                update_mfu=metrics.get("throughput/mfu"),
            )
            bad = sorted(
                k
                for k, v in metrics.items()
                if ("loss" in k or k.startswith("reward/")) and not math.isfinite(v)
            )
            section.check(
                f"RL step {step}: loss and reward metrics are finite",
                error=len(bad),
                tolerance=0,
                metric="count of non-finite loss/reward metrics",
                nonfinite=bad,
            )
        if len(walls) == 2:
            section.measure("step 1 - step 2 (compilation, roughly)", walls[0] - walls[1], "s")
