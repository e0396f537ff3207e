"""``python -m atpo_jax.launch`` with a stand-in reward, for scale-out tests.

An untrained policy almost never answers in format, so the real reward is -1 everywhere, every
advantage is 0 and an update changes nothing. This stand-in scores each response by a fixed hash
of its text (the same on every host and mesh), so trees get varied rewards, real advantages and a
real gradient, and two runs that produce the same responses must report the same numbers.

Usage: ``python -m tests.train.launch_with_test_reward <atpo_jax.launch flags>``.
"""

from __future__ import annotations

import sys
import zlib

from absl import app

from atpo_jax import launch
from atpo_jax.rewards.qa import RewardResult, RewardSettings

_SCORES = (-1.0, 0.0, 0.0, 0.5, 1.0)


def hashed_reward(response: str, golds, **kwargs) -> RewardResult:
    bucket = zlib.crc32(response.encode()) % len(_SCORES)
    return RewardResult(
        score=_SCORES[bucket],
        em=float(bucket == len(_SCORES) - 1),
        f1=bucket / (len(_SCORES) - 1),
        answer=None,
        reason="test reward",
    )


_score = RewardSettings.score


def training_reward(self, response: str, golds, *, validate: bool = False) -> RewardResult:
    """The hashed stand-in for the training reward; evaluation (``validate``) keeps the real one."""
    return (
        _score(self, response, golds, validate=True) if validate else hashed_reward(response, golds)
    )


if __name__ == "__main__":
    RewardSettings.score = training_reward
    app.run(launch.main, argv=["launch", *sys.argv[1:]])
