"""The token-level stop automaton agrees with the decoded-text matcher (``StopStringMatcher``) on
the first completing token and the stop string it reports, however the strings are tokenised."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atpo_jax.rollout.stop import StopStringMatcher
from atpo_jax.rollout.stop_automaton import StopAutomaton, advance, token_texts_from
from tests.rollout.scripted import PieceTokenizer, piece_decoder

TAGS = ("</search>", "</python>", "</answer>")
# Single characters (every stop string can be spelt one character per token), fragments that
# split the tags at every kind of boundary, tags glued to text, and two tags in one token.
PIECES = [
    "<|end|>", *"</>searchpytonwx \n", "é", "\ufffd", "",
    "</", "sea", "rch>", "</sea", "search", "</search>", "</python>", "</answer>", "answer",
    "x</search>", "</search>\n\n", "h></", "></python", "</python></search>", "</answer></python>",
    "n>", "ch>", "</s", "on>", "er>", "<search>", "</sea</search>", "x</", "pyth",
]  # fmt: skip
TOKENIZER = PieceTokenizer(PIECES, eos=0)
CHAR = {p: i for i, p in enumerate(PIECES) if len(p) == 1}
# Text the planted strings sit in: partial tags and lookalikes as well as plain text.
FILLER = st.lists(
    st.sampled_from(["x", " ", "\n", "é", "<", "</", "</sea", "</pyth", "search", "answer", "n>"]),
    max_size=6,
).map("".join)


def matcher_result(decode, stops, ids):
    """The matcher's answer as (n, stop index), the automaton's format."""
    found = StopStringMatcher(decode, stops).first_stop(ids, 0)
    return None if found is None else (found[0], stops.index(found[1]))


def split_encode(text: str, cuts: list[int]) -> list[int]:
    """``text`` encoded piece by piece between the cuts (a non-canonical tokenisation)."""
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    ids: list[int] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        ids += TOKENIZER.encode(text[a:b])
    return ids


def test_table_of_a_small_vocabulary_by_hand():
    vocab = ["a", "<", "/", "x", ">", "x>", "</x>", "b</x>c", ""]
    auto = StopAutomaton.build(vocab, ["</x>"])
    # Live states in BFS order: "" (0), "<" (1), "</" (2), "</x" (3); 4 = "</x>" completed.
    want = [
        [0, 1, 0, 0, 0, 0, 4, 4, 0],
        [0, 1, 2, 0, 0, 0, 4, 4, 1],
        [0, 1, 0, 3, 0, 4, 4, 4, 2],
        [0, 1, 0, 0, 4, 0, 4, 4, 3],
        [4] * 9,  # absorbing
    ]
    np.testing.assert_array_equal(auto.table, want)
    assert auto.table.dtype == np.int16 and auto.num_live == 4
    np.testing.assert_array_equal(auto.accepts, [-1, -1, -1, -1, 0])
    assert auto.first_stop([1, 2, 3, 4]) == (4, 0)  # "<" "/" "x" ">"
    assert auto.first_stop([1, 2, 5, 0]) == (3, 0)  # "<" "/" "x>"
    assert auto.first_stop([0, 7]) == (2, 0)  # completed in the middle of "b</x>c"
    assert auto.first_stop([1, 2, 8, 3, 3, 4]) is None  # "</" "" "x" "x" ">"
    assert auto.first_stop([4], state=3) == (1, 0)  # resumed after "</x"
    assert auto.first_stop([0], state=4) == (0, 0)  # already stopped


def test_two_stops_in_one_token_report_the_first_in_stop_strings_order():
    both = PIECES.index("</python></search>")  # "</python>" ends first in the text
    for stops in [("</search>", "</python>"), ("</python>", "</search>")]:
        auto = StopAutomaton.build(PIECES, stops)
        assert auto.first_stop([both]) == (1, 0)  # index 0 in either order, as the matcher
        assert matcher_result(TOKENIZER.decode, stops, [both]) == (1, 0)
    auto = StopAutomaton.build(PIECES, TAGS)
    # A stop string that is a suffix of another completes with it: the lower index wins.
    suffix = StopAutomaton.build(PIECES, ("ch>", "</search>"))
    assert suffix.first_stop([PIECES.index("</search>")]) == (1, 0)
    assert suffix.first_stop([CHAR["c"], CHAR["h"], CHAR[">"]]) == (3, 0)
    # "</sea" then "</search>" spelt out: the failed prefix does not hide the real one.
    ids = [CHAR[c] for c in "</sea</search>"]
    assert auto.first_stop(ids) == (14, 0)
    assert auto.first_stop([PIECES.index("</sea</search>")]) == (1, 0)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(FILLER, st.sampled_from(["", "", *TAGS]), FILLER), min_size=1, max_size=4),
    st.lists(st.integers(0, 200), max_size=5),
    st.sampled_from(["greedy", "chars", "cuts"]),
    st.permutations(TAGS),
    st.integers(1, 3),
)
def test_planted_tags_match_the_text_matcher(parts, cuts, split, order, how_many):
    stops = tuple(order[:how_many])
    text = "".join(a + b + c for a, b, c in parts)
    if split == "greedy":
        ids = TOKENIZER.encode(text)  # longest match: fuses tags with what surrounds them
    elif split == "chars":
        ids = [CHAR[c] for c in text]
    else:
        ids = split_encode(text, cuts)
    auto = StopAutomaton.build(token_texts_from(TOKENIZER, len(PIECES)), stops)
    got = auto.first_stop(ids)
    assert got == matcher_result(TOKENIZER.decode, stops, ids)
    assert got == matcher_result(piece_decoder(PIECES), stops, ids)
    # The stop is where the text says it is: the first stop string occurring in the decoded text.
    ends = [(text.find(s) + len(s), k) for k, s in enumerate(stops) if s in text]
    assert (got is None) == (not ends)
    if split == "chars" and ends:  # one character per token: the token count is the text offset
        end = min(e for e, _ in ends)
        assert got == (end, min(k for e, k in ends if e == end))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text("ab</", max_size=4), min_size=1, max_size=12),
    st.lists(st.text("ab</", min_size=1, max_size=3), min_size=1, max_size=4),
    st.data(),
)
def test_random_vocabularies_and_stop_sets_match_the_text_matcher(vocab, stops, data):
    # A tiny alphabet makes overlapping, nested and self-overlapping stop strings common.
    ids = data.draw(st.lists(st.integers(0, len(vocab) - 1), max_size=20))
    auto = StopAutomaton.build(vocab, stops)
    assert auto.first_stop(ids) == matcher_result(piece_decoder(vocab), tuple(stops), ids)


@pytest.mark.parametrize("jit", [False, True])
def test_advance_step_by_step_equals_the_host_walk(jit):
    auto = StopAutomaton.build(PIECES, TAGS)
    rng = np.random.default_rng(0)
    batch, steps = 16, 24
    # Pieces without a whole tag (fragments can still spell one), and a whole-tag piece planted
    # at a random step in half of the rows, so rows stop at different steps or not at all.
    whole = [i for i, p in enumerate(PIECES) if any(t in p for t in TAGS)]
    partial = [i for i in range(len(PIECES)) if i not in whole]
    tokens = rng.choice(partial, (batch, steps)).astype(np.int32)
    planted = np.arange(batch // 2)
    tokens[planted, rng.integers(0, steps, planted.size)] = rng.choice(whole, planted.size)
    step_fn = jax.jit(advance) if jit else advance
    table, accepts = jnp.asarray(auto.table), jnp.asarray(auto.accepts)
    state = jnp.zeros((batch,), jnp.int32)
    first = np.full(batch, -1)
    which_at_stop = np.full(batch, -1)
    host_state = np.zeros(batch, np.int64)
    for t in range(steps):
        state, stopped, which = step_fn(table, accepts, state, jnp.asarray(tokens[:, t]))
        state, stopped, which = np.asarray(state), np.asarray(stopped), np.asarray(which)
        host_state = auto.table[host_state, tokens[:, t]]
        np.testing.assert_array_equal(state, host_state)
        assert state.dtype == np.int32 and stopped.dtype == bool
        # Once stopped, a row stays stopped on the same string.
        assert ((first < 0) | stopped).all() and ((first < 0) | (which == which_at_stop)).all()
        new = stopped & (first < 0)
        first[new], which_at_stop[new] = t, which[new]
        np.testing.assert_array_equal(which >= 0, stopped)
    for b in range(batch):
        want = matcher_result(TOKENIZER.decode, TAGS, tokens[b].tolist())
        assert auto.first_stop(tokens[b].tolist()) == want
        assert (None if first[b] < 0 else (first[b] + 1, which_at_stop[b])) == want
    assert 0 < (first >= 0).sum() < batch  # the stream exercised both outcomes


def test_token_texts_from_a_decode_callable_and_a_batch_decoder():
    assert token_texts_from(TOKENIZER, len(PIECES)) == PIECES  # decode([t]) per id

    class Batched:
        def batch_decode(self, ids, skip_special_tokens):
            assert not skip_special_tokens  # special tokens must stay visible
            return [PIECES[i[0]] for i in ids]

    assert token_texts_from(Batched(), len(PIECES)) == PIECES


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="stop_strings is empty"):
        StopAutomaton.build(PIECES, [])
    with pytest.raises(ValueError, match=r"stop_strings\[1\] = ''"):
        StopAutomaton.build(PIECES, ["</search>", ""])
    with pytest.raises(ValueError, match="sequence of strings"):
        StopAutomaton.build(PIECES, "</search>")
    with pytest.raises(ValueError, match="vocab_size 64"):
        StopAutomaton.build(PIECES, TAGS, vocab_size=64)
    with pytest.raises(ValueError, match="token_texts is empty"):
        StopAutomaton.build([], TAGS)
    with pytest.raises(ValueError, match=r"token_texts\[2\] is int"):
        StopAutomaton.build(["a", "b", 3], TAGS)
    auto = StopAutomaton.build(PIECES, TAGS)
    with pytest.raises(ValueError, match=rf"\[0, {len(PIECES)}\)"):
        auto.first_stop([1, len(PIECES)])
    with pytest.raises(ValueError, match="state 99"):
        auto.first_stop([1], state=99)
    table, accepts = jnp.asarray(auto.table), jnp.asarray(auto.accepts)
    with pytest.raises(ValueError, match="both be"):
        advance(table, accepts, jnp.zeros((4,), jnp.int32), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="accepts must be"):
        advance(table, accepts[:-1], jnp.zeros((4,), jnp.int32), jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="vocab_size must be"):
        token_texts_from(TOKENIZER, 0)
