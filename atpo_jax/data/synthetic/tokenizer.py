"""A word-level, Hugging Face-compatible tokenizer for the synthetic world (built with ``tokenizers``).

Text is split on whitespace and punctuation; every distinct word seen while building is one token, so the
vocabulary is a few hundred entries and each entity name is a single token. Whitespace is not
represented: decoding joins tokens with single spaces, so ``decode(encode(t)) == t`` for text written in
that canonical spacing (which the synthetic demonstrations use), and token ids never depend on spacing.

Special tokens follow the Qwen chat layout: ``<|im_start|>``, ``<|im_end|>`` (EOS), ``<|endoftext|>`` (pad)
and ``<|unk|>``. The agent tags (``<think>``, ``</think>``, ``<search>``, …, ``\\boxed{``) are single tokens
that are NOT special, so ``decode(..., skip_special_tokens=True)`` keeps them, as Qwen3's ``<think>`` is kept.

The saved directory (``tokenizer.json`` + ``tokenizer_config.json`` with the chat template) loads with
``transformers.AutoTokenizer.from_pretrained(path)``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
TAG_TOKENS = (
    "<think>",
    "</think>",
    "<search>",
    "</search>",
    "<result>",
    "</result>",
    "<answer>",
    "</answer>",
    "<python>",
    "</python>",
    "\\boxed{",
)
# The chat template's own words, so every rendered prompt is in the vocabulary.
TEMPLATE_WORDS = ("system", "user", "assistant")

# ChatML, as Qwen uses it (without tool-calling extras): one block per message, then the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def _split_words(texts: Iterable[str]) -> set[str]:
    """The words the tokenizer will see in ``texts`` (added tokens taken out first, as encoding does)."""
    added = sorted(SPECIAL_TOKENS + TAG_TOKENS, key=len, reverse=True)
    splitter = re.compile("|".join(re.escape(t) for t in added))
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        for piece in splitter.split(text):
            words.update(w for w, _ in pre.pre_tokenize_str(piece))
    return words


def build_word_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """A word-level ``tokenizers.Tokenizer`` whose vocabulary covers every word of ``texts``.

    Ids: the special tokens first (pad = 0), then the tags, then the words in sorted order, so the same
    texts always give the same ids.
    """
    reserved = SPECIAL_TOKENS + TAG_TOKENS
    words = sorted(_split_words(texts).union(TEMPLATE_WORDS) - set(reserved))
    vocab = {token: i for i, token in enumerate((*reserved, *words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tokenizer


def save_word_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike[str]) -> None:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The config names the generic ``PreTrainedTokenizerFast`` class and carries the chat template inline,
    which every transformers version since 4.x loads.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    specials = {
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": UNK_TOKEN,
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in specials.items() if v}, f, indent=2, sort_keys=True)
        f.write("\n")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained`` on a local directory (never downloads)."""
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is actually needed

    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"{path!r} has no tokenizer.json; build the synthetic world first "
            "(python -m atpo_jax.data.synthetic --out DIR)"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
