"""The engine's incremental stop-string check under Qwen3 BPE equals a full re-decode, whatever
the chunking and whatever BPE fused the tag with (``</`` after a space or a brace, ``>\\n\\n``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from atpo_jax.rollout.stop import StopStringMatcher
from tests.fidelity.test_token_fidelity import AFTER_TAG, TEXT, split_encode

STOPS = ("</search>", "</python>")


def reference_stop(tok, ids, start):
    """First n > start with a new stop string in decode(ids[:n]) (vLLM's rule, re-decoding all)."""
    before = [tok.decode(ids[:start]).count(s) for s in STOPS]
    for n in range(start + 1, len(ids) + 1):
        text = tok.decode(ids[:n])
        for s, c in zip(STOPS, before, strict=True):
            if text.count(s) > c:
                return n, s
    return None


@settings(max_examples=40)
@given(
    st.lists(st.tuples(TEXT, st.sampled_from(["", *STOPS]), AFTER_TAG), min_size=1, max_size=4),
    st.lists(st.integers(0, 99), max_size=4),
    st.integers(1, 9),
)
def test_incremental_matches_full_decode(qwen3_tokenizer, parts, cuts, chunk):
    tok = qwen3_tokenizer
    ids = split_encode(tok, "".join(a + b + c for a, b, c in parts), cuts)
    matcher = StopStringMatcher(tok.decode, STOPS)
    # As Engine.generate: check after every chunk, from where the previous check ended; the first
    # chunk's context (ids before 'prompt_end') is text the engine did not generate.
    prompt_end = min(len(ids), chunk)
    want = reference_stop(tok, ids, prompt_end)
    got, checked = None, prompt_end
    for end in range(prompt_end + chunk, len(ids) + chunk, chunk):
        got = matcher.first_stop(ids[: min(end, len(ids))], checked)
        checked = min(end, len(ids))
        if got is not None:
            break
    assert got == want
