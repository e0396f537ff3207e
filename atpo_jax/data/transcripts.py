"""Agent transcripts as (text, trainable) segments, and their token encoding for supervised training.

A transcript is the response after the prompt: the model's turns (trainable) interleaved with tool
observations and inserted text (not trainable). Each segment is tokenized on its own, exactly as the rollout
tokenizes an observation before appending it, so a warm-start row has the same token layout as an RL row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from atpo_jax.data.prompts import encode_prompt


@dataclasses.dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "trainable": self.trainable}


@dataclasses.dataclass(frozen=True)
class EncodedTranscript:
    """Token ids of a prompt and its response, with the response's loss mask (1 = train on it)."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]


def response_text(segments: Sequence[Segment]) -> str:
    """The decoded-response text the reward sees: all segments concatenated."""
    return "".join(s.text for s in segments)


def encode_transcript(
    tokenizer: Any,
    messages: list[dict[str, str]],
    segments: Sequence[Segment],
    *,
    append_eos: bool = True,
) -> EncodedTranscript:
    """Encodes prompt (chat template + generation prompt) and response segments.

    ``append_eos`` adds the tokenizer's EOS as a trainable token after the last segment: the model must
    learn to stop after its answer.
    """
    prompt_ids = encode_prompt(tokenizer, messages)
    response_ids: list[int] = []
    loss_mask: list[int] = []
    for segment in segments:
        ids = tokenizer.encode(segment.text, add_special_tokens=False)
        response_ids.extend(ids)
        loss_mask.extend([int(segment.trainable)] * len(ids))
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True needs a tokenizer with an eos_token")
        response_ids.append(tokenizer.eos_token_id)
        loss_mask.append(1)
    return EncodedTranscript(prompt_ids, response_ids, loss_mask)
