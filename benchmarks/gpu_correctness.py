"""The GPU check pack's correctness checks: the accelerator's results against a float32 CPU reference.

Every check computes the same thing twice: on the device under test (``jax.devices()[0]``) in the
precision under test, and on ``jax.devices("cpu")[0]`` in float32 with the same weights and inputs.
On a CPU-only machine the device *is* the CPU, so the float32 checks compare a program with itself
(error 0) while the bfloat16 ones still measure bf16 against f32; the report names the platform.

Error metrics (stated in every entry):
- ``max|d|/max|ref|``: the largest absolute difference over the compared elements, divided by the
  reference's largest magnitude (one number per output, scale-free);
- ``|d|/|ref|``: the global L2 norm of the difference over the L2 norm of the reference, for
  gradients (summed over every parameter);
- ``mismatches``: the fraction of integer outputs that differ (tolerance 0).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, loaded from its path under ``atpo_benchmarks_<name>``.

    Why not ``import kernels``: a bare name looks in ``sys.modules`` first, and an installed package
    of the same name wins there once anything imported it (Hugging Face's ``kernels``, which
    transformers imports where it is installed, took ``kernels`` in CI's clean install).
    """
    module_name = f"atpo_benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_kernel_benchmark = load_benchmark("kernels")
make_loss_inputs, make_trees = _kernel_benchmark.make_loss_inputs, _kernel_benchmark.make_trees

from atpo_jax import kernels, models  # noqa: E402
from atpo_jax.models.attention import causal_attention  # noqa: E402
from atpo_jax.rollout.engine import Engine  # noqa: E402
from atpo_jax.rollout.sampling import SamplingParams  # noqa: E402

FAMILIES = ("qwen3", "llama", "qwen2")

# Tolerances on max|d|/max|ref|. XLA's default matmul precision on NVIDIA GPUs may round float32
# operands to TF32 (10-bit mantissa), hence a float32 tolerance far above float32's epsilon, and a
# separate check at precision "highest" with a tight one.
TOL_F32_DEFAULT = 5e-3
TOL_F32_HIGHEST = 1e-4
TOL_BF16 = 5e-2
TOL_BF16_GRAD = 5e-2  # |d|/|ref| of all parameter gradients, bf16 compute vs f32
TOL_KERNEL = 1e-4  # the AT²PO kernels compute in float32 everywhere


@dataclasses.dataclass(frozen=True)
class CorrectnessSizes:
    """Shapes of the small models and inputs the checks use (tiny on ``--quick``)."""

    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    seq: int
    engine_prompts: int
    engine_new_tokens: int
    loss_rows: int
    loss_length: int
    trees: int
    nodes: int
    # The dtype/precision variants run (``--quick`` runs fewer: they take the same code paths,
    # and every compiled program costs about a second on a CPU).
    logit_variants: tuple[str, ...]
    engine_variants: tuple[str, ...]


FULL = CorrectnessSizes(
    vocab=4096, hidden=256, ffn=704, layers=4, heads=8, kv_heads=2, head_dim=64, batch=4, seq=256,
    engine_prompts=8, engine_new_tokens=48, loss_rows=256, loss_length=2048, trees=64, nodes=64,
    logit_variants=("float32", "float32, precision=highest", "bfloat16 compute, float32 weights"),
    engine_variants=("float32", "bfloat16 weights and compute"),
)  # fmt: skip
QUICK = CorrectnessSizes(
    vocab=256, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, head_dim=16, batch=2, seq=24,
    engine_prompts=4, engine_new_tokens=10, loss_rows=12, loss_length=96, trees=4, nodes=16,
    logit_variants=("float32", "bfloat16 compute, float32 weights"), engine_variants=("float32",),
)  # fmt: skip
QUICK_REASON = "--quick: same code path as the variants run, only the dtype/precision differs"


# ---------------------------------------------------------------------------------- error metrics


def max_rel_error(got, want, where=None) -> float:
    """max|got - want| / max|want| over the elements where ``where`` is true (all by default);
    NaN/Inf in ``got`` gives NaN (a failed check)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if where is not None:
        got, want = got[where], want[where]
    if got.size == 0:
        return 0.0
    if not np.all(np.isfinite(got)):
        return float("nan")
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def norm_rel_error(got, want) -> float:
    """||got - want|| / ||want|| over every leaf of two pytrees of the same structure."""
    diff = sq = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if not np.all(np.isfinite(g)):
            return float("nan")
        diff += float(np.sum((g - w) ** 2))
        sq += float(np.sum(w**2))
    return float(np.sqrt(diff) / max(np.sqrt(sq), 1e-30))


def tree_error(got, want) -> tuple[float | None, float | None]:
    """(float error, integer mismatches) between two output pytrees: the worst
    ``max|d|/max|ref|`` over the float leaves' finite reference entries (non-finite entries,
    e.g. the -inf of non-candidate nodes, must match exactly, else NaN), and the fraction of
    integer/bool entries that differ; None where the outputs have no leaf of that kind."""
    floats = ints = None
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g), np.asarray(w)
        if not np.issubdtype(w.dtype, np.floating):
            ints = max(ints or 0.0, float(np.mean(g != w)) if w.size else 0.0)
            continue
        finite = np.isfinite(w)
        same_rest = np.array_equal(finite, np.isfinite(g)) and np.array_equal(
            g[~finite], w[~finite]
        )
        error = max_rel_error(g, w, finite) if same_rest else float("nan")
        floats = error if floats is None or not error <= floats else floats
    return floats, ints


# ---------------------------------------------------------------------------------- models


def tiny_config(sizes: CorrectnessSizes, family: str, **runtime) -> models.ModelConfig:
    """A small model of ``family``: Qwen3 (q/k norms, tied embeddings), Llama, Qwen2 (q/k/v
    biases)."""
    return models.ModelConfig(
        model_type=family,
        vocab_size=sizes.vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.ffn,
        num_layers=sizes.layers,
        num_heads=sizes.heads,
        num_kv_heads=sizes.kv_heads,
        head_dim=sizes.head_dim,
        qk_norm=family == "qwen3",
        qkv_bias=family == "qwen2",
        tie_word_embeddings=family == "qwen3",
        **runtime,
    )


@functools.cache
def reference_params(config: models.ModelConfig, seed: int = 0):
    """Random float32 parameters of ``config``'s architecture, as host (NumPy) arrays.

    Drawn directly rather than by the model's initialiser (which compiles a program per shape):
    weights ~ N(0, 0.02) as transformers initialises them, and norm scales 1 + N(0, 0.1) and
    biases N(0, 0.1) instead of ones and zeros, so the checks exercise them too.
    """
    abstract = nnx.state(
        structure_model(config.replace(dtype=jnp.float32, param_dtype=jnp.float32))
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if "scale" in name:
            return 1.0 + 0.1 * noise
        return (0.1 if "bias" in name else 0.02) * noise

    return jax.tree_util.tree_map_with_path(draw, abstract)


def structure_model(config: models.ModelConfig) -> models.CausalLM:
    """An abstract model of ``config`` (shapes only, nothing allocated or compiled)."""
    return nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))


@functools.cache
def structure(config: models.ModelConfig):
    """The graph definition of ``config`` (its runtime options included), without weights."""
    return nnx.graphdef(structure_model(config))


def cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def token_batch(sizes: CorrectnessSizes, seed: int = 0):
    """[B, T] ids with a 0/1 mask: row 0 full, the others left-padded by different amounts."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, sizes.vocab, (sizes.batch, sizes.seq)).astype(np.int32)
    mask = np.ones((sizes.batch, sizes.seq), np.int32)
    for b in range(1, sizes.batch):
        mask[b, : b * sizes.seq // (2 * sizes.batch)] = 0
    return ids, mask


@functools.cache
def _logits_fn(graphdef):
    return jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))


def check_model_logits(section, sizes: CorrectnessSizes, cpu, device) -> None:
    """Logits of Qwen3/Llama/Qwen2 on the device (float32 at the default and at the highest
    matmul precision, bfloat16 compute on float32 weights) vs float32 on the CPU."""
    ids, mask = token_batch(sizes)
    real = mask.astype(bool)
    variants = (
        ("float32", jnp.float32, None, TOL_F32_DEFAULT),
        ("float32, precision=highest", jnp.float32, "highest", TOL_F32_HIGHEST),
        ("bfloat16 compute, float32 weights", jnp.bfloat16, None, TOL_BF16),
    )
    for family in FAMILIES:
        config = tiny_config(sizes, family)
        params = reference_params(config)
        on_cpu = jax.device_put((params, ids, mask), cpu)
        want = _logits_fn(structure(config))(*on_cpu)
        on_device = jax.device_put((params, ids, mask), device)
        for label, dtype, precision, tol in variants:
            name = f"{family} logits, {label}"
            if label not in sizes.logit_variants:
                section.not_run(name, QUICK_REASON)
                continue
            with section.guard(name):
                forward = _logits_fn(structure(config.replace(dtype=dtype)))
                if precision:
                    with jax.default_matmul_precision(precision):
                        got = forward(*on_device)
                else:
                    got = forward(*on_device)
                section.check(
                    name,
                    error=max_rel_error(got, want, real),
                    tolerance=tol,
                    metric="max|d|/max|ref| over real tokens",
                )


# ---------------------------------------------------------------------------------- cuDNN attention


def _attention_inputs(sizes: CorrectnessSizes, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape_q = (sizes.batch, sizes.seq, sizes.heads, sizes.head_dim)
    shape_kv = (sizes.batch, sizes.seq, sizes.kv_heads, sizes.head_dim)
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in (shape_q, shape_kv, shape_kv))
    lengths = np.array(
        [sizes.seq - b * sizes.seq // (2 * sizes.batch) for b in range(sizes.batch)], np.int32
    )
    cotangent = rng.standard_normal(shape_q).astype(np.float32)
    return q, k, v, lengths, cotangent


def _attention_value_and_grads(impl: str):
    def loss(q, k, v, lengths, cotangent):
        out = causal_attention(q, k, v, lengths, impl=impl)
        # Queries past a row's length are meaningless (any value): masked out of the loss by
        # selection, so even a NaN there could not leak into the gradients.
        real = jnp.arange(q.shape[1])[None, :, None, None] < lengths[:, None, None, None]
        return jnp.sum(jnp.where(real, out.astype(jnp.float32) * cotangent, 0.0)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _check_bf16(section, names, outputs, grads, what) -> None:
    """The forward check (``outputs`` = (got, want, where)) and the gradient check (``grads`` =
    (got, want)) of one bf16 implementation against the f32 CPU reference."""
    section.check(
        names[0],
        error=max_rel_error(*outputs),
        tolerance=TOL_BF16,
        metric=f"max|d|/max|ref| over {what[0]} vs f32 CPU",
    )
    section.check(
        names[1],
        error=norm_rel_error(*grads),
        tolerance=TOL_BF16_GRAD,
        metric=f"|d|/|ref| of {what[1]} vs f32 CPU",
    )


def check_cudnn_attention(section, sizes: CorrectnessSizes, cpu, device) -> None:
    """``attention_impl=cudnn`` vs ``xla``, forward and gradients, both in bfloat16 on the device,
    each against the float32 XLA kernel on the CPU: at the kernel (``causal_attention`` with padded
    rows) and through a whole Qwen3 model (logits, and the gradient of the mean token log-prob with
    respect to every parameter)."""
    impls = ("xla", "cudnn")
    gpu = device.platform == "gpu"
    reason = (
        f"cuDNN flash attention needs a CUDA GPU; this run's device is {device.platform} "
        "(model.attention_impl=cudnn is refused there)"
    )
    # Kernel level.
    q, k, v, lengths, cot = _attention_inputs(sizes)
    real = np.arange(sizes.seq)[None, :] < lengths[:, None]
    (_, want_out), want_grads = _attention_value_and_grads("xla")(
        *jax.device_put((q, k, v, lengths, cot), cpu)
    )
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    for impl in impls:
        names = (
            f"causal_attention impl={impl} bf16 forward",
            f"causal_attention impl={impl} bf16 grads",
        )
        if impl == "cudnn" and not gpu:
            for name in names:
                section.not_applicable(name, reason)
            continue
        with section.guard(names[0]):
            args = jax.device_put((*bf16, lengths, cot), device)
            (_, out), grads = _attention_value_and_grads(impl)(*args)
            _check_bf16(section, names, (out, want_out, real), (grads, want_grads),
                        ("real queries", "dq, dk, dv"))  # fmt: skip
    # Model level.
    config = tiny_config(sizes, "qwen3")
    params = reference_params(config)
    ids, mask = token_batch(sizes)
    targets = np.roll(ids, -1, axis=1)

    def loss_fn(graphdef):
        def loss(state, ids, targets, mask):
            # token_log_probs's computation, with the logits of the same forward pass kept.
            model = nnx.merge(graphdef, state)
            hidden = model.hidden_states(ids, mask)
            logp = models.log_probs_from_hidden(hidden, model.lm_head_weight(), targets, mask)
            return -jnp.sum(logp) / jnp.sum(mask), model.logits(hidden)

        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (_, want_logits), want_grads = loss_fn(structure(config))(
        *jax.device_put((params, ids, targets, mask), cpu)
    )
    for impl in impls:
        names = (f"qwen3 model attention_impl={impl} bf16 logits",
                 f"qwen3 model attention_impl={impl} bf16 param grads")  # fmt: skip
        if impl == "cudnn" and not gpu:
            for name in names:
                section.not_applicable(name, reason)
            continue
        with section.guard(names[0]):
            graphdef = structure(config.replace(dtype=jnp.bfloat16, attention_impl=impl))
            (_, logits), grads = loss_fn(graphdef)(
                *jax.device_put((params, ids, targets, mask), device)
            )
            _check_bf16(section, names, (logits, want_logits, mask.astype(bool)),
                        (grads, want_grads), ("real tokens", "all parameter gradients"))  # fmt: skip


# ---------------------------------------------------------------------------------- engine


def _engine_rollout(engine: Engine, params, sizes: CorrectnessSizes):
    """Greedy generation through every public path of the engine: a batched prefill of prompts
    of different lengths, generation, forks mid-generation, tool-result extends and more
    generation. Returns per slot its token sequence and which positions the engine generated."""
    rng = np.random.default_rng(1)
    n = sizes.engine_new_tokens
    prompts = [
        rng.integers(0, sizes.vocab - 1, 3 + 4 * i).tolist() for i in range(sizes.engine_prompts)
    ]
    slots = engine.allocate(len(prompts))
    engine.prefill_many(params, slots, prompts)
    generated = {s: [False] * len(p) for s, p in zip(slots, prompts, strict=True)}
    key = jax.random.key(0)

    def generate(group, budget):
        for s, g in zip(group, engine.generate(params, group, [budget] * len(group), key),
                        strict=True):  # fmt: skip
            generated[s] += [True] * len(g.tokens)

    generate(slots, n)
    # Branches forked inside the first generation, then a tool result on a branch and a chain.
    half = len(slots) // 2
    branches = engine.allocate(half)
    lengths = [len(prompts[i]) + 1 + i for i in range(half)]
    engine.fork_many(slots[:half], branches, lengths)
    for b, src, length in zip(branches, slots[:half], lengths, strict=True):
        generated[b] = generated[src][:length]
    # As many rows as the first calls, so the same compiled programs serve them.
    extended = branches + slots[half:]
    results = [rng.integers(0, sizes.vocab - 1, 5 + 2 * i).tolist() for i in range(len(extended))]
    engine.extend_many(params, extended, results)
    for s, r in zip(extended, results, strict=True):
        generated[s] += [False] * len(r)
    generate(extended, n // 2)
    sequences = {s: engine.tokens(s) for s in generated}
    engine.release(list(generated))
    return sequences, generated


def check_engine_greedy(section, sizes: CorrectnessSizes, cpu, device) -> None:
    """Engine greedy decode on the device == argmax of a full forward pass on the CPU (float32, the
    weights the engine holds), at every generated position of every slot.

    Error = max over generated tokens of (max logit - logit of the engine's token) / max|logit|:
    0 when every token is the reference's argmax; a near tie (two logits closer than the
    device's rounding) may pick the other token, which the tolerance allows.
    """
    base = tiny_config(sizes, "qwen3")
    for label, dtype, tol in (("float32", jnp.float32, TOL_F32_DEFAULT),
                              ("bfloat16 weights and compute", jnp.bfloat16, TOL_BF16)):  # fmt: skip
        name = f"engine greedy == full-forward argmax, {label}"
        if label not in sizes.engine_variants:
            section.not_run(name, QUICK_REASON)
            continue
        with section.guard(name):
            config = base.replace(dtype=dtype, param_dtype=dtype)
            weights = cast_floats(reference_params(base), dtype)  # what the engine holds
            # One attended-length bucket (a multiple of the 16-position page) for every call.
            max_len = 16 * -(-(4 * sizes.engine_prompts + 2 * sizes.engine_new_tokens + 32) // 16)
            engine = Engine(
                structure_model(config),
                num_slots=2 * sizes.engine_prompts,
                max_len=max_len,
                eos_token_ids=[sizes.vocab - 1],
                sampling=SamplingParams(temperature=0.0, vocab_limit=sizes.vocab - 1),
                decode_chunk=8,
                kv_bucket=max_len,
            )
            sequences, generated = _engine_rollout(engine, jax.device_put(weights, device), sizes)
            # The reference: float32 compute of the same weights, all sequences in one batch.
            width = max(len(s) for s in sequences.values())
            ids = np.zeros((len(sequences), width), np.int32)
            mask = np.zeros_like(ids)
            for row, seq in enumerate(sequences.values()):
                ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
            logits = np.asarray(
                _logits_fn(structure(base))(
                    *jax.device_put((cast_floats(weights, jnp.float32), ids, mask), cpu)
                ),
                np.float64,
            )[..., : sizes.vocab - 1]  # EOS is outside the sampled vocabulary
            gaps, exact, scale = [], 0, float(np.max(np.abs(logits)))
            for row, (slot, seq) in enumerate(sequences.items()):
                for pos in np.flatnonzero(generated[slot]):
                    step = logits[row, pos - 1]
                    gaps.append(float(step.max() - step[seq[pos]]))
                    exact += int(np.argmax(step) == seq[pos])
            section.check(
                name,
                error=max(gaps) / scale,
                tolerance=tol,
                metric="max (top logit - chosen logit) / max|logit|",
                generated_tokens=len(gaps),
                exact_argmax_fraction=round(exact / len(gaps), 4),
            )


# ---------------------------------------------------------------------------------- kernels


def _kernel_cases(sizes: CorrectnessSizes):
    """(name, function, inputs) of every public AT²PO kernel at paper-like shapes."""
    new, old, adv, mask = make_loss_inputs(sizes.loss_rows, sizes.loss_length)
    parent, is_leaf, valid, entropy, reward = make_trees(sizes.trees, sizes.nodes)
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (sizes.loss_rows, 512)).astype(np.float32)
    tree_index = (np.arange(sizes.loss_rows) % sizes.trees).astype(np.int32)
    token_node = rng.integers(-1, sizes.nodes, (sizes.loss_rows, sizes.loss_length)).astype(
        np.int32
    )

    def value_and_grad(loss):
        return jax.value_and_grad(lambda lp, o, a, m: loss(lp, o, a, m)[0])

    def credit(parent, is_leaf, valid, entropy, reward):
        z = kernels.normalize_leaf_rewards(reward, is_leaf, valid)
        values = kernels.tree_node_values(parent, is_leaf, z, entropy, valid, mode="child_softmax")
        return z, values, kernels.tree_node_advantages(values, parent, valid, mode="node_value")

    loss_in = (new, old, adv, mask)
    tree_in = (parent, is_leaf, valid, entropy)
    return [
        ("turn_ids_from_mask", kernels.turn_ids_from_mask, (mask,)),
        ("segment_mean", lambda v, m: kernels.segment_mean(v, kernels.turn_ids_from_mask(m), 8),
         (new - old, mask)),
        ("per_token_run_mean, pure-JAX path on the device",
         lambda v, m: kernels.turns.per_token_run_mean(v, m, native=False), (new - old, mask)),
        ("token_entropy", kernels.token_entropy, (logits,)),
        ("atpo_policy_loss value and grad", value_and_grad(kernels.atpo_policy_loss), loss_in),
        ("gspo_policy_loss value and grad", value_and_grad(kernels.gspo_policy_loss), loss_in),
        ("ppo_policy_loss value and grad", value_and_grad(kernels.ppo_policy_loss), loss_in),
        ("kl_penalty low_var_kl", lambda a, b: kernels.kl_penalty(a, b, "low_var_kl"), (new, old)),
        ("expansion_scores", kernels.expansion_scores, tree_in),
        ("select_expansion_nodes k=6", lambda *t: kernels.select_expansion_nodes(*t, k=6),
         tree_in),
        ("leaf z-score, child_softmax values, node_value advantages", credit,
         (*tree_in[:3], entropy, reward)),
        ("token_advantages", kernels.token_advantages,
         (reward, tree_index, token_node)),
    ]  # fmt: skip


def check_kernels(section, sizes: CorrectnessSizes, cpu, device) -> None:
    """Every public AT²PO kernel jitted on the device vs jitted on the CPU (same inputs). On the
    CPU the reference's turn mean is the native kernel where it could be built, so the pure-JAX
    run mean (what GPU/TPU run) is compared against it on every platform."""
    for name, fn, inputs in _kernel_cases(sizes):
        with section.guard(name):
            compiled = jax.jit(fn)
            want = jax.device_get(compiled(*jax.device_put(inputs, cpu)))
            got = jax.device_get(compiled(*jax.device_put(inputs, device)))
            floats, ints = tree_error(got, want)
            if floats is not None:
                section.check(name, error=floats, tolerance=TOL_KERNEL, metric="max|d|/max|ref|")
            if ints is not None:
                section.check(
                    f"{name}: integer outputs", error=ints, tolerance=0.0, metric="mismatches"
                )
