"""The agent's instruction prompt and its rendering through a tokenizer's chat template (ALGORITHM.md §1.1).

Structure, as in the reference data builders: the question is stripped and gets a trailing ``?``; the
instruction, a newline, the word ``user``, a newline and the question form ONE message with role
``system`` (there is no user message); the prompt is the chat template applied with
``add_generation_prompt=True``.

``"paper"`` is the paper's instruction in our own words, with the same content and layout: an example
``<think> … </think> <search> … </search> <result> … </result>  <think> … </think> <answer> … </answer>``
(two spaces before the second ``<think>``) and the requirement to put the exact answer in ``\\boxed{}``.
Difference from the reference (DESIGN.md §9): ``\\boxed`` is a real backslash followed by ``boxed``; the
reference's non-raw f-string turned ``\\b`` into a backspace character (U+0008).

``"short"`` is a compact instruction with the same structure for small models and short sequences (the
synthetic world's default).
"""

from __future__ import annotations

from typing import Any

PAPER_INSTRUCTION = (
    "You are a helpful assistant that answers the given question step by step with the help of a "
    "Wikipedia search tool. For each question, first think through the reasoning in your mind, then "
    "give the answer. While thinking, you may call the Wikipedia search tool to look up facts about "
    "specific topics whenever you need them, and you may search as many times as you want. Put the "
    "reasoning inside <think> </think> and the answer inside <answer> </answer>; put each search query "
    "inside <search> </search>, and its result appears inside <result> </result>. For example, "
    "<think> This is the reasoning. </think> <search> search query here </search> "
    "<result> search result here </result>  <think> This is the reasoning. </think> "
    "<answer> The final answer is \\[ \\boxed{answer here} \\] </answer>. At the end of the answer, "
    "write the exact final answer inside \\boxed{} in LaTeX."
)

SHORT_INSTRUCTION = (
    "Answer the question. Think inside <think> </think>. To look up a name, write "
    "<search> name </search> and read the <result> </result>. End with "
    "<answer> \\boxed{name} </answer>."
)

PROMPT_STYLES = {"paper": PAPER_INSTRUCTION, "short": SHORT_INSTRUCTION}


def normalize_question(question: str) -> str:
    """Strips the question and appends ``?`` unless it already ends with one (reference behaviour)."""
    question = question.strip()
    if not question:
        raise ValueError("empty question")
    return question if question.endswith("?") else question + "?"


def instruction_for(style: str) -> str:
    try:
        return PROMPT_STYLES[style]
    except KeyError:
        raise ValueError(
            f"unknown prompt style {style!r}; choose one of {sorted(PROMPT_STYLES)}"
        ) from None


def build_messages(question: str, style: str = "paper") -> list[dict[str, str]]:
    """The prompt as chat messages: one ``system`` message holding instruction + ``\\nuser\\n`` + question."""
    content = f"{instruction_for(style)}\nuser\n{normalize_question(question)}"
    return [{"role": "system", "content": content}]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt text: the tokenizer's chat template with the generation prompt appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template; "
            "use an instruction-tuned checkpoint or set tokenizer.chat_template"
        )
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(
    tokenizer: Any, messages: list[dict[str, str]], *, max_length: int | None = None
) -> list[int]:
    """Token ids of the rendered prompt (no extra special tokens: the template already has them).

    Raises:
      ValueError: the prompt is longer than ``max_length`` (the reference errors too rather than
        truncating a question).
    """
    ids = tokenizer.encode(render_prompt(tokenizer, messages), add_special_tokens=False)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"prompt has {len(ids)} tokens, more than max_prompt_length={max_length}; "
            "raise the prompt length setting or shorten the question"
        )
    return ids
