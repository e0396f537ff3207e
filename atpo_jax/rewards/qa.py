"""Outcome rewards for search-QA responses (ALGORITHM.md §3.1).

Modes:

* ``"em_format"`` (the paper's reward, default): a response that fails :func:`validate_format` scores −1;
  a missing ``<answer>`` block or a missing ``\\boxed{}`` inside it scores −1; otherwise, if token F1 > 0 the
  score is EM (so a partially overlapping wrong answer gives 0, not its F1), else 0. The reference adds a
  bonus when F1 > 0 and the response contains both ``</search>`` and ``</python>``: the score becomes
  F1 + 0.1. That is kept as ``python_bonus`` (default 0.1, the reference behaviour; 0 disables it, which
  makes the reward exactly {−1, 0, 1}). With the python tool off the bonus can only fire if the model
  writes ``</python>`` text itself, which the format check then usually rejects.
* ``"em"``: EM of the extracted answer, 0 when there is none; no format check.
* ``"f1"``: token F1 of the extracted answer, 0 when there is none; no format check.

``validate=True`` is the evaluation path: ``em_format`` skips the format check but still gives −1 when the
answer or box is missing, like the reference. Every result carries ``em`` and ``f1`` (the paper's tables
report the mean ``em``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from atpo_jax.rewards.extract import extract_answer, extract_answer_block, last_boxed
from atpo_jax.rewards.format import validate_format
from atpo_jax.rewards.normalize import as_gold_list, exact_match, token_f1
from atpo_jax.rewards.registry import BUILTIN_REWARD, resolve_reward
from atpo_jax.settings import StrEnum, check, coerce_choices, parse_plugin_spec

DEFAULT_PYTHON_BONUS = 0.1


class RewardMode(StrEnum):
    EM_FORMAT = "em_format"  # the paper: -1 malformed, else exact match (+ the python bonus)
    EM = "em"  # exact match of the extracted answer, no format check
    F1 = "f1"  # token F1 of the extracted answer


REWARD_MODES = tuple(mode.value for mode in RewardMode)


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """The outcome reward (the ``reward`` section of a run's config; ALGORITHM.md §3.1).

    Attributes:
      fn: the reward function: ``qa`` (this module's, configured by ``mode`` and
        ``python_bonus``), a name given to ``rewards.registry.register_reward``, or a dotted path
        with optional JSON keyword arguments (``'my_pkg.rewards:score{"partial": 0.5}'``;
        ``atpo_jax.rewards.registry`` says what it is called with).
      mode: ``em_format`` (the paper's −1 / 0 / 1 with format validation), ``em`` or ``f1``.
      python_bonus: added to a correct ``em_format`` answer whose response used both search and
        the python tool (the reference: 0.1).
    """

    fn: str = BUILTIN_REWARD
    mode: RewardMode = RewardMode.EM_FORMAT
    python_bonus: float = DEFAULT_PYTHON_BONUS

    def __post_init__(self) -> None:
        coerce_choices(self, "reward")
        spec = parse_plugin_spec(self.fn, "reward.fn")
        check(
            spec.target != BUILTIN_REWARD or not spec.params,
            f"reward.fn={self.fn!r}: the built-in 'qa' reward takes no arguments (it is "
            "configured by reward.mode and reward.python_bonus)",
        )
        # NaN is truthy, so a NaN bonus would make every correct search+python answer score NaN.
        check(
            math.isfinite(self.python_bonus),
            f"reward.python_bonus must be a finite number (0: off), got {self.python_bonus}",
        )

    def score(
        self, response: str, golds: str | Iterable[str], *, validate: bool = False
    ) -> RewardResult:
        """The reward of ``response``: ``compute_reward`` with these settings, or ``fn``'s
        (``validate``: the evaluation path; the built-in skips its format check)."""
        if self.fn == BUILTIN_REWARD:
            return compute_reward(
                response, golds, mode=self.mode, python_bonus=self.python_bonus, validate=validate
            )
        golds = as_gold_list(golds)
        out = resolve_reward(self.fn)(response, golds, validate=validate)
        if isinstance(out, RewardResult):
            return out
        if isinstance(out, bool) or not isinstance(out, int | float) or not math.isfinite(out):
            raise ValueError(
                f"reward.fn={self.fn!r} returned {out!r}: a reward function returns a finite "
                "number or a RewardResult"
            )
        # The evaluation tables report the standard EM/F1 of the extracted answer.
        answer = extract_answer(response)
        em = exact_match(answer, golds) if answer is not None else 0.0
        f1 = token_f1(answer, golds) if answer is not None else 0.0
        return RewardResult(float(out), em, f1, answer, f"reward.fn={self.fn}")

    def load(self) -> None:
        """Imports ``fn`` now and checks its arguments (``build_run`` calls it, so a bad
        ``reward.fn`` fails before anything is compiled)."""
        if self.fn != BUILTIN_REWARD:
            resolve_reward(self.fn)


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Score of one response.

    Attributes:
      score: the training reward.
      em: exact match of the extracted answer (0 when none).
      f1: token F1 of the extracted answer (0 when none).
      answer: the extracted answer, or None.
      reason: why the score is what it is (for traces and debugging).
    """

    score: float
    em: float
    f1: float
    answer: str | None
    reason: str


def compute_reward(
    response: str,
    golds: str | Iterable[str],
    *,
    mode: str = "em_format",
    validate: bool = False,
    python_bonus: float = DEFAULT_PYTHON_BONUS,
) -> RewardResult:
    """Scores a decoded response (prompt excluded, tool results included) against the gold answers.

    Example: ``compute_reward("<think>x</think><answer>\\\\boxed{Paris}</answer>", ["paris"])`` ->
    ``RewardResult(score=1.0, em=1.0, f1=1.0, answer="Paris", ...)``.
    """
    if mode not in REWARD_MODES:
        raise ValueError(f"reward mode must be one of {REWARD_MODES}, got {mode!r}")
    golds = as_gold_list(golds)
    if not golds:
        raise ValueError("compute_reward needs at least one gold answer")
    answer = extract_answer(response)
    em = exact_match(answer, golds) if answer is not None else 0.0
    f1 = token_f1(answer, golds) if answer is not None else 0.0
    if mode == "em":
        return RewardResult(
            em, em, f1, answer, "exact match" if answer is not None else "no answer"
        )
    if mode == "f1":
        return RewardResult(f1, em, f1, answer, "token F1" if answer is not None else "no answer")

    if not validate:
        check = validate_format(response)
        if not check.ok:
            return RewardResult(-1.0, 0.0, 0.0, answer, f"bad format: {check.reason}")
    block = extract_answer_block(response)
    if block is None:
        return RewardResult(-1.0, 0.0, 0.0, None, "no <answer> block")
    if last_boxed(block) is None:
        return RewardResult(-1.0, 0.0, 0.0, None, "no \\boxed{} in the answer")
    if f1 > 0 and python_bonus and "</search>" in response and "</python>" in response:
        return RewardResult(f1 + python_bonus, em, f1, answer, "correct, used search and python")
    if f1 > 0:
        return RewardResult(em, em, f1, answer, "exact match" if em else "partial overlap only")
    return RewardResult(0.0, em, f1, answer, "wrong answer")
