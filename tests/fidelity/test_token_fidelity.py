"""Under Qwen3's real byte-level BPE: the tokens sampled are the tokens trained.

A scripted policy emits token ids (canonical and non-canonical BPE splits of random turns whose
closing tags merge with whatever follows); the real engine host loop, turn rules, tool-result
insertion and packing run on them, and every row is checked against a direct model of the
reference (ALGORITHM.md §1.3-§1.5): prompt ids + sampled ids cut at the token that completes
``</search>`` + observation ids, mask 1 on sampled ids only, nothing re-tokenised.
"""

from __future__ import annotations

import dataclasses
import unicodedata

import numpy as np
from flax import nnx
from hypothesis import event, given, settings
from hypothesis import strategies as st

from atpo_jax.data.prompts import build_messages, encode_prompt
from atpo_jax.rewards import extract
from atpo_jax.rollout.sampling import SamplingParams
from atpo_jax.rollout.settings import RolloutSettings
from atpo_jax.rollout.tree_search import TreeSearch
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.parsing import CALL_LIMIT_WARNING
from atpo_jax.tools.passages import format_observation
from atpo_jax.tools.toolbox import Toolbox
from tests.fidelity.qwen3_tokenizer import QWEN3_VOCAB_ROWS
from tests.fidelity.scripted_engine import ScriptedEngine, tiny_qwen3

IM_END, END_OF_TEXT = 151645, 151643
CLOSE = "</search>"
# Text that exercises the vocabulary: unicode (multi-byte pieces), digits, code, markup.
PIECES = list("abcxyz XYZ 0123456789 {}()[];=<>/\\_-.,:'\"\n\t") + [
    "é", "ß", "世界", "日本", "🤖", "Ω", "ñ", "<b>", "</p>", "def f(x):", "\\boxed{",
]  # fmt: skip
TEXT = st.lists(st.sampled_from(PIECES), max_size=16).map("".join)
# What BPE may fuse onto the tag's last token ('>'): blank lines, spaces, brackets, text.
AFTER_TAG = st.sampled_from(["", "\n", "\n\n", " ", "  ", "}", ">", ".\n", "\n\n<", "x"])


@dataclasses.dataclass
class PassageTool:
    passage: str
    tag: str = "search"

    def __post_init__(self):
        self.queries: list[str] = []

    def run(self, content: str) -> ToolResult:
        self.queries.append(content)
        return ToolResult(ok=True, text=self.passage, status="ok")


def split_encode(tok, text: str, cuts: list[int]) -> list[int]:
    """Ids of ``text`` encoded piece by piece: a valid, possibly non-canonical, BPE sequence."""
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    ids: list[int] = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        ids += tok.encode(text[a:b], add_special_tokens=False)
    return ids


@st.composite
def episodes(draw):
    calls = draw(st.integers(0, 3))
    turns = []
    for _ in range(calls):
        before, query, after = draw(TEXT), draw(TEXT), draw(AFTER_TAG) + draw(TEXT)
        turns.append(
            (
                f"{before}<search>{query}{CLOSE}{after}",
                draw(st.lists(st.integers(0, 99), max_size=3)),
            )
        )
    answer = draw(TEXT)
    final = f"{draw(TEXT)}<answer> \\boxed{{{answer}}} </answer>"
    end = draw(st.sampled_from([IM_END, END_OF_TEXT]))
    cuts = draw(st.lists(st.integers(0, 99), max_size=3))
    nonblank = TEXT.filter(lambda s: s.strip())
    # Mostly roomy rows; sometimes a budget that truncates a turn or cuts an observation.
    budget = draw(st.sampled_from([768, 768, 16, 40, 80]))
    limits = (budget, draw(st.integers(0, 12)), draw(st.integers(0, 3)))
    return draw(nonblank), draw(nonblank), turns, (final, cuts, end, answer), limits


def reference_row(tok, turns_ids, observation, final_ids, *, budget, margin, call_limit):
    """The reference's row (ALGORITHM.md §1.3-§1.5): each tool turn cut at the token completing
    ``</search>``; per-row budget, observation cut to leave ``margin``, the call-limit warning."""
    tokens, mask, queries, calls = [], [], [], 0
    warning = tok.encode(CALL_LIMIT_WARNING, add_special_tokens=False)

    def sample(ids):  # the device never samples past the row's budget
        room = budget - len(tokens)
        tokens.extend(ids[:room])
        mask.extend([1] * len(ids[:room]))
        return len(ids) <= room

    for ids in turns_ids:
        n = next(k for k in range(1, len(ids) + 1) if CLOSE in tok.decode(ids[:k]))
        if not sample(ids[:n]):
            return tokens, mask, queries, "length"
        if calls >= call_limit:  # masked warning, the same node generates on
            if len(warning) >= budget - len(tokens):
                return tokens, mask, queries, "length"
            tokens += warning
            mask += [0] * len(warning)
            continue
        calls += 1
        text = tok.decode(ids[:n])
        end = text.rfind(CLOSE)
        start = text.rfind("<search>", 0, end)
        query = text[start + len("<search>") : end].strip() if start >= 0 else ""
        if not query:  # empty call: a trained EOS ends the chain (when there is room)
            if len(tokens) < budget:
                return tokens + [IM_END], mask + [1], queries, "empty_call"
            return tokens, mask, queries, "empty_call"
        queries.append(query)
        obs = observation
        room = budget - len(tokens)
        if len(obs) > room:
            obs = obs[: max(0, room - margin)]
        if not obs:
            return tokens, mask, queries, "no_room"
        tokens += obs
        mask += [0] * len(obs)
        if len(tokens) >= budget:
            return tokens, mask, queries, "length"
    if not sample(final_ids):
        return tokens, mask, queries, "length"
    return tokens, mask, queries, "eos"


@settings(max_examples=30)
@given(episodes())
def test_rows_are_prompt_plus_sampled_plus_tool_tokens(qwen3_tokenizer, episode):
    tok = qwen3_tokenizer
    question, passage, turns, (final, final_cuts, end, answer), (budget, margin, limit) = episode
    turns_ids = [split_encode(tok, text, cuts) for text, cuts in turns]
    final_ids = split_encode(tok, final, final_cuts) + [end]
    tool = PassageTool(passage)
    toolbox = Toolbox([tool])
    rollout = RolloutSettings(
        initial_rollouts=1,
        expansion_iterations=0,
        beam_size=1,
        samples_per_tree=1,
        max_prompt_len=512,
        max_response_len=budget,
        observation_margin=margin,
        call_limit=limit,
        num_slots=2,
        decode_chunk=8,
        kv_bucket=128,
    )
    model = tiny_qwen3(QWEN3_VOCAB_ROWS)
    engine = ScriptedEngine(
        model,
        num_slots=2,
        max_len=rollout.max_len,
        eos_token_ids=[IM_END, END_OF_TEXT],
        sampling=SamplingParams(vocab_limit=len(tok)),
        stop_strings=toolbox.stop_strings,
        decode=tok.decode,
        decode_chunk=8,
        kv_bucket=128,
        turns=[turns_ids + [final_ids]],
        filler=tok.encode(" x", add_special_tokens=False)[0],
    )
    search = TreeSearch(
        engine, tok, toolbox, rollout, eos_token_id=IM_END, pad_token_id=END_OF_TEXT
    )
    prompt = encode_prompt(tok, build_messages(question, "paper"), max_length=512)
    out = search.rollout(nnx.state(model), [prompt], step=0)

    # The prompt row is the rendered chat template's ids, left-padded.
    assert prompt[-3:] == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    row_prompt = np.asarray(out.rows.prompt_tokens[0])[np.asarray(out.rows.prompt_mask[0]) > 0]
    assert row_prompt.tolist() == prompt

    observation = tok.encode(format_observation(passage), add_special_tokens=False)
    want, want_mask, want_queries, finish = reference_row(
        tok, turns_ids, observation, final_ids, budget=budget, margin=margin, call_limit=limit
    )
    info = out.row_info[0]
    got = np.asarray(out.rows.response_tokens[0])[: info.length].tolist()
    got_mask = np.asarray(out.rows.loss_mask[0])[: info.length].tolist()
    assert got == want
    assert got_mask == want_mask
    assert tool.queries == want_queries
    assert info.finish == finish
    event(f"finish={finish}")
    # The reward's input is the decoded row (special tokens skipped); the reference's rules apply
    # to that text.
    text = tok.decode(want, skip_special_tokens=True)
    assert out.texts[0] == text
    assert info.length <= budget
    if finish == "eos":
        assert extract.extract_answer(text) == extract.extract_answer(tok.decode(final_ids[:-1]))
        # Against the reference's rule itself (ALGORITHM.md §3.1: the last brace-matched \boxed{}
        # inside the first <answer>…</answer>): when nothing in the row can confuse that rule, the
        # answer read from the decoded row is the one the policy wrote (NFC: the tokenizer's
        # normaliser), whatever BPE did at the tags around it.
        plain = not any(c in answer for c in "{}\\$") and "answer>" not in answer
        if plain and text.count("<answer>") == 1 and text.count("</answer>") == 1:
            assert extract.extract_answer(text) == unicodedata.normalize("NFC", answer)
            event("answer checked against the reference rule")
