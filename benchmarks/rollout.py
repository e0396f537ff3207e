"""Tree-rollout benchmark on the synthetic task: trees/s, generated tokens/s, and prefill saved.

Runs the real tree search (10 chains + 2 x 6 branches per prompt, local BM25 retriever) with a tiny
random Qwen3 model twice in the same process:
  * ours: chains keep their KV cache between turns (extend) and branches start from a device copy
    of the prefix (fork);
  * baseline: a stateless engine that re-prefills every sequence in full before each generation
    call and prefills each new chain/branch from scratch.
It prints wall time, trees/s, generated tokens/s and the number of tokens each run pushed through
prefill.

Run: ``python benchmarks/rollout.py [--prompts 8]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import print_table  # noqa: E402

from atpo_jax import models  # noqa: E402
from atpo_jax.data import read_rows  # noqa: E402
from atpo_jax.data.prompts import encode_prompt  # noqa: E402
from atpo_jax.data.synthetic import build_synthetic_world, load_tokenizer  # noqa: E402
from atpo_jax.rollout.engine import Engine  # noqa: E402
from atpo_jax.rollout.sampling import SamplingParams  # noqa: E402
from atpo_jax.rollout.settings import RolloutSettings  # noqa: E402
from atpo_jax.rollout.tree_search import TreeSearch  # noqa: E402
from atpo_jax.tools.bm25 import LocalBM25Retriever  # noqa: E402
from atpo_jax.tools.search import SearchTool  # noqa: E402
from atpo_jax.tools.toolbox import Toolbox  # noqa: E402


class ReprefillEngine:
    """The baseline: an engine that keeps no KV cache between calls. Every generation prefills its
    sequences in full; forks and extensions only change the host's copy of the sequences. Built on
    the engine's public API (the tree search sees the same interface)."""

    def __init__(self, engine: Engine):
        self.inner = engine
        self.sequences: dict[int, list[int]] = {}

    def __getattr__(self, name):  # num_slots, max_len, allocate, free_slots, compile_count, ...
        return getattr(self.inner, name)

    def release(self, slots):
        for slot in slots:
            self.sequences.pop(slot, None)
        self.inner.release(slots)

    def tokens(self, slot):
        return list(self.sequences[slot])

    def length(self, slot):
        return len(self.sequences[slot])

    def prefill_many(self, params, slots, token_lists):
        for slot, tokens in zip(slots, token_lists, strict=True):
            self.sequences[slot] = [int(t) for t in tokens]

    def fork_many(self, srcs, dsts, lengths):
        prefixes = [self.sequences[s][:n] for s, n in zip(srcs, lengths, strict=True)]
        for dst, prefix in zip(dsts, prefixes, strict=True):
            self.sequences[dst] = prefix

    def extend_many(self, params, slots, token_lists):
        for slot, tokens in zip(slots, token_lists, strict=True):
            self.sequences[slot] += [int(t) for t in tokens]

    def _materialise(self, params, slots):
        self.inner.prefill_many(params, slots, [self.sequences[s] for s in slots])

    def generate(self, params, slots, budgets, rng):
        self._materialise(params, slots)
        results = self.inner.generate(params, slots, budgets, rng)
        for slot in slots:
            self.sequences[slot] = self.inner.tokens(slot)
        return results

    def force(self, params, slots, tokens):
        self._materialise(params, slots)
        scored = self.inner.force(params, slots, tokens)
        for slot in slots:
            self.sequences[slot] = self.inner.tokens(slot)
        return scored


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--response", type=int, default=192)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = build_synthetic_world(tmp)
        tokenizer = load_tokenizer(files.tokenizer)
        rows = read_rows(files.train)[: args.prompts]
        prompts = [encode_prompt(tokenizer, row.prompt) for row in rows]
        toolbox = Toolbox([SearchTool(LocalBM25Retriever(files.corpus), topk=3)])
        config = models.ModelConfig(
            model_type="qwen3",
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=384,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            qk_norm=True,
            tie_word_embeddings=True,
        )
        model = models.CausalLM(config, rngs=nnx.Rngs(0))
        params = nnx.state(model)
        rollout_config = RolloutSettings(
            max_prompt_len=64, max_response_len=args.response, observation_margin=16
        )
        rows_out = []
        results = {}
        for name, wrap in (
            ("fork + extend (ours)", lambda engine: engine),
            ("re-prefill baseline", ReprefillEngine),
        ):
            engine = Engine(
                model,
                num_slots=4 * 23,
                max_len=64 + args.response,
                eos_token_ids=[tokenizer.eos_token_id],
                sampling=SamplingParams(vocab_limit=len(tokenizer)),
                stop_strings=toolbox.stop_strings,
                decode=tokenizer.decode,
                decode_chunk=32,
            )
            engine = wrap(engine)
            search = TreeSearch(
                engine,
                tokenizer,
                toolbox,
                rollout_config,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            # Warm-up with the same prompts compiles the shape buckets the timed run needs.
            search.rollout(params, prompts, step=1)
            compiled = engine.compile_count
            prefilled = engine.prefill_tokens_computed
            start = time.perf_counter()
            out = search.rollout(params, prompts, step=1)
            seconds = time.perf_counter() - start
            print(
                f"{name}: {engine.compile_count - compiled} programs compiled during the timed run"
            )
            generated = out.metrics["rollout/generated_tokens"]
            prefilled = engine.prefill_tokens_computed - prefilled
            results[name] = (seconds, prefilled)
            rows_out.append(
                (
                    name,
                    seconds,
                    f"{len(prompts) / seconds:.2f} trees/s, {generated / seconds:,.0f} "
                    f"generated tok/s, {prefilled:,} prefill tokens",
                )
            )
        ours, base = results["fork + extend (ours)"], results["re-prefill baseline"]
        rows_out.append(
            (
                "saving",
                0.0,
                f"{1 - ours[1] / base[1]:.0%} fewer prefill tokens, "
                f"{base[0] / ours[0]:.2f}x faster",
            )
        )
        print(
            f"jax {jax.__version__} on {jax.devices()[0].platform}; {args.prompts} prompts x 22 "
            f"leaves, response <= {args.response} tokens, {len(tokenizer)}-token vocabulary"
        )
        print_table(
            "Tree rollout on the synthetic task (tiny random Qwen3, 4 layers x 128)", rows_out
        )


if __name__ == "__main__":
    main()
