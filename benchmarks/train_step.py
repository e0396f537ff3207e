"""Train-step benchmark: ``tree`` and ``rows`` packing against the padded layout, in one run.

Trees with the paper's shape (ALGORITHM.md §5): 10 initial chains + 2 expansion rounds x 6
branches = 22 leaves per prompt, prompts of about 200 tokens, 1-6 turns per chain, turns of 50-600
tokens (a generated call, then the tool's result; the last turn an answer). The padded layout pads
every row to ``rollout.max_prompt_len + max_response_len`` (the paper: 2,000 + 6,192 = 8,192); the
packed layouts fill sequences of ``train.micro_batch_tokens`` (16,384). For each layout the real
update program runs one mini-batch (forward + backward of every micro-batch and the optimizer
step, with the ATPO loss), after a warm-up; reported are the positions the model computed, the
median wall time, and both as ratios to the padded layout.

The padded layout's micro-batches all have the same shape and cost, so ``--padded-rows K`` times
only the first K rows' micro-batches and scales the time by rows / K (said in the output) when the
full padded mini-batch would take too long on a CPU.

Run: ``python benchmarks/train_step.py`` (CPU, a small Qwen3-shaped model) or
``python benchmarks/train_step.py --gpu`` (a Qwen3-0.6B-shaped model in bfloat16 compute; prints
the model-FLOPs utilisation of each layout against the device's peak).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_median_seconds  # noqa: E402

from atpo_jax import models  # noqa: E402
from atpo_jax.train import flops  # noqa: E402
from atpo_jax.train.packed_update import PackedUpdate  # noqa: E402
from atpo_jax.train.packing import MiniBatchRows, pack_mini_batch  # noqa: E402
from atpo_jax.train.policy import (  # noqa: E402
    LossSettings,
    make_update_fn,
    mini_batch_totals,
    policy_rows,
)

CPU_MODEL = dict(
    model_type="qwen3",
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=384,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    qk_norm=True,
)
# Qwen3-0.6B's shape (config.json of Qwen/Qwen3-0.6B), random weights.
GPU_MODEL = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_layers=28,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    qk_norm=True,
    tie_word_embeddings=True,
)


def paper_tree(
    rng: np.random.Generator,
    vocab: int,
    *,
    chains: int = 10,
    iterations: int = 2,
    branches: int = 6,
    max_turns: int = 6,
):
    """One tree grown like the paper's search: ``chains`` chains from the prompt, then
    ``iterations`` rounds of ``branches`` chains forked at random tool turns. Returns per node its
    parent, tokens and loss mask (node 0 the prompt's root), and the leaves."""
    parent, depth = [-1], [0]
    tokens, mask = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
    leaves: list[int] = []

    def turn(final: bool):
        length = int(rng.integers(50, 601))
        called = length if final else max(8, int(length * rng.uniform(0.15, 0.4)))
        return (
            rng.integers(1, vocab, length).astype(np.int32),
            np.r_[np.ones(called, np.int32), np.zeros(length - called, np.int32)],
        )

    def grow(start: int) -> None:
        turns = int(rng.integers(depth[start] + 1, max_turns + 1))
        node = start
        for k in range(depth[start], turns):
            t, m = turn(final=k == turns - 1)
            parent.append(node)
            depth.append(depth[node] + 1)
            tokens.append(t)
            mask.append(m)
            node = len(parent) - 1
        leaves.append(node)

    for _ in range(chains):
        grow(0)
    for _ in range(iterations):
        # Fork at tool turns (internal nodes below the turn limit), as the expansion does.
        internal = [n for n in range(1, len(parent)) if n not in leaves and depth[n] < max_turns]
        for n in rng.choice(internal, size=branches, replace=len(internal) < branches):
            grow(int(n))
    return parent, tokens, mask, leaves


def paper_forest(
    rng: np.random.Generator,
    *,
    trees: int,
    vocab: int,
    max_prompt_len: int = 2000,
    max_response_len: int = 6192,
) -> MiniBatchRows:
    """The leaf rows of ``trees`` :func:`paper_tree` trees with prompts of ~200 tokens."""
    forest = [paper_tree(rng, vocab) for _ in range(trees)]
    prompts = [rng.integers(1, vocab, int(rng.normal(200, 30))).astype(np.int32) for _ in forest]
    rows = [(b, leaf) for b, tree in enumerate(forest) for leaf in tree[3]]
    num = len(rows)
    batch = dict(
        prompt_tokens=np.zeros((trees, max_prompt_len), np.int32),
        prompt_mask=np.zeros((trees, max_prompt_len), np.int32),
        tree_index=np.array([b for b, _ in rows], np.int32),
        response=np.zeros((num, max_response_len), np.int32),
        loss_mask=np.zeros((num, max_response_len), np.int32),
        token_node=np.full((num, max_response_len), -1, np.int32),
        advantages=np.zeros((num, max_response_len), np.float32),
        old_log_probs=np.zeros((num, max_response_len), np.float32),
    )
    for b, prompt in enumerate(prompts):
        batch["prompt_tokens"][b, -len(prompt) :] = prompt
        batch["prompt_mask"][b, -len(prompt) :] = 1
    for r, (b, leaf) in enumerate(rows):
        parent, tokens, mask, _ = forest[b]
        path, n = [], leaf
        while n > 0:
            path.append(n)
            n = parent[n]
        t = 0
        for n in reversed(path):
            span = slice(t, t + len(tokens[n]))
            batch["response"][r, span] = tokens[n]
            batch["loss_mask"][r, span] = mask[n]
            batch["token_node"][r, span] = n
            batch["advantages"][r, span] = rng.normal() * mask[n]
            batch["old_log_probs"][r, span] = -8.0 * mask[n]
            t = span.stop
    return MiniBatchRows(**batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="Qwen3-0.6B shape, bf16, MFU")
    parser.add_argument("--trees", type=int, default=2)
    parser.add_argument("--budget", type=int, default=16384, help="train.micro_batch_tokens")
    parser.add_argument("--padded-micro-rows", type=int, default=1)
    parser.add_argument("--padded-rows", type=int, default=0, help="time only K rows (0: all)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    shape = dict(GPU_MODEL if args.gpu else CPU_MODEL)
    config = models.ModelConfig(
        **shape,
        dtype=jnp.bfloat16 if args.gpu else jnp.float32,
        param_dtype=jnp.float32,
        remat=args.gpu,
    )
    graphdef, params = nnx.split(models.CausalLM(config, rngs=nnx.Rngs(0)))
    batch = paper_forest(
        np.random.default_rng(args.seed), trees=args.trees, vocab=shape["vocab_size"]
    )
    settings = LossSettings(clip_low=0.2, clip_high=0.28)
    optimizer = optax.sgd(1e-6)
    opt_state = optimizer.init(params)
    rows = batch.num_rows
    totals = mini_batch_totals(batch.loss_mask, settings.loss_agg)
    print(
        f"{args.trees} trees x {rows // args.trees} leaves, "
        f"{batch.real_tokens():,} tokens in the per-leaf rows without padding, devices: "
        f"{jax.devices()[0].device_kind}, model: {shape['num_layers']} layers x "
        f"{shape['hidden_size']} (vocab {shape['vocab_size']})"
    )

    padded_rows = args.padded_rows or rows
    padded_rows -= padded_rows % args.padded_micro_rows
    full = policy_rows(
        batch.prompt_tokens,
        batch.prompt_mask,
        batch.tree_index,
        batch.response,
        batch.loss_mask,
        advantages=batch.advantages,
        old_log_probs=batch.old_log_probs,
    )
    timed = jax.tree.map(lambda x: jnp.asarray(x[:padded_rows]), full)
    padded = make_update_fn(graphdef, optimizer, settings, args.padded_micro_rows, donate=False)
    layouts = {"padded": (lambda: padded(params, opt_state, timed), full.input_ids.size)}
    notes = {"padded": f"{padded_rows} of {rows} rows timed, x {rows / padded_rows:.2f}"}
    scale = {"padded": rows / padded_rows}
    for mode in ("rows", "tree"):
        start = time.perf_counter()
        packed = pack_mini_batch(batch, mode, budget=args.budget)
        packing_s = time.perf_counter() - start
        micro = [jax.tree.map(jnp.asarray, m) for m in packed.micro]
        update = PackedUpdate(graphdef, optimizer, settings, donate=False)
        layouts[mode] = (
            lambda u=update, m=micro: u(params, opt_state, m, totals),
            packed.computed_tokens,
        )
        notes[mode] = (
            f"{len(micro)} micro-batches of {args.budget}, {packed.placed_tokens:,} placed, "
            f"host packing {packing_s * 1e3:.0f} ms"
        )
        scale[mode] = 1.0
    seconds = interleaved_median_seconds(
        [fn for fn, _ in layouts.values()], repeats=args.repeats, warmup=1
    )
    seconds = {name: s * scale[name] for name, s in zip(layouts, seconds, strict=True)}
    print(
        f"\n  {'layout':<8} {'computed tokens':>16} {'vs padded':>10} {'seconds':>9} "
        f"{'vs padded':>10}  note"
    )
    base_tokens, base_s = layouts["padded"][1], seconds["padded"]
    for name, (_, tokens) in layouts.items():
        print(
            f"  {name:<8} {tokens:>16,} {tokens / base_tokens:>10.3f} {seconds[name]:>9.2f} "
            f"{seconds[name] / base_s:>10.3f}  {notes[name]}"
        )
    rows_tokens, tree_tokens = layouts["rows"][1], layouts["tree"][1]
    print(
        f"\n  tree vs rows: {tree_tokens / rows_tokens:.3f} of the tokens, "
        f"{seconds['tree'] / seconds['rows']:.3f} of the time"
    )
    peak = flops.peak_flops_per_device()
    if peak:
        # The work the step needs, whatever the layout: forward + backward of every per-leaf row
        # (a causal sequence of its prompt + response).
        lengths = np.sum(batch.prompt_mask, axis=1)[batch.tree_index] + batch.row_lengths()
        used = 3 * sum(flops.forward_flops_for_sequence(config, int(n)) for n in lengths)
        for name in layouts:
            print(
                f"  MFU {name}: {used / seconds[name] / peak:.3f} (peak {peak / 1e12:.0f} TFLOP/s)"
            )


if __name__ == "__main__":
    main()
