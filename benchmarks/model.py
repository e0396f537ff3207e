"""Model benchmark: training throughput against transformers (PyTorch) and log-prob memory.

1. Forward+backward tokens/s of our model versus transformers' PyTorch implementation (eager, CPU),
   same Qwen3-shaped random weights (ours is loaded from the transformers checkpoint), same batch,
   same loss (mean next-token cross-entropy over the full logits), measured in one run and printed
   as a ratio, over a sweep of sizes (tiny to hidden 256 x 4 layers x 8 x 256 tokens). Our
   training path (``token_log_probs``, chunked) is timed as well.
2. Compile-time temporary memory (``jit(...).lower(...).compile().memory_analysis()``) of the
   gradient of ``log_probs_from_hidden`` (chunked) versus a naive ``log_softmax`` over full logits,
   across vocabulary sizes and lengths up to Qwen3's 152k x 8k. Nothing is allocated: shapes only.
3. ``--gpu`` (only with a GPU): bf16 training-step MFU of a Qwen3-0.6B-shaped random model
   (float32 master weights, bfloat16 compute, cuDNN attention, AdamW).

Run: ``python benchmarks/model.py`` (or one config: ``--hidden 256 --layers 4 --seq 256 --batch 8
--vocab 8192``)
and on a GPU machine ``python benchmarks/model.py --gpu [--gpu-batch 8 --gpu-seq 4096 --remat]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_seconds  # noqa: E402

from atpo_jax import models  # noqa: E402
from atpo_jax.train import flops  # noqa: E402


def qwen3_hf_config(
    *, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, head_dim: int, ffn: int
):
    """A transformers Qwen3Config (imported lazily: only the comparison needs transformers)."""
    import transformers

    return transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
    )


# ---------------------------------------------------------------------------------------------
# 1. CPU throughput versus transformers.


def _next_token_batch(vocab: int, batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return ids[:, :-1], ids[:, 1:]


def torch_step(torch_model, ids: np.ndarray, targets: np.ndarray):
    """A forward+backward step of transformers' model (eager) with cross-entropy, as a closure."""
    import torch

    ids_t = torch.tensor(ids, dtype=torch.long)
    targets_t = torch.tensor(targets, dtype=torch.long)
    torch_model.train()

    def step():
        torch_model.zero_grad(set_to_none=True)
        logits = torch_model(ids_t).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), targets_t.reshape(-1)
        )
        loss.backward()
        return None

    return step


def jax_step(model: models.CausalLM, ids, targets, chunked: bool):
    """A jitted forward+backward step (gradients w.r.t. all parameters), as a closure."""
    graphdef, params = nnx.split(model)
    ids, targets = jnp.asarray(ids), jnp.asarray(targets)

    def loss_fn(params):
        m = nnx.merge(graphdef, params)
        if chunked:
            return -jnp.mean(models.token_log_probs(m, ids, targets, chunk=1024))
        logp = jax.nn.log_softmax(m(ids).astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    grad_step = jax.jit(jax.value_and_grad(loss_fn))
    return lambda: grad_step(params)


def blocked_seconds(
    steps: dict[str, object], repeats: int, rounds: int = 2, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each closure, timed in blocks: ``rounds`` passes over the
    closures, each timing ``repeats`` consecutive calls of one closure after a pause.

    Blocks rather than call-by-call interleaving: PyTorch's OpenMP workers and XLA's thread pool
    both spin for a while after their last task, so alternating single calls makes each framework
    run against the other's spinning threads. Several rounds still spread any change in machine
    load over all implementations.
    """
    for step in steps.values():
        for _ in range(warmup):
            jax.block_until_ready(step())
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            time.sleep(0.5)  # let the other framework's worker threads go idle
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(step())
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


# (name, hidden, layers, vocab, batch, seq): from test-sized, where per-op overhead dominates, to
# the size where both implementations are bound by the CPU's matmul throughput.
SWEEP = [
    ("tiny", 64, 2, 512, 4, 64),
    ("small", 128, 2, 1024, 8, 128),
    ("medium", 256, 4, 8192, 8, 256),
]


def compare_one(hidden: int, layers: int, vocab: int, batch: int, seq: int, repeats: int):
    """(max |logit diff|, {impl: seconds per step}) for one Qwen3-shaped config."""
    import torch
    import transformers

    heads = max(1, hidden // 64)
    hf_config = qwen3_hf_config(
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=max(1, heads // 2),
        head_dim=64,
        ffn=3 * hidden,
    )
    torch.manual_seed(0)
    torch_model = transformers.Qwen3ForCausalLM(hf_config)  # default (sdpa) attention, eager mode
    with tempfile.TemporaryDirectory() as tmp:
        torch_model.save_pretrained(tmp)
        model = models.from_pretrained(tmp)
    ids, targets = _next_token_batch(vocab, batch, seq)

    # Same function first: the comparison is only meaningful if both compute the same logits.
    with torch.no_grad():
        want = torch_model.eval()(torch.tensor(ids[:1], dtype=torch.long)).logits.numpy()
    got = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray(ids[:1])))
    seconds = blocked_seconds(
        {
            "torch": torch_step(torch_model, ids, targets),
            "full": jax_step(model, ids, targets, chunked=False),
            "chunked": jax_step(model, ids, targets, chunked=True),
        },
        repeats,
    )
    return float(np.abs(got - want).max()), seconds


def cpu_comparison(args: argparse.Namespace) -> None:
    import torch

    sweep = SWEEP
    if args.hidden is not None:
        sweep = [("custom", args.hidden, args.layers, args.vocab, args.batch, args.seq)]
    print(
        f"\nForward+backward tokens/s, Qwen3-shaped models (head_dim 64, kv heads = heads / 2,"
        f" ffn 3x hidden, untied), mean next-token cross-entropy; {jax.default_backend()}"
        f" ({os.cpu_count()} cores), torch {torch.__version__} eager with"
        f" {torch.get_num_threads()} threads; median of 2 rounds x {args.repeats} steps."
    )
    print(
        "  full = our model + log_softmax over full logits; chunked = token_log_probs (the"
        " training path)"
    )
    print(
        f"  {'config':<34} {'torch tok/s':>11} {'full tok/s':>11} {'chunked tok/s':>13}"
        f" {'full/torch':>10} {'chunked/torch':>13} {'|dlogit|':>9}"
    )
    for name, hidden, layers, vocab, batch, seq in sweep:
        diff, sec = compare_one(hidden, layers, vocab, batch, seq, args.repeats)
        tokens = batch * seq
        label = f"{name}: h{hidden} L{layers} V{vocab} {batch}x{seq}"
        print(
            f"  {label:<34} {tokens / sec['torch']:>11.0f} {tokens / sec['full']:>11.0f}"
            f" {tokens / sec['chunked']:>13.0f} {sec['torch'] / sec['full']:>9.2f}x"
            f" {sec['torch'] / sec['chunked']:>12.2f}x {diff:>9.1e}"
        )


# ---------------------------------------------------------------------------------------------
# 2. token_log_probs memory.


def _temp_bytes(fn, batch: int, length: int, width: int, vocab: int) -> int:
    args = (
        jax.ShapeDtypeStruct((batch, length, width), jnp.bfloat16),
        jax.ShapeDtypeStruct((width, vocab), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
    )
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_table(chunk: int, width: int) -> None:
    def chunked(h, w, t):
        return models.log_probs_from_hidden(h, w, t, chunk=chunk).sum()

    def naive(h, w, t):
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, t[..., None], axis=-1).sum()

    print(
        f"\ntoken_log_probs head, gradient w.r.t. hidden and lm_head (bf16 inputs, hidden {width},"
        f" batch 1): compile-time temp memory, {jax.default_backend()}"
    )
    print(
        f"  {'vocab':>7} {'length':>7} {'f32 logits MB':>14} {'naive MB':>10}"
        f" {f'chunked({chunk}) MB':>18}"
    )
    for vocab in (32_000, 151_936):
        for length in (1024, 8192):
            naive_mb = _temp_bytes(naive, 1, length, width, vocab) / 2**20
            chunk_mb = _temp_bytes(chunked, 1, length, width, vocab) / 2**20
            logits_mb = length * vocab * 4 / 2**20
            print(
                f"  {vocab:>7} {length:>7} {logits_mb:>14.0f} {naive_mb:>10.0f} {chunk_mb:>18.0f}"
            )


# ---------------------------------------------------------------------------------------------
# 3. GPU training-step MFU.


def qwen3_0p6b_config(**runtime) -> models.ModelConfig:
    """Qwen3-0.6B's architecture (its published config.json), random weights."""
    return models.ModelConfig(
        model_type="qwen3",
        vocab_size=151_936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        qkv_bias=False,
        o_bias=False,
        qk_norm=True,
        max_position_embeddings=40960,
        **runtime,
    )


def train_step_mfu(
    config: models.ModelConfig,
    batch: int,
    seq: int,
    repeats: int,
    peak_flops: float | None,
    params=None,
) -> dict[str, float]:
    """Times a full AdamW training step (loss = -mean token log-prob) and returns MFU figures
    (``seconds`` per step, ``compile_s`` of the step program, ``tokens_per_s``, ``tflops`` and,
    with a known peak, ``mfu``). ``params``: the model's weights (default: random, initialised
    on the device)."""
    import optax

    if params is None:
        graphdef, params = nnx.split(nnx.jit(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))())
    else:
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0))))
    tx = optax.adamw(1e-5)
    opt_state = jax.jit(tx.init)(params)
    ids, targets = (jnp.asarray(a) for a in _next_token_batch(config.vocab_size, batch, seq))

    def loss_fn(params):
        m = nnx.merge(graphdef, params)
        return -jnp.mean(models.token_log_probs(m, ids, targets, chunk=4096))

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Compiled ahead, so compile time is reported apart from the step time.
    start = time.perf_counter()
    step = step.lower(params, opt_state).compile()
    compile_s = time.perf_counter() - start
    state = {"params": params, "opt": opt_state}

    def run():
        state["params"], state["opt"], loss = step(state["params"], state["opt"])
        return loss

    seconds = median_seconds(run, repeats=repeats, warmup=2)
    # Useful work only (the PaLM convention, train/flops.py): 3 x forward matmul and causal
    # attention FLOPs; remat recomputation is not counted.
    step_flops = 3 * batch * flops.forward_flops_for_sequence(config, seq)
    out = {
        "compile_s": compile_s,
        "seconds": seconds,
        "tokens_per_s": batch * seq / seconds,
        "tflops": step_flops / seconds / 1e12,
    }
    if peak_flops:
        out["mfu"] = flops.mfu(step_flops, seconds, peak_flops)
    return out


def gpu_mfu(args: argparse.Namespace) -> None:
    if jax.default_backend() != "gpu":
        print(f"\n--gpu: no GPU (JAX backend is {jax.default_backend()}); skipped.")
        return
    device = jax.devices()[0]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else flops.peak_flops_per_device(device)
    config = qwen3_0p6b_config(
        dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=args.remat, attention_impl="cudnn"
    )
    start = time.perf_counter()
    result = train_step_mfu(config, args.gpu_batch, args.gpu_seq, args.repeats, peak)
    print(
        f"\nQwen3-0.6B-shaped training step on {device.device_kind}: batch {args.gpu_batch} x seq"
        f" {args.gpu_seq}, bf16 compute, f32 params + AdamW, cuDNN attention, remat={args.remat}"
        f" (total incl. compile {time.perf_counter() - start:.0f}s)"
    )
    print(
        f"  {result['seconds'] * 1e3:.1f} ms/step, {result['tokens_per_s']:.0f} tokens/s,"
        f" {result['tflops']:.1f} TFLOP/s"
        + (f", MFU {100 * result['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=None, help="one custom config, not the sweep")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=512, help="token_log_probs chunk (memory)")
    parser.add_argument("--skip-cpu", action="store_true", help="skip the torch comparison")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU MFU benchmark")
    parser.add_argument("--gpu-batch", type=int, default=8)
    parser.add_argument("--gpu-seq", type=int, default=4096)
    parser.add_argument("--remat", action="store_true", help="per-layer remat in the MFU run")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override device peak")
    args = parser.parse_args()

    if not args.skip_cpu:
        cpu_comparison(args)
    if not args.skip_memory:
        memory_table(args.chunk, width=1024)
    if args.gpu:
        gpu_mfu(args)


if __name__ == "__main__":
    main()
