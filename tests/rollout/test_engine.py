"""Generation engine: greedy vs full forward, sampling, log-probs, extend/fork, stop strings, budgets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atpo_jax import models
from atpo_jax.rollout.engine import Engine, batch_bucket
from atpo_jax.rollout.sampling import SamplingParams, sampling_logits
from atpo_jax.rollout.stop import StopStringMatcher
from tests.rollout.scripted import piece_decoder, successor_model

VOCAB = 61


@pytest.fixture(scope="module")
def model():
    config = models.ModelConfig(
        model_type="qwen3",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        qk_norm=True,
        tie_word_embeddings=False,
    )
    model = models.CausalLM(config, rngs=nnx.Rngs(3))
    # Spread the random logits (std ~2) so greedy choices are clear-cut and samples vary.
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 15.0
    return model


def make_engine(model, **kwargs):
    defaults = dict(num_slots=8, max_len=96, eos_token_ids=[0], decode_chunk=8, kv_bucket=32)
    defaults.update(kwargs)
    return Engine(model, **defaults)


@jax.jit
def _last_logits(model_state, graphdef, ids, length):
    model = nnx.merge(graphdef, model_state)
    mask = (jnp.arange(ids.shape[1]) < length)[None].astype(jnp.int32)
    return model(ids, mask)[0, length - 1]


def greedy_reference(model, prompt, steps, eos=0, width=64):
    """Step-by-step argmax of the full forward pass (no cache), right-padded to one jitted shape."""
    graphdef, state = nnx.split(model)
    seq = list(prompt)
    out = []
    for _ in range(steps):
        ids = jnp.asarray([seq + [0] * (width - len(seq))])
        token = int(jnp.argmax(_last_logits(state, graphdef, ids, len(seq))))
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out


PROMPTS = [[5, 9, 13], [7, 1, 22, 40, 3, 8, 11], [30], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 21]]


def test_greedy_equals_stepwise_argmax_of_full_forward(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call
    engine = make_engine(model, sampling=SamplingParams(temperature=0.0))
    slots = engine.allocate(len(PROMPTS))
    engine.prefill_many(P, slots, PROMPTS)
    results = engine.generate(P, slots, [20] * len(slots), jax.random.key(0))
    for prompt, result, slot in zip(PROMPTS, results, slots, strict=True):
        want = greedy_reference(model, prompt, 20)
        assert result.tokens == want
        assert result.finish_reason == ("eos" if want[-1] == 0 else "length")
        assert engine.tokens(slot) == prompt + want


def test_sampled_log_probs_and_entropy_match_full_forward(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call
    engine = make_engine(model)  # temperature 1: sampling distribution = model distribution
    slots = engine.allocate(2)
    engine.prefill_many(P, slots, PROMPTS[:2])
    results = engine.generate(P, slots, [15, 15], jax.random.key(7))
    for prompt, result in zip(PROMPTS[:2], results, strict=True):
        seq = jnp.asarray([prompt + result.tokens])
        targets = jnp.concatenate([seq[:, 1:], jnp.zeros((1, 1), seq.dtype)], axis=1)
        lp, ent = models.token_log_probs(model, seq, targets, return_entropy=True)
        n = len(result.tokens)
        start = len(prompt) - 1
        np.testing.assert_allclose(result.log_probs, lp[0, start : start + n], atol=1e-4)
        np.testing.assert_allclose(result.entropies, ent[0, start : start + n], atol=1e-4)


def test_forced_tokens_are_scored_like_sampled_ones(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call
    engine = make_engine(model)
    slots = engine.allocate(2)
    engine.prefill_many(P, slots, PROMPTS[:2])
    scored = engine.force(P, slots, [7, 0])
    for prompt, slot, token, (log_prob, entropy) in zip(
        PROMPTS[:2], slots, [7, 0], scored, strict=True
    ):
        assert engine.tokens(slot) == prompt + [token]
        seq = jnp.asarray([prompt + [token]])
        targets = jnp.concatenate([seq[:, 1:], jnp.zeros((1, 1), seq.dtype)], axis=1)
        lp, ent = models.token_log_probs(model, seq, targets, return_entropy=True)
        np.testing.assert_allclose(log_prob, lp[0, len(prompt) - 1], atol=1e-4)
        np.testing.assert_allclose(entropy, ent[0, len(prompt) - 1], atol=1e-4)
    # Generation continues after the forced token exactly as after a prefill of the same sequence.
    greedy = make_engine(model, sampling=SamplingParams(temperature=0.0))
    a, b = greedy.allocate(2)
    greedy.prefill(P, a, PROMPTS[0])
    greedy.force(P, [a], [7])
    greedy.prefill(P, b, PROMPTS[0] + [7])
    ra, rb = greedy.generate(P, [a, b], [8, 8], jax.random.key(0))
    assert ra.tokens == rb.tokens


def test_sampling_is_reproducible_and_independent_of_batching(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call

    def run(prompts, keys):
        engine = make_engine(model)
        slots = engine.allocate(len(prompts))
        engine.prefill_many(P, slots, prompts)
        return [r.tokens for r in engine.generate(P, slots, [12] * len(prompts), keys)]

    keys = jax.random.split(jax.random.key(11), 3)
    together = run(PROMPTS[:3], keys)
    assert together == run(PROMPTS[:3], keys)
    alone = [run([p], k[None])[0] for p, k in zip(PROMPTS[:3], keys, strict=True)]
    assert together == alone  # per-slot keys: a slot's draw does not depend on its batch-mates
    other = run(PROMPTS[:3], jax.random.split(jax.random.key(12), 3))
    assert other != together


def test_low_temperature_matches_greedy(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call
    greedy = make_engine(model, sampling=SamplingParams(temperature=0.0))
    cold = make_engine(model, sampling=SamplingParams(temperature=1e-4))
    outs = []
    for engine in (greedy, cold):
        slots = engine.allocate(2)
        engine.prefill_many(P, slots, PROMPTS[1:3])
        outs.append([r.tokens for r in engine.generate(P, slots, [16, 16], jax.random.key(5))])
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=3), SamplingParams(top_p=0.5), SamplingParams(top_k=5, top_p=0.7)],
)
def test_top_k_and_top_p_never_leave_the_allowed_set(params):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 2.0, (1, 12)), jnp.float32)
    allowed = np.isfinite(np.asarray(sampling_logits(logits, params)))[0]
    # The allowed set, computed by hand from the sorted probabilities.
    order = np.argsort(-np.asarray(logits[0]))
    probs = np.asarray(jax.nn.softmax(logits[0]))[order]
    k = params.top_k if params.top_k > 0 else 12
    want = np.zeros(12, bool)
    kept_k = order[:k]
    p_k = probs[:k] / probs[:k].sum()
    mass_before = np.cumsum(p_k) - p_k
    want[kept_k[mass_before < params.top_p]] = True
    np.testing.assert_array_equal(allowed, want)
    from atpo_jax.rollout.sampling import sample_next

    keys = jax.random.split(jax.random.key(1), 4000)
    tokens, _, _ = jax.jit(lambda k: sample_next(jnp.repeat(logits, 4000, 0), k, params))(keys)
    counts = np.bincount(np.asarray(tokens), minlength=12)
    assert counts[~want].sum() == 0
    assert np.all(counts[want] > 0)  # every allowed token shows up in 4000 draws
    # Frequencies follow the renormalised distribution (chi-square-ish bound).
    p = np.asarray(jax.nn.softmax(sampling_logits(logits, params)))[0]
    np.testing.assert_allclose(counts / 4000, p, atol=0.03)


def test_extend_then_generate_equals_prefill_of_the_concatenation(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call
    greedy = SamplingParams(temperature=0.0)
    a = make_engine(model, sampling=greedy)
    (slot,) = a.allocate(1)
    a.prefill(P, slot, [5, 9, 13])
    first = a.generate(P, [slot], [6], jax.random.key(0))[0].tokens
    a.extend(P, slot, [17, 18, 19, 20])  # e.g. a tool result
    after_extend = a.generate(P, [slot], [10], jax.random.key(0))[0].tokens

    b = make_engine(model, sampling=greedy)
    (slot_b,) = b.allocate(1)
    b.prefill(P, slot_b, [5, 9, 13] + first + [17, 18, 19, 20])
    assert b.generate(P, [slot_b], [10], jax.random.key(0))[0].tokens == after_extend
    # Prefill wrote 2 tokens (the last stays pending); extend wrote the pending generated token and
    # 3 of the 4 new ones: the prefix was not recomputed.
    assert a.prefill_tokens_computed == 2 + 4


def test_forked_slot_generates_like_a_fresh_prefill(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call
    greedy = SamplingParams(temperature=0.0)
    engine = make_engine(model, sampling=greedy)
    src, dst = engine.allocate(2)
    prompt = PROMPTS[3]
    engine.prefill(P, src, prompt)
    engine.generate(P, [src], [9], jax.random.key(0))
    prefix = engine.tokens(src)[:14]
    engine.fork(src, dst, 14)
    assert engine.tokens(dst) == prefix
    forked = engine.generate(P, [dst], [12], jax.random.key(0))[0].tokens
    fresh = make_engine(model, sampling=greedy)
    (slot,) = fresh.allocate(1)
    fresh.prefill(P, slot, prefix)
    assert fresh.generate(P, [slot], [12], jax.random.key(0))[0].tokens == forked


# --------------------------------------------------------------------- scripted model: stops, budgets

# Vocabulary of the scripted model: token i decodes to PIECES[i]; greedy decoding walks SUCCESSOR.
PIECES = [
    "<eos>",
    "Q",
    "the",
    " query",
    "</",
    "sear",
    "ch>",
    " tail",
    " more",
    "x</search>",
    " y",
    "z",
]
SUCCESSOR = [0, 2, 3, 4, 5, 6, 7, 8, 0, 10, 11, 11]


def scripted_engine(**kwargs):
    defaults = dict(
        num_slots=4,
        max_len=40,
        eos_token_ids=[0],
        sampling=SamplingParams(temperature=0.0),
        stop_strings=("</search>", "</python>"),
        decode=piece_decoder(PIECES),
        decode_chunk=4,
        kv_bucket=16,
    )
    defaults.update(kwargs)
    model = successor_model(SUCCESSOR)
    return Engine(model, **defaults), nnx.state(model)


def test_stop_string_split_over_several_tokens():
    engine, P = scripted_engine()
    (slot,) = engine.allocate(1)
    engine.prefill(P, slot, [1])  # Q -> the -> query -> "</" "sear" "ch>" -> tail -> more -> eos
    result = engine.generate(P, [slot], [20], jax.random.key(0))[0]
    assert result.tokens == [2, 3, 4, 5, 6]
    assert (result.finish_reason, result.stop_string) == ("stop", "</search>")
    assert engine.tokens(slot) == [1, 2, 3, 4, 5, 6]  # tokens after the stop were dropped
    # The slot continues from the stop: its cache holds exactly the kept tokens.
    engine.extend(P, slot, [10])
    assert engine.generate(P, [slot], [3], jax.random.key(0))[0].tokens == [11, 11, 11]


def test_matcher_finds_the_completing_token_however_the_string_is_split():
    matcher = StopStringMatcher(piece_decoder(PIECES), ["</search>", "</python>"])
    assert matcher.first_stop([2, 3, 4, 5, 6, 7]) == (5, "</search>")  # "</" "sear" "ch>"
    assert matcher.first_stop([2, 3, 9, 10]) == (3, "</search>")  # fused: "x</search>"
    assert matcher.first_stop([2, 3, 4, 5, 7]) is None  # "</sear tail": incomplete
    # Only text after `start` tokens is new: a stop string completed earlier is not re-reported
    # (the engine checks after every chunk, so an earlier stop would already have ended the turn).
    assert matcher.first_stop([9, 10, 11], start=1) is None


def test_stop_string_in_the_prompt_does_not_end_generation():
    engine, P = scripted_engine(stop_strings=("</search>",))
    (slot,) = engine.allocate(1)
    engine.prefill(P, slot, [2, 9, 10])  # the prompt contains "x</search>"; " y" -> z z z ...
    result = engine.generate(P, [slot], [5], jax.random.key(0))[0]
    assert result.tokens == [11] * 5 and result.finish_reason == "length"


def test_stop_inside_a_fused_token_ends_generation_after_that_token():
    succ = list(SUCCESSOR)
    succ[1] = 9  # Q -> "x</search>" -> " y" -> ...
    scripted = successor_model(succ)
    P = nnx.state(scripted)
    engine = Engine(
        scripted,
        num_slots=2,
        max_len=32,
        eos_token_ids=[0],
        sampling=SamplingParams(temperature=0.0),
        stop_strings=("</search>",),
        decode=piece_decoder(PIECES),
        decode_chunk=8,
    )
    (slot,) = engine.allocate(1)
    engine.prefill(P, slot, [1])
    result = engine.generate(P, [slot], [10], jax.random.key(0))[0]
    assert result.tokens == [9] and result.finish_reason == "stop"
    assert engine.tokens(slot) == [1, 9]


def test_budgets_are_per_slot_and_cache_overflow_ends_only_that_slot():
    engine, P = scripted_engine(max_len=12, stop_strings=())
    a, b, c = engine.allocate(3)
    engine.prefill_many(P, [a, b, c], [[10], [10], [10] * 8])  # " y" -> z z z ... (never stops)
    results = engine.generate(P, [a, b, c], [3, 7, 50], jax.random.key(0))
    assert [len(r.tokens) for r in results] == [3, 7, 4]  # c fills max_len = 12 after 4 tokens
    assert all(r.finish_reason == "length" for r in results)
    assert engine.tokens(c) == [10] * 8 + [11] * 4
    # The slots that did not overflow are intact: the same calls alone give the same tokens.
    solo, P = scripted_engine(max_len=12, stop_strings=())
    (s,) = solo.allocate(1)
    solo.prefill(P, s, [10])
    assert solo.generate(P, [s], [7], jax.random.key(0))[0].tokens == results[1].tokens


def test_eos_is_kept_and_ends_the_slot():
    engine, P = scripted_engine(stop_strings=())
    (slot,) = engine.allocate(1)
    engine.prefill(P, slot, [7])  # " tail" -> " more" -> <eos>
    result = engine.generate(P, [slot], [10], jax.random.key(0))[0]
    assert result.tokens == [8, 0] and result.finish_reason == "eos"


def test_compile_count_stays_small_across_a_tree_like_workload(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call

    def workload():
        engine = make_engine(model, num_slots=16, max_len=96)
        rng = np.random.default_rng(0)
        roots = engine.allocate(4)
        engine.prefill_many(P, roots, [rng.integers(1, VOCAB, n).tolist() for n in (5, 9, 12, 7)])
        for step in range(4):
            engine.generate(P, roots, [6] * 4, jax.random.key(step))
            engine.extend_many(P, roots, [rng.integers(1, VOCAB, 5).tolist() for _ in roots])
        branches = engine.allocate(4)
        engine.fork_many(roots, branches, [6, 8, 10, 7])
        engine.generate(P, branches + roots, [5] * 8, jax.random.key(9))
        return engine

    first = workload()
    before = first.compile_count
    assert 0 < before <= 16  # a few buckets, not one program per call (the workload makes 17)
    compiled = []
    listener = lambda event, seconds, **kw: compiled.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        engine = workload()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # A second identical rollout (e.g. the next training step, another engine) uses the same
    # programs and compiles nothing.
    assert engine.compile_count == before
    assert not [e for e in compiled if "backend_compile" in e], compiled
    # Programs a long generation needs: bounded by the buckets (batch x kv length).
    fresh = make_engine(model, num_slots=16, max_len=96, decode_chunk=16)  # new static arg
    roots = fresh.allocate(4)
    fresh.prefill_many(P, roots, [[1, 2, 3]] * 4)
    start = fresh.compile_count
    fresh.generate(P, roots, [60] * 4, jax.random.key(0))
    assert fresh.compile_count - start <= 4  # decode at kv 32/64/96 (+ nothing else new)


def test_bad_inputs_give_clear_errors(model):
    P = nnx.state(model)  # the policy's parameters, passed to every call
    engine = make_engine(model, num_slots=2, max_len=16)
    with pytest.raises(RuntimeError, match="num_slots"):
        engine.allocate(3)
    (slot,) = engine.allocate(1)
    with pytest.raises(ValueError, match="max_len"):
        engine.prefill(P, slot, list(range(1, 18)))
    with pytest.raises(ValueError, match="not allocated"):
        engine.generate(P, [1], [4], jax.random.key(0))
    with pytest.raises(ValueError, match="decode"):
        Engine(model, num_slots=1, max_len=8, eos_token_ids=[0], stop_strings=("</s>",))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_batch_buckets_are_powers_of_two_below_64_rows_then_quarter_octaves():
    # Powers of two up to 64, then multiples of an eighth of the next power of two.
    assert [batch_bucket(r) for r in (1, 2, 3, 5, 8, 9, 17, 33, 46, 64)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        32,
        64,
        64,
        64,
    ]
    assert [batch_bucket(r) for r in (65, 81, 100, 128, 129, 184, 250)] == [
        80,
        96,
        112,
        128,
        160,
        192,
        256,
    ]
    rows = np.arange(1, 2049)
    buckets = np.array([batch_bucket(r) for r in rows])
    assert np.all(buckets >= rows) and np.all(np.diff(buckets) >= 0)
    assert np.all((buckets[rows <= 64] & (buckets[rows <= 64] - 1)) == 0)  # powers of two
    assert np.max((buckets - rows)[rows > 64] / buckets[rows > 64]) < 0.25
    assert len(set(buckets[(rows > 256) & (rows <= 512)].tolist())) == 4  # one octave
