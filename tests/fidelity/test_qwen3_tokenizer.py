"""The built tokenizer is Qwen3's: known facts of the published vocabulary."""

from __future__ import annotations

import json
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fidelity.qwen3_tokenizer import ADDED_TOKENS, NUM_RANKS


def test_added_tokens_have_their_published_ids(qwen3_tokenizer):
    tok = qwen3_tokenizer
    assert len(tok) == NUM_RANKS + len(ADDED_TOKENS) == 151669
    for token_id, content, _ in ADDED_TOKENS:
        assert tok.encode(content, add_special_tokens=False) == [token_id]
        assert tok.convert_ids_to_tokens(token_id) == content
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    # <think> / </think> are added but not special: a decode that skips special tokens keeps them.
    assert tok.decode([151667, 151644], skip_special_tokens=True) == "<think>"


def test_merges_and_known_encodings(qwen3_dir, qwen3_tokenizer):
    with open(os.path.join(qwen3_dir, "tokenizer.json")) as f:
        model = json.load(f)["model"]
    assert len(model["merges"]) == NUM_RANKS - 256 == 151387
    tok = qwen3_tokenizer
    assert tok.encode("hello world", add_special_tokens=False) == [14990, 1879]
    # The tags merge with their neighbours: what the rollout's stop handling must survive.
    assert tok.convert_ids_to_tokens(tok.encode("</search>\n\n", add_special_tokens=False)) == [
        "</",
        "search",
        ">ĊĊ",
    ]
    assert tok.convert_ids_to_tokens(tok.encode("}</answer>", add_special_tokens=False))[0] == "}</"


def test_chat_template_thinking_on_and_off(qwen3_tokenizer):
    messages = [{"role": "system", "content": "S"}]
    on = qwen3_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert on == "<|im_start|>system\nS<|im_end|>\n<|im_start|>assistant\n"
    off = qwen3_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert off == on + "<think>\n\n</think>\n\n"


@settings(max_examples=40)
@given(st.text(min_size=0, max_size=60))
def test_unicode_round_trip(qwen3_tokenizer, text):
    import unicodedata

    # The normalizer is NFC (as Qwen's), so the round trip holds for NFC text.
    text = unicodedata.normalize("NFC", text)
    ids = qwen3_tokenizer.encode(text, add_special_tokens=False)
    assert qwen3_tokenizer.decode(ids) == text
