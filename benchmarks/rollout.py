"""Tree-rollout benchmark: today's engine (paged KV, continuous batching, stops on device) against
the engine before it (dense slots, lockstep turns, stops checked on the host), same model, same
workload, measured in one run.

Workload (the paper's tree shape scaled to a CPU): ``--prompts`` trees of 10 initial chains plus
2 expansion rounds x 6 branches (22 leaves), 1-6 tool turns per chain with 0-200 ms simulated tool
latency, turns of 20-300 tokens. The policy is a 4-layer x 128 Qwen3 whose every matmul runs at full
size but whose weights are set so that it behaves as a Markov chain over tokens (attention and MLP
outputs scaled to ~1e-4 of the residual, embeddings one-hot per state, the LM head holding each
state's next-token logits): every chain opens its first turn with 20 counting tokens, then writes
filler until it searches (p = 1/100 per token); after a result it counts 20 tokens and writes filler
until it searches again (p = 0.6/100) or answers (p = 0.4/100). A random model would never close a
tag, so it could not produce the tool turns this benchmark is about.

Each engine runs in its own process (the old one from a git worktree of ``--old-commit``), warms
up on the same prompts (compiling its shape buckets) and is timed on ``--repeats`` identical
rollouts (the fastest counts: the machine is shared and noisy). Reported: wall time, generated
tokens/s and the ratio new / old; ``occupancy`` (useful row-steps / row-steps run) and the share
of row-steps that were padding rows; device loop ``steps`` and generated tokens per step (on a
memory-bound accelerator a decode step costs about the same whatever the batch, so steps, not
row-steps, are its time; on this CPU the cost follows row-steps); peak KV tokens against the
dense reservation (``num_slots x max_len``); the fraction of tool wall time during which decoding
ran; for the paged engine ``kv_reads_shared`` and the waits for KV pages. The new engine also
runs with ``tool_rejoin_chunks`` K = 3, with half the decode chunk, and with a KV pool of 0.1x
the dense reservation (chains wait for pages there).

Run: ``python benchmarks/rollout.py [--prompts 8] [--response 2048]``; ``--quick`` for a
smoke run of about two minutes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# The last commit before the paged engine (a679d65 "paged KV cache"): dense slots, lockstep turns.
OLD_COMMIT = "a679d65^"
RESULT_TAG = "ROLLOUT_BENCHMARK_RESULT "

COUNT_LEN = 20  # deterministic counting tokens that open every turn (the shortest turn)
SEARCH_P = 1 / 100  # per-token chance of ending a turn (turn length 20 + geometric, mean ~120)
ANSWER_SHARE = 0.4  # after the first result: the share of turn ends that answer instead of search


def _words(tokenizer) -> list[str]:
    """Plain word tokens of the synthetic tokenizer (no tags, punctuation or special tokens)."""
    vocab = tokenizer.get_vocab()
    roles = {"assistant", "user", "system"}
    return [w for w in sorted(vocab, key=vocab.get) if w.isalpha() and w not in roles]


@dataclasses.dataclass(frozen=True)
class MarkovPolicy:
    """Token ids of the workload's states (see the module docstring)."""

    count1: list[int]
    count2: list[int]
    filler1: list[int]
    filler2: list[int]
    queries: list[int]
    answer: int
    observation_words: list[str]


def markov_policy(tokenizer) -> MarkovPolicy:
    words = _words(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    need = 2 * COUNT_LEN + 3 * 16 + 8
    if len(words) < need:
        raise SystemExit(
            f"benchmarks/rollout.py: the tokenizer has {len(words)} words, need {need}"
        )
    rng = random.Random(0)
    rng.shuffle(words)
    take = iter(words)
    pick = lambda n: [next(take) for _ in range(n)]  # noqa: E731
    count1, count2, filler1, filler2, queries = (
        pick(COUNT_LEN),
        pick(COUNT_LEN),
        pick(16),
        pick(16),
        pick(8),
    )
    return MarkovPolicy(
        count1=[ids(w) for w in count1],
        count2=[ids(w) for w in count2],
        filler1=[ids(w) for w in filler1],
        filler2=[ids(w) for w in filler2],
        queries=[ids(w) for w in queries],
        answer=ids(next(take)),
        observation_words=list(take),
    )


def build_model(tokenizer, policy: MarkovPolicy, *, hidden: int, layers: int):
    """A Qwen3 whose next-token distribution depends (to ~1e-4) only on the current token."""
    from flax import nnx

    from atpo_jax import models

    vocab = len(tokenizer)
    config = models.ModelConfig(
        model_type="qwen3",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=hidden // 4,
        qk_norm=True,
        tie_word_embeddings=False,
    )
    model = models.CausalLM(config, rngs=nnx.Rngs(0))
    ids = tokenizer.convert_tokens_to_ids
    eos = tokenizer.eos_token_id
    logits: list[np.ndarray] = []  # one next-token logit row per state
    state_of = np.zeros((vocab,), np.int64)  # token -> state (0: the default state)

    def state(tokens, **next_probs) -> None:
        row = np.full((vocab,), -30.0, np.float32)
        for token, p in next_probs.pop("table").items():
            row[token] = np.log(p)
        logits.append(row)
        for token in tokens:
            state_of[token] = len(logits) - 1

    state([], table={eos: 1.0})  # anything unexpected (prompt words, warnings) ends the chain
    state([ids("assistant")], table={policy.count1[0]: 1.0})
    for chain, after in ((policy.count1, policy.filler1), (policy.count2, policy.filler2)):
        for a, b in zip(chain[:-1], chain[1:], strict=True):
            state([a], table={b: 1.0})
        first_turn = chain is policy.count1
        table = {w: (1 - SEARCH_P) / len(after) for w in after}
        if first_turn:  # the first turn always searches
            table[ids("<search>")] = SEARCH_P
        else:
            table[ids("<search>")] = SEARCH_P * (1 - ANSWER_SHARE)
            table[ids("<answer>")] = SEARCH_P * ANSWER_SHARE
        state([chain[-1], *after], table=table)
    state([ids("<search>")], table={q: 1 / len(policy.queries) for q in policy.queries})
    state(policy.queries, table={ids("</search>"): 1.0})
    state([ids("</result>")], table={policy.count2[0]: 1.0})
    state([ids("<answer>")], table={policy.answer: 1.0})
    state([policy.answer], table={ids("</answer>"): 1.0})
    state([ids("</answer>")], table={eos: 1.0})
    if len(logits) > hidden:
        raise SystemExit(f"benchmarks/rollout.py: {len(logits)} states need hidden >= that")
    scale = np.sqrt(hidden)
    embedding = np.zeros((vocab, hidden), np.float32)
    embedding[np.arange(vocab), state_of] = scale  # RMS-normalised: e_state * sqrt(hidden)
    head = np.zeros((hidden, vocab), np.float32)
    head[: len(logits)] = np.stack(logits) / scale
    model.embed_tokens.embedding.value = embedding
    model.lm_head.kernel.value = head
    for layer in model.layers:  # real compute, negligible contribution to the residual
        layer.self_attn.o_proj.kernel.value = layer.self_attn.o_proj.kernel.value * 1e-4
        layer.mlp.down_proj.kernel.value = layer.mlp.down_proj.kernel.value * 1e-4
    return model


class SlowSearch:
    """The search tool: sleeps U(0, 200 ms), answers 8-40 observation words chosen by the query."""

    tag = "search"

    def __init__(self, words: list[str], max_latency_s: float, seed: int):
        self.words = words
        self.max_latency_s = max_latency_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.intervals: list[tuple[float, float]] = []

    def run(self, content: str):
        from atpo_jax.tools.base import ToolResult

        with self._lock:
            latency = self._rng.uniform(0.0, self.max_latency_s)
        start = time.perf_counter()
        time.sleep(latency)
        words = random.Random(content.strip())
        text = " ".join(words.choice(self.words) for _ in range(words.randint(8, 40)))
        with self._lock:
            self.intervals.append((start, time.perf_counter()))
        return ToolResult(ok=True, text=text)


def _union_seconds(intervals) -> float:
    return sum(b - a for a, b in _merge(intervals))


def _overlap_seconds(first, second) -> float:
    """Seconds during which some interval of ``first`` and some interval of ``second`` both ran."""
    both = 0.0
    merged = _merge(second)
    for a, b in _merge(first):
        for c, d in merged:
            both += max(0.0, min(b, d) - max(a, c))
    return both


def _merge(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


class DecodeProbe:
    """Measures an engine's decode calls from outside (the old engine has no counters): device loop
    iterations (``steps``), row-steps run (batch x steps, padding rows included), padding
    row-steps, tokens kept (after stop-string trimming) and when the engine was generating.

    ``steps`` is what a memory-bound device pays for: there a decode step reads the weights and
    costs about the same whatever the batch, so steps per generated token is the device time per
    token, while on a CPU the cost follows row-steps."""

    def __init__(self, engine, old: bool):
        self.reset()
        decode, generate = engine._decode, engine.generate
        # The programs' arguments and outputs: (.., slots or page table, .., active mask) and
        # the per-row token counts (the old loop runs until its longest row is done).
        active_arg, count_out = (5, 5) if old else (6, 4)

        def counted_decode(*args, **kwargs):
            out = decode(*args, **kwargs)
            count = np.asarray(out[count_out])
            steps = int(count.max(initial=0)) if old else int(np.asarray(out[7]))
            batch = int(np.asarray(args[3]).shape[0])
            rows = int(np.asarray(args[active_arg]).sum())
            self.calls += 1
            self.steps += steps
            self.row_steps_run += batch * steps
            self.padding_row_steps += (batch - rows) * steps
            return out

        def timed_generate(*args, **kwargs):  # the old tree search's lockstep generate calls
            start = time.perf_counter()
            gens = generate(*args, **kwargs)
            self.generate_intervals.append((start, time.perf_counter()))
            self.row_steps_useful += sum(len(g.tokens) for g in gens)
            return gens

        engine._decode = counted_decode
        if old:
            engine.generate = timed_generate

    def reset(self) -> None:
        self.calls = self.steps = self.row_steps_run = self.padding_row_steps = 0
        self.row_steps_useful = 0
        self.generate_intervals: list[tuple[float, float]] = []


def _filter_kwargs(target, kwargs: dict) -> dict:
    names = set(inspect.signature(target).parameters)
    return {k: v for k, v in kwargs.items() if k in names}


def run_engine(args) -> dict:
    """One engine's warm-up and timed rollout (in this process); returns its figures."""
    import jax

    import atpo_jax
    from atpo_jax.data import read_rows
    from atpo_jax.data.prompts import encode_prompt
    from atpo_jax.data.synthetic import build_synthetic_world, load_tokenizer
    from atpo_jax.rollout import settings as settings_module
    from atpo_jax.rollout.engine import Engine
    from atpo_jax.rollout.sampling import SamplingParams
    from atpo_jax.rollout.tree_search import TreeSearch
    from atpo_jax.tools.toolbox import Toolbox

    with tempfile.TemporaryDirectory() as tmp:
        files = build_synthetic_world(tmp)
        tokenizer = load_tokenizer(files.tokenizer)
        rows = read_rows(files.train)[: args.prompts]
        prompts = [encode_prompt(tokenizer, row.prompt) for row in rows]
    policy = markov_policy(tokenizer)
    model = build_model(tokenizer, policy, hidden=args.hidden, layers=args.layers)
    from flax import nnx

    params = nnx.state(model)
    tool = SlowSearch(policy.observation_words, args.tool_latency_ms / 1000, seed=0)
    toolbox = Toolbox([tool])
    max_prompt = max(len(p) for p in prompts)
    rollout_fields = {f.name for f in dataclasses.fields(settings_module.RolloutSettings)}
    wanted = dict(
        max_prompt_len=max_prompt,
        max_response_len=args.response,
        observation_margin=16,
        num_slots=args.prompts * 23,
        decode_chunk=args.decode_chunk,
        kv_bucket=128,
        tool_rejoin_chunks=args.rejoin,
    )
    settings = settings_module.RolloutSettings(
        **{k: v for k, v in wanted.items() if k in rollout_fields}
    )
    max_len = max_prompt + args.response + 1
    dense_tokens = settings.num_slots * max_len
    page_size = 16
    engine_kwargs = dict(
        num_slots=settings.num_slots,
        max_len=max_len,
        eos_token_ids=[tokenizer.eos_token_id],
        sampling=SamplingParams(vocab_limit=len(tokenizer)),
        stop_strings=toolbox.stop_strings,
        decode=tokenizer.decode,
        decode_chunk=args.decode_chunk,
        kv_bucket=128,
        page_size=page_size,
        kv_pages=int(args.pool * dense_tokens / page_size) + 1 if args.pool else 0,
    )
    engine = Engine(model, **_filter_kwargs(Engine.__init__, engine_kwargs))
    probe = DecodeProbe(engine, old=args.engine == "old")
    search = TreeSearch(
        engine,
        tokenizer,
        toolbox,
        settings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    search.rollout(params, prompts, step=1)  # warm-up: compiles the shape buckets
    compiled = engine.compile_count
    best = None
    for _ in range(args.repeats):  # the fastest of identical rollouts: the least disturbed
        probe.reset()
        tool.intervals.clear()
        start = time.perf_counter()
        out = search.rollout(params, prompts, step=1)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, out, list(tool.intervals), copy.copy(probe))
    seconds, out, intervals, probe = best
    tool.intervals = intervals
    metrics = out.metrics
    result = dict(
        engine=args.engine,
        source=os.path.dirname(os.path.dirname(os.path.abspath(atpo_jax.__file__))),
        jax=jax.__version__,
        platform=jax.devices()[0].platform,
        seconds=seconds,
        compiled_during_timed_run=engine.compile_count - compiled,
        generated_tokens=metrics["rollout/generated_tokens"],
        tool_calls=metrics["rollout/tool_calls"],
        tool_calls_per_chain=metrics["rollout/tool_calls_per_chain"],
        response_length_mean=metrics["rollout/response_length_mean"],
        truncated_rows=metrics["rollout/truncated_rows"],
        dense_tokens=dense_tokens,
        tool_seconds=_union_seconds(tool.intervals),
        decode_calls=probe.calls,
        decode_steps=probe.steps,
        padding_share=probe.padding_row_steps / max(probe.row_steps_run, 1),
    )
    if args.engine == "old":  # the old engine has no schedule/* metrics: measured from outside
        result.update(
            decode_occupancy=probe.row_steps_useful / max(probe.row_steps_run, 1),
            kv_tokens_peak=float(dense_tokens),  # dense slots are reserved up front
            kv_tokens_dense_equivalent=float(dense_tokens),
            tool_overlap=_overlap_seconds(tool.intervals, probe.generate_intervals)
            / max(result["tool_seconds"], 1e-9),
            kv_reads_shared=None,
            kv_pool_waits=0.0,
        )
    else:
        result.update(
            decode_occupancy=metrics["schedule/decode_occupancy"],
            kv_tokens_peak=metrics["schedule/kv_tokens_peak"],
            kv_tokens_dense_equivalent=metrics["schedule/kv_tokens_dense_equivalent"],
            tool_overlap=metrics["schedule/tool_overlap"],
            kv_reads_shared=metrics["schedule/kv_reads_shared"],
            kv_pool_waits=metrics["schedule/kv_pool_waits"],
        )
    return result


def _old_source(commit: str, keep: str | None) -> str:
    """A git worktree of the old engine's commit (reused when ``keep`` already holds one)."""
    path = keep or os.path.join(tempfile.gettempdir(), "atpo_jax_old_engine")
    if os.path.isdir(os.path.join(path, "atpo_jax")):
        return path
    try:
        subprocess.run(
            ["git", "-C", REPO, "worktree", "add", "--detach", path, commit],
            check=True,
            capture_output=True,
            text=True,
        )
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise SystemExit(
            f"benchmarks/rollout.py: cannot check out the old engine ({commit}) as a git worktree "
            f"at {path}: {detail.strip()}. Run from a git clone with its history, or pass "
            "--old-src DIR holding a checkout of that commit."
        ) from e
    return path


def _child(args, engine: str, source: str, **overrides) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--engine", engine]
    settings = {**vars(args), "pool": 0.0, "rejoin": 1, **overrides}
    for key in (
        "prompts",
        "response",
        "hidden",
        "layers",
        "decode_chunk",
        "tool_latency_ms",
        "repeats",
        "pool",
        "rejoin",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(settings[key])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([source, HERE]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise SystemExit(
        f"benchmarks/rollout.py: the {engine} engine's run failed (exit {proc.returncode}):\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def _row(name: str, r: dict, base: dict) -> list[str]:
    tps = r["generated_tokens"] / r["seconds"]
    shared = "-" if r["kv_reads_shared"] is None else f"{r['kv_reads_shared']:.2f}"
    return [
        name,
        f"{r['seconds']:.1f}",
        f"{tps:,.0f}",
        f"{tps / (base['generated_tokens'] / base['seconds']):.2f}x",
        f"{r['decode_occupancy']:.2f}",
        f"{r['padding_share']:.2f}",
        f"{r['decode_steps']:,}",
        f"{r['generated_tokens'] / max(r['decode_steps'], 1):.1f}",
        f"{r['kv_tokens_peak'] / r['kv_tokens_dense_equivalent']:.2f}",
        f"{r['tool_overlap']:.2f}",
        shared,
        f"{r['kv_pool_waits']:.0f}",
        str(r["compiled_during_timed_run"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--response", type=int, default=2048, help="max response tokens per row")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--decode-chunk", type=int, default=32)
    parser.add_argument("--tool-latency-ms", type=float, default=200.0)
    parser.add_argument("--repeats", type=int, default=2, help="timed rollouts; the fastest counts")
    parser.add_argument("--quick", action="store_true", help="2 prompts, short responses")
    parser.add_argument("--old-commit", default=OLD_COMMIT)
    parser.add_argument("--old-src", default=None, help="a checkout of --old-commit to reuse")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    # Internal: one engine's run in a child process.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=("old", "new"), default="new", help=argparse.SUPPRESS)
    parser.add_argument("--pool", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--rejoin", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(RESULT_TAG + json.dumps(run_engine(args)), flush=True)
        return
    if args.quick:
        args.prompts, args.response, args.layers, args.repeats = 2, 512, 2, 1
    old_src = _old_source(args.old_commit, args.old_src)
    runs = {
        "old: dense slots, lockstep": _child(args, "old", old_src),
        "new: paged, continuous (K=1)": _child(args, "new", REPO),
        "new, K=3": _child(args, "new", REPO, rejoin=3),
        f"new, chunk {args.decode_chunk // 2}": _child(
            args, "new", REPO, decode_chunk=args.decode_chunk // 2
        ),
        "new, pool 0.1x dense": _child(args, "new", REPO, pool=0.1),
    }
    base = runs["old: dense slots, lockstep"]
    new = runs["new: paged, continuous (K=1)"]
    assert base["source"] != new["source"], "both runs imported the same atpo_jax"
    header = [
        "engine",
        "s",
        "gen tok/s",
        "vs old",
        "occupancy",
        "padding",
        "steps",
        "tok/step",
        "KV peak/dense",
        "tool overlap",
        "kv shared",
        "pool waits",
        "compiles",
    ]
    table = [header] + [_row(name, r, base) for name, r in runs.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    print(
        f"jax {new['jax']} on {new['platform']}; {args.prompts} trees x 22 leaves, responses <= "
        f"{args.response} tokens, {args.layers} layers x {args.hidden}, tool latency U(0, "
        f"{args.tool_latency_ms:.0f} ms); old engine = {args.old_commit}"
    )
    print(
        f"workload (new run): {new['generated_tokens']:,.0f} generated tokens, "
        f"{new['tool_calls']:.0f} tool calls ({new['tool_calls_per_chain']:.2f} per leaf), mean "
        f"leaf response {new['response_length_mean']:.0f} tokens, "
        f"{new['truncated_rows']:.0f} truncated leaves"
    )
    for row in table:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), runs=runs), f, indent=2)


if __name__ == "__main__":
    main()
