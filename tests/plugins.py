"""A custom tool and reward functions for the tests that name them by dotted path in a config
(``tools.instances``, ``reward.fn``)."""

from __future__ import annotations

from atpo_jax.rewards import RewardResult
from atpo_jax.tools import ToolResult


class EchoTool:
    """``<echo> text </echo>`` -> the text, upper-cased and repeated ``times`` times."""

    def __init__(self, times: int = 1, tag: str = "echo"):
        self.times, self.tag = times, tag

    def run(self, content: str) -> ToolResult:
        return ToolResult(ok=True, text=" ".join([content.upper()] * self.times))


def length_reward(response: str, golds: list[str], *, validate: bool, scale: float = 1.0) -> float:
    """``scale`` per gold answer that appears in the response, minus 1 while training."""
    hits = sum(gold.lower() in response.lower() for gold in golds)
    return scale * hits - (0.0 if validate else 1.0)


def full_result(response: str, golds: list[str], *, validate: bool) -> RewardResult:
    return RewardResult(0.25, em=1.0, f1=0.5, answer="x", reason="custom")


def not_a_tool() -> object:
    return object()


def broken_factory() -> None:
    raise RuntimeError("no licence server")


NOT_CALLABLE = 3
