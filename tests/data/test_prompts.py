"""The instruction prompt and its chat-template rendering (ALGORITHM.md §1.1, DESIGN.md §9)."""

import pytest

from atpo_jax.data import (
    PAPER_INSTRUCTION,
    SHORT_INSTRUCTION,
    build_messages,
    encode_prompt,
    normalize_question,
    render_prompt,
)


def test_question_normalisation():
    assert normalize_question("  who wrote Hamlet \n") == "who wrote Hamlet?"
    assert normalize_question("Is it?") == "Is it?"
    with pytest.raises(ValueError, match="empty question"):
        normalize_question("   ")


def test_one_system_message_with_the_user_line():
    messages = build_messages(" who wrote Hamlet", "paper")
    assert messages == [
        {"role": "system", "content": PAPER_INSTRUCTION + "\nuser\nwho wrote Hamlet?"}
    ]


def test_paper_instruction_has_the_reference_structure_and_a_real_backslash():
    text = PAPER_INSTRUCTION
    assert "\x08" not in text  # the reference's f-string bug turned \b into a backspace
    assert text.count("\\boxed{") == 2 and "\\[ \\boxed{answer here} \\]" in text
    assert "<result> search result here </result>  <think>" in text  # the double space is kept
    for tag in (
        "<think> </think>",
        "<answer> </answer>",
        "<search> </search>",
        "<result> </result>",
    ):
        assert tag in text
    order = [
        text.index(t)
        for t in ("<search> search query", "<result> search result", "<answer> The final")
    ]
    assert order == sorted(order)


def test_short_instruction_mentions_every_tag():
    for tag in (
        "<think>",
        "</think>",
        "<search>",
        "</search>",
        "<result>",
        "</result>",
        "<answer>",
        "\\boxed{",
    ):
        assert tag in SHORT_INSTRUCTION


def test_render_through_chat_template(world_tokenizer):
    messages = build_messages("In which country is Foo", "short")
    text = render_prompt(world_tokenizer, messages)
    assert text == (
        "<|im_start|>system\n" + SHORT_INSTRUCTION + "\nuser\nIn which country is Foo?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = encode_prompt(world_tokenizer, messages)
    tokens = world_tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:2] == ["<|im_start|>", "system"] and tokens[-2:] == ["<|im_start|>", "assistant"]
    assert tokens.count("<|im_end|>") == 1
    with pytest.raises(ValueError, match="max_prompt_length=10"):
        encode_prompt(world_tokenizer, messages, max_length=10)


def test_tokenizer_without_template_is_a_clear_error():
    class Bare:
        chat_template = None
        name_or_path = "bare-model"

    with pytest.raises(ValueError, match="'bare-model' has no chat template"):
        render_prompt(Bare(), build_messages("q"))


def test_unknown_style():
    with pytest.raises(ValueError, match="unknown prompt style 'long'"):
        build_messages("q", "long")
