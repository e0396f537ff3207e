"""The paged KV cache: decoding equals the full forward pass across page boundaries, after forks,
extends and truncations, with pages shared by many forks and freed in any order; reference
counts never leak; a full pool makes rows wait and they finish the same; stops end rows on
device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atpo_jax import models
from atpo_jax.rollout.engine import Engine
from atpo_jax.rollout.pages import KVPoolExhausted, PageAllocator
from atpo_jax.rollout.sampling import SamplingParams
from tests.rollout.scripted import piece_decoder, successor_model

VOCAB = 61
PAGE = 4  # small pages: every test crosses several page boundaries


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
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 15.0  # clear-cut greedy choices
    return model


def make_engine(model, **kwargs):
    defaults = dict(
        num_slots=8, max_len=64, eos_token_ids=[0], decode_chunk=6, kv_bucket=8, page_size=PAGE
    )
    defaults.update(kwargs)
    return Engine(model, **defaults)


@jax.jit
def _log_softmax_all(state, graphdef, ids, length):
    model = nnx.merge(graphdef, state)
    mask = (jnp.arange(ids.shape[1]) < length)[None].astype(jnp.int32)
    return jax.nn.log_softmax(model(ids, mask)[0].astype(jnp.float32), axis=-1)


def full_forward_log_probs(model, sequence, width=64):
    """log p(sequence[i] | sequence[:i]) for every i >= 1 from one full forward pass (no cache)."""
    graphdef, state = nnx.split(model)
    ids = jnp.asarray([list(sequence) + [0] * (width - len(sequence))])
    table = np.asarray(_log_softmax_all(state, graphdef, ids, len(sequence)))
    return np.array([table[i - 1, sequence[i]] for i in range(1, len(sequence))])


def greedy_reference(model, prompt, steps, width=64):
    """Step-by-step argmax of the full forward pass."""
    graphdef, state = nnx.split(model)
    seq, out = list(prompt), []
    for _ in range(steps):
        ids = jnp.asarray([seq + [0] * (width - len(seq))])
        token = int(np.argmax(_log_softmax_all(state, graphdef, ids, len(seq))[len(seq) - 1]))
        out.append(token)
        seq.append(token)
        if token == 0:
            break
    return out


def held_pages(engine):
    """Distinct pages the engine's live sequences hold, and each page's number of holders."""
    holders = {}
    for slot in range(engine.num_slots):
        if engine._seqs[slot] is not None:
            for page in engine.page_list(slot):
                holders[page] = holders.get(page, 0) + 1
    return holders


def assert_counts_consistent(engine):
    holders = held_pages(engine)
    assert engine.pages.used == len(holders)
    for page, count in holders.items():
        assert engine.pages.refs(page) == count


PROMPTS = [[5, 9, 13], [7, 1, 22, 40, 3, 8, 11], [30], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 21]]


def test_sampled_log_probs_match_the_full_forward_across_pages(model):
    P = nnx.state(model)
    engine = make_engine(model)
    slots = engine.allocate(len(PROMPTS))
    engine.prefill_many(P, slots, PROMPTS)
    results = engine.generate(P, slots, [17, 9, 23, 13], jax.random.key(4))
    for slot, prompt, result in zip(slots, PROMPTS, results, strict=True):
        seq = engine.tokens(slot)
        assert seq == prompt + result.tokens
        want = full_forward_log_probs(model, seq)[len(prompt) - 1 :]
        np.testing.assert_allclose(result.log_probs, want, rtol=1e-5, atol=1e-5)
        # Pages: exactly those the cached positions (all but the pending token) need.
        assert len(engine.page_list(slot)) == -(-(len(seq) - 1) // PAGE)
    assert_counts_consistent(engine)
    engine.release(slots)
    assert engine.pages.used == 0


def test_greedy_equals_the_full_forward_argmax(model):
    P = nnx.state(model)
    engine = make_engine(model, sampling=SamplingParams(temperature=0.0))
    slots = engine.allocate(len(PROMPTS))
    engine.prefill_many(P, slots, PROMPTS)
    results = engine.generate(P, slots, [20] * len(slots), jax.random.key(0))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.tokens == greedy_reference(model, prompt, 20)


def test_forks_share_full_pages_copy_the_partial_one_and_generate_like_fresh_prefills(model):
    P = nnx.state(model)
    greedy = SamplingParams(temperature=0.0)
    engine = make_engine(model, sampling=greedy, num_slots=12)
    (src,) = engine.allocate(1)
    engine.prefill(P, src, PROMPTS[3])  # 11 tokens: 10 cached = pages 4 + 4 + 2
    source_pages = engine.page_list(src)
    assert len(source_pages) == 3
    forks = engine.allocate(6)
    lengths = [11, 9, 9, 5, 2, 11]  # 10 cached (partial), 8 (page boundary), 4, 1 cached
    engine.fork_many([src] * 6, forks, lengths)
    for dst, length in zip(forks, lengths, strict=True):
        cached = length - 1
        pages = engine.page_list(dst)
        full = cached // PAGE
        assert pages[:full] == source_pages[:full]  # shared by reference
        if cached % PAGE:
            assert len(pages) == full + 1 and pages[-1] not in source_pages  # a private copy
        else:
            assert len(pages) == full  # a page boundary copies nothing
    # The source and the five forks with at least one full page; the 1-position fork copies it.
    assert engine.pages.refs(source_pages[0]) == 6
    assert_counts_consistent(engine)
    # Every fork (and the source) then generates what a fresh prefill of its prefix generates.
    rows = [src] + forks
    prefixes = [engine.tokens(s) for s in rows]
    results = engine.generate(P, rows, [10] * len(rows), jax.random.key(0))
    for prefix, result in zip(prefixes, results, strict=True):
        assert result.tokens == greedy_reference(model, prefix, 10)
    assert_counts_consistent(engine)
    # Free in a scrambled order: counts stay consistent and the pool ends empty.
    for slot in np.random.default_rng(0).permutation(rows).tolist():
        engine.release(slot)
        assert_counts_consistent(engine)
    assert engine.pages.used == 0


def test_truncating_into_a_shared_page_copies_it_before_writing(model):
    P = nnx.state(model)
    engine = make_engine(model, sampling=SamplingParams(temperature=0.0))
    src, dst = engine.allocate(2)
    engine.prefill(P, src, PROMPTS[3] + [25])  # 12 tokens: 11 cached, pages 4 + 4 + 3
    engine.fork(src, dst, 10)  # 9 cached: two shared pages and a copy
    shared = engine.page_list(dst)[1]
    engine.truncate(src, 6)  # 5 cached: the source's last page is the shared, now partial page 2
    assert engine.page_list(src)[-1] == shared and engine.pages.refs(shared) == 2
    engine.extend(P, src, [33, 34, 35])  # writes into page 2: it must be copied first
    assert engine.page_list(src)[-1] != shared and engine.pages.refs(shared) == 1
    fork_prefix, src_prefix = engine.tokens(dst), engine.tokens(src)
    results = engine.generate(P, [dst, src], [8, 8], jax.random.key(0))
    assert results[0].tokens == greedy_reference(model, fork_prefix, 8)
    assert results[1].tokens == greedy_reference(model, src_prefix, 8)
    assert_counts_consistent(engine)


def test_a_full_pool_makes_rows_wait_and_they_finish_the_same(model):
    P = nnx.state(model)
    prompts = PROMPTS + [[3, 3, 3, 3, 3], [44, 2]]  # cached 2, 6, 0, 10, 4, 1: 8 pages
    budgets = [6] * len(prompts)  # one 6-step chunk each
    keys = jax.random.split(jax.random.key(9), len(prompts))

    roomy = make_engine(model)
    slots = roomy.allocate(len(prompts))
    roomy.prefill_many(P, slots, prompts)
    want = roomy.generate(P, slots, budgets, keys)

    # 12 usable pages: the prompts take 8 and a 6-token chunk needs 1, 1, 2, 1, 2, 1 more, so
    # only the first three rows run.
    tight = make_engine(model, kv_pages=13)
    slots = tight.allocate(len(prompts))
    tight.prefill_many(P, slots, prompts)
    turns = [tight.start_turn(s, b, k) for s, b, k in zip(slots, budgets, keys, strict=True)]
    ran = tight.decode_step(P, turns)
    assert [t.slot for t in ran] == slots[:3] and tight.pages.waits > 0
    waiting = [t for t in turns if t not in ran]
    for turn in waiting:  # untouched: no tokens, the prompt's pages only
        assert turn.generation.tokens == [] and tight.tokens(turn.slot) == prompts[turn.slot]
    assert_counts_consistent(tight)
    # The rows that ran are done and leave; the waiting ones then run and finish as in the roomy
    # pool.
    assert all(t.done for t in ran)
    for turn in ran:
        assert turn.generation.tokens == want[turn.slot].tokens
        tight.release(turn.slot)
    assert tight.decode_step(P, waiting) == waiting and all(t.done for t in waiting)
    for turn in waiting:
        a, b = want[turn.slot], turn.generation
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.log_probs, b.log_probs, rtol=1e-5, atol=1e-6)
    tight.release([t.slot for t in waiting])
    assert tight.pages.used == 0

    # generate holds every row's pages to the end: a pool too small for that says what to raise.
    small = make_engine(model, kv_pages=13)
    slots = small.allocate(len(prompts))
    small.prefill_many(P, slots, prompts)
    with pytest.raises(KVPoolExhausted, match="rollout.kv_pages"):
        small.generate(P, slots, budgets, keys)
    assert_counts_consistent(small)
    # A pool that cannot hold the prompts refuses before changing anything.
    tiny = make_engine(model, kv_pages=4)
    slots = tiny.allocate(2)
    with pytest.raises(KVPoolExhausted, match="rollout.kv_pages"):
        tiny.prefill_many(P, slots, [PROMPTS[3], PROMPTS[1]])  # 3 + 2 pages > 3
    assert tiny.pages.used == 0 and tiny.tokens(slots[0]) == []


def test_page_allocator_counts_and_refuses_cleanly():
    pool = PageAllocator(5)
    a = pool.allocate(2)
    assert 0 not in a and pool.used == 2
    pool.share(a)
    pool.release(a)
    assert pool.used == 2  # still held once
    with pytest.raises(KVPoolExhausted):
        pool.allocate(3)
    assert pool.used == 2 and pool.waits == 1
    pool.release(a)
    pool.check_empty()
    with pytest.raises(ValueError, match="released more often"):
        pool.release(a[:1])


# --------------------------------------------------------------------- stops on device

STOP_PIECES = ["<eos>", "Q", "the", " query", "</", "sear", "ch>", " tail", " more", "x", "y"]
# Q -> the -> query -> "</" "sear" "ch>" -> tail -> more -> x -> y -> y -> ...
STOP_SUCCESSOR = [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]


@pytest.mark.parametrize("device_stops", [True, False])
def test_a_stop_string_ends_the_row_inside_the_decode_loop(device_stops):
    model = successor_model(STOP_SUCCESSOR)
    engine = Engine(
        model,
        num_slots=2,
        max_len=64,
        eos_token_ids=[0],
        stop_strings=["</search>"],
        decode=piece_decoder(STOP_PIECES),
        decode_chunk=32,
        kv_bucket=16,
        sampling=SamplingParams(temperature=0.0),
        device_stops=device_stops,
    )
    P = nnx.state(model)
    (slot,) = engine.allocate(1)
    engine.prefill(P, slot, [1])
    result = engine.generate(P, [slot], [40], jax.random.key(0))[0]
    # Either way the turn ends at the token completing the stop string; on device the loop stops
    # there too, instead of decoding to the end of the 32-step chunk.
    assert result.tokens == [2, 3, 4, 5, 6] and result.finish_reason == "stop"
    assert engine.tokens(slot) == [1, 2, 3, 4, 5, 6]
    steps_run = engine.counters.row_steps_run
    assert steps_run == (5 if device_stops else 32)


def test_page_read_counters_match_a_step_by_step_count(model):
    """``kv_pages_read`` counts each row's pages at each of its steps; ``kv_pages_read_once``
    counts a page once per step while any row holding it runs (a NumPy loop over steps here)."""
    engine = make_engine(model, num_slots=8, max_len=64, decode_chunk=5)
    params = nnx.state(model)
    slots = engine.allocate(4)
    engine.prefill(params, slots[0], list(range(1, 14)))  # 13 tokens: 3 full pages + 1 partial
    engine.fork_many([slots[0]] * 3, slots[1:], [13, 13, 9])  # one fork ends inside page 3
    seen = []
    count = engine._count_page_reads

    def record(table, steps):
        seen.append((table.copy(), np.asarray(steps).copy()))
        count(table, steps)

    engine._count_page_reads = record
    keys = jax.random.split(jax.random.key(0), 4)
    budgets = [5, 2, 5, 3]  # rows stop at different steps
    engine.generate(params, slots, budgets, keys)
    want_rows = want_once = 0
    for table, steps in seen:
        for t in range(int(steps.max(initial=0))):
            running = [i for i in range(len(steps)) if steps[i] > t]
            pages = [set(table[i][table[i] != 0].tolist()) for i in running]
            want_rows += sum(len(p) for p in pages)
            want_once += len(set().union(*pages))
    assert engine.counters.kv_pages_read == want_rows
    assert engine.counters.kv_pages_read_once == want_once
    assert want_once < want_rows  # the forks share the prompt's full pages
    engine.release(slots)
