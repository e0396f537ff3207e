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
from atpo_jax.rewards.qa import RewardResult
from atpo_jax.train import trainer

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


if __name__ == "__main__":
    trainer.compute_reward = hashed_reward
    app.run(launch.main, argv=["launch", *sys.argv[1:]])
