"""Tokenizer loading from a local directory, with its chat template."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from atpo_jax import models

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "hello", "world"]


def _save_tokenizer(path, chat_template: str | None) -> None:
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)


def test_loads_tokenizer_and_chat_template(tmp_path):
    _save_tokenizer(tmp_path, TEMPLATE)
    tokenizer = models.load_tokenizer(tmp_path, require_chat_template=True)
    assert tokenizer.convert_tokens_to_ids("hello") == 5
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello world"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"


def test_saved_alongside_model(tmp_path, ours):
    _save_tokenizer(tmp_path / "tok", TEMPLATE)
    tokenizer = models.load_tokenizer(tmp_path / "tok")
    models.save_pretrained(ours("qwen3_tied"), tmp_path / "out", tokenizer=tokenizer)
    again = models.load_tokenizer(tmp_path / "out", require_chat_template=True)
    assert again.chat_template == TEMPLATE
    assert again("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]


def test_missing_chat_template_is_an_error_only_when_required(tmp_path):
    _save_tokenizer(tmp_path, None)
    assert models.load_tokenizer(tmp_path).chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        models.load_tokenizer(tmp_path, require_chat_template=True)


def test_missing_directory_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: tokenizer directory not found"):
        models.load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no tokenizer could be loaded"):
        models.load_tokenizer(tmp_path)
