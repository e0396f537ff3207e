"""Greedy single-chain evaluation: EM / F1 per ``data_source``, as the paper's tables report.

Validation follows the reference (ALGORITHM.md §1.6, §3.1): greedy decoding, one chain per
question, no tree and no credit, and the reward's format check skipped (``validate=True``); the
reported numbers are exact match and token F1 of the extracted ``\\boxed{}`` answer.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from atpo_jax.data.prompts import encode_prompt
from atpo_jax.data.rows import QARow
from atpo_jax.rewards.qa import RewardSettings
from atpo_jax.rollout.settings import RolloutMode
from atpo_jax.rollout.tree_search import TreeSearch
from atpo_jax.settings import StrEnum, check, coerce_choices


class EvalSplit(StrEnum):
    VALIDATION = "validation"
    TEST = "test"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation during training (the ``eval`` section of a run's config).

    Attributes:
      every: evaluate every this many RL steps (0: only after the warm start and at the end).
      split: the synthetic world's ``validation`` or ``test`` questions (files: data.eval_files).
      max_questions: evaluate on the first this many questions (0: all).
      batch_prompts: questions rolled out together.
      max_response_len: the response budget of evaluation (0: rollout.max_response_len).
    """

    every: int = 20
    split: EvalSplit = EvalSplit.TEST
    max_questions: int = 0
    batch_prompts: int = 64
    max_response_len: int = 0

    def __post_init__(self) -> None:
        coerce_choices(self, "eval")
        check(self.every >= 0, f"eval.every={self.every} must be >= 0")
        check(self.max_questions >= 0, f"eval.max_questions={self.max_questions} must be >= 0")
        check(self.batch_prompts >= 1, f"eval.batch_prompts={self.batch_prompts} must be >= 1")
        check(self.max_response_len >= 0, "eval.max_response_len must be >= 0")


def eval_rows(rows: Sequence[QARow], settings: EvalSettings) -> list[QARow]:
    """The evaluation questions: ``rows`` cut to ``eval.max_questions`` when set."""
    rows = list(rows)
    return rows[: settings.max_questions] if settings.max_questions else rows


def evaluate(
    search: TreeSearch,
    params: Any,
    tokenizer: Any,
    rows: Sequence[QARow],
    *,
    batch_prompts: int,
    reward: RewardSettings | None = None,
) -> dict[str, Any]:
    """Runs every question once (greedy, with the policy ``params``) and scores it with
    ``reward`` (default: the paper's ``em_format``; validation skips its format check).

    Returns ``{"em", "f1", "n", "by_source": {source: {"em", "f1", "n"}}, "samples": [...]}`` where
    ``em``/``f1`` average over all questions and ``samples`` holds the first few transcripts.
    """
    if search.settings.mode != RolloutMode.CHAIN or search.settings.samples_per_tree != 1:
        raise ValueError(
            "evaluate() needs a single-chain search (RolloutSettings.for_evaluation())"
        )
    reward = reward or RewardSettings()
    prompts = [encode_prompt(tokenizer, row.prompt) for row in rows]
    ems, f1s, texts = [], [], []
    for start in range(0, len(rows), batch_prompts):
        chunk = prompts[start : start + batch_prompts]
        out = search.rollout(params, chunk, step=0, tree_ids=range(start, start + len(chunk)))
        for text, row in zip(out.texts, rows[start : start + len(chunk)], strict=True):
            result = reward.score(text, row.golds, validate=True)
            ems.append(result.em)
            f1s.append(result.f1)
            texts.append(text)
    by_source: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"em": [], "f1": []})
    for row, em, f1 in zip(rows, ems, f1s, strict=True):
        by_source[row.data_source]["em"].append(em)
        by_source[row.data_source]["f1"].append(f1)
    return {
        "em": float(np.mean(ems)) if ems else 0.0,
        "f1": float(np.mean(f1s)) if f1s else 0.0,
        "n": len(ems),
        "by_source": {
            source: {
                "em": float(np.mean(v["em"])),
                "f1": float(np.mean(v["f1"])),
                "n": len(v["em"]),
            }
            for source, v in sorted(by_source.items())
        },
        "samples": [
            {"question": row.extra_info.get("question", ""), "golds": row.golds, "response": text}
            for row, text in list(zip(rows, texts, strict=True))[:5]
        ],
    }


def markdown_table(results: dict[str, Any]) -> str:
    """EM / F1 (in %) per data source plus the average over sources and over questions."""
    sources = results["by_source"]
    lines = ["| data_source | n | EM | F1 |", "|---|---|---|---|"]
    for source, r in sources.items():
        lines.append(f"| {source} | {r['n']} | {100 * r['em']:.2f} | {100 * r['f1']:.2f} |")
    if sources:
        avg_em = np.mean([r["em"] for r in sources.values()])
        avg_f1 = np.mean([r["f1"] for r in sources.values()])
        lines.append(f"| average over sources | | {100 * avg_em:.2f} | {100 * avg_f1:.2f} |")
    lines.append(
        f"| all questions | {results['n']} | {100 * results['em']:.2f} | {100 * results['f1']:.2f} |"
    )
    return "\n".join(lines)


def save_results(results: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def merge_eval_results(per_process: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``evaluation.evaluate`` results of disjoint question sets as the result over all of them."""
    if len(per_process) == 1:
        return dict(per_process[0])

    def weighted(parts: Sequence[Mapping[str, Any]], key: str) -> float:
        total = sum(p["n"] for p in parts)
        return float(sum(p[key] * p["n"] for p in parts) / total) if total else 0.0

    sources = sorted({s for r in per_process for s in r["by_source"]})
    by_source = {}
    for source in sources:
        parts = [r["by_source"][source] for r in per_process if source in r["by_source"]]
        by_source[source] = {
            "em": weighted(parts, "em"),
            "f1": weighted(parts, "f1"),
            "n": sum(p["n"] for p in parts),
        }
    samples = [s for r in per_process for s in r.get("samples", [])][:5]
    return {
        "em": weighted(per_process, "em"),
        "f1": weighted(per_process, "f1"),
        "n": sum(r["n"] for r in per_process),
        "by_source": by_source,
        "samples": samples,
    }
