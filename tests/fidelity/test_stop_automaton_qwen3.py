"""The stop automaton over Qwen3's full vocabulary (151,936 rows, byte-level BPE): built fast, and
it stops where the decoded-text matcher stops on tags tokenised by the real tokenizer, canonically,
piece by piece or one character at a time, fused with the text around them."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atpo_jax.rollout.stop import StopStringMatcher
from atpo_jax.rollout.stop_automaton import StopAutomaton, advance, token_texts_from
from tests.fidelity.qwen3_tokenizer import ADDED_TOKENS, QWEN3_VOCAB_ROWS
from tests.fidelity.test_token_fidelity import AFTER_TAG, TEXT, split_encode

# The tool tags, and a tag that is one added token in Qwen3's vocabulary.
STOPS = ("</search>", "</python>", "</answer>", "</tool_call>")


@pytest.fixture(scope="module")
def texts(qwen3_tokenizer):
    return token_texts_from(qwen3_tokenizer, QWEN3_VOCAB_ROWS)


@pytest.fixture(scope="module")
def automaton(texts):
    start = time.perf_counter()
    auto = StopAutomaton.build(texts, STOPS, vocab_size=QWEN3_VOCAB_ROWS)
    seconds = time.perf_counter() - start
    assert seconds < 10.0, f"building the Qwen3 stop automaton took {seconds:.1f} s"
    return auto


def matcher_result(tok, ids):
    found = StopStringMatcher(tok.decode, STOPS).first_stop(ids, 0)
    return None if found is None else (found[0], STOPS.index(found[1]))


def test_table_covers_the_padded_vocabulary(qwen3_tokenizer, texts, automaton):
    # Live states: the root, "<", "</", then 6 + 6 + 6 + 9 letters of the four tags before '>'.
    assert automaton.num_live == 3 + 6 + 6 + 6 + 9
    assert automaton.table.shape == (automaton.num_live + 4, QWEN3_VOCAB_ROWS)
    assert automaton.table.dtype == np.int16
    # batch_decode gives what the engine's per-call decode gives, special tokens included; the
    # padded embedding rows past the tokenizer decode to nothing and leave the state alone.
    rng = np.random.default_rng(0)
    sample = [
        *rng.integers(0, len(qwen3_tokenizer), 500).tolist(),
        *(i for i, _, _ in ADDED_TOKENS),
    ]
    assert [texts[i] for i in sample] == [qwen3_tokenizer.decode([i]) for i in sample]
    assert set(texts[len(qwen3_tokenizer) :]) == {""}
    padded = automaton.table[: automaton.num_live, len(qwen3_tokenizer) :]
    np.testing.assert_array_equal(
        padded, np.broadcast_to(np.arange(automaton.num_live)[:, None], padded.shape)
    )


def test_planted_tags_by_hand(qwen3_tokenizer, automaton):
    tok = qwen3_tokenizer
    tool_call = tok.encode("</tool_call>", add_special_tokens=False)
    assert len(tool_call) == 1  # an added token: the whole tag in one id
    for text, k in [("query</search>", 0), ("x = 1</python>", 1), (" 42 </answer>", 2)]:
        canonical = tok.encode(text, add_special_tokens=False)
        chars = [i for c in text for i in tok.encode(c, add_special_tokens=False)]
        for ids in (canonical, chars, canonical + tool_call):
            # The tag ends the text, so the completing token is the last of the text's tokens.
            n = len(canonical) if ids is not chars else len(chars)
            assert automaton.first_stop(ids) == (n, k)
        # Fused with what follows ("</search>\n\n" may be one piece), it stops inside that token.
        fused = tok.encode(text + "\n\nmore", add_special_tokens=False)
        assert automaton.first_stop(fused) == matcher_result(tok, fused)
        assert automaton.first_stop(fused)[1] == k
    assert automaton.first_stop(tool_call) == (1, 3)
    prefix = tok.encode("</sea</searc", add_special_tokens=False)
    assert automaton.first_stop(prefix) is None
    rest = tok.encode("h>", add_special_tokens=False)
    assert automaton.first_stop(prefix + rest) == (len(prefix) + len(rest), 0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(TEXT, st.sampled_from(["", "", *STOPS]), AFTER_TAG), min_size=1, max_size=4),
    st.lists(st.integers(0, 99), max_size=5),
)
def test_random_turns_match_the_text_matcher(qwen3_tokenizer, automaton, parts, cuts):
    tok = qwen3_tokenizer
    # Canonical or piece-by-piece BPE; TEXT's multi-byte characters give partial-UTF-8 tokens.
    ids = split_encode(tok, "".join(a + b + c for a, b, c in parts), cuts)
    assert automaton.first_stop(ids) == matcher_result(tok, ids)


def test_advance_on_the_qwen3_table(qwen3_tokenizer, automaton):
    tok = qwen3_tokenizer
    rows = [
        "a query</search> and more",
        "print(1)</python>\n\n",
        "<answer> \\boxed{日本} </answer>",
        "no tag here </sea rch>",
    ]
    ids = [tok.encode(r, add_special_tokens=False) for r in rows]
    width = max(map(len, ids))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    tokens = np.array([r + [eos] * (width - len(r)) for r in ids], np.int32)
    step = jax.jit(advance)
    table, accepts = jnp.asarray(automaton.table), jnp.asarray(automaton.accepts)
    state = jnp.zeros((len(rows),), jnp.int32)
    first = [None] * len(rows)
    for t in range(width):
        state, stopped, which = step(table, accepts, state, jnp.asarray(tokens[:, t]))
        for b in np.flatnonzero(np.asarray(stopped)):
            first[b] = first[b] or (t + 1, int(which[b]))
    assert first == [matcher_result(tok, r) for r in tokens.tolist()]
    assert [f and f[1] for f in first] == [0, 1, 2, None]
