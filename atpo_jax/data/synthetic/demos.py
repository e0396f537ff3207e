"""Noisy expert demonstrations: full agent transcripts for a short supervised warm start.

Each training question gets one transcript from :class:`~.expert.ExpertAgent`, played through the real
search tool. With probability ``mistake_rate`` the expert makes one scripted mistake (kind drawn with
``mistake_weights`` from :data:`~.expert.MISTAKE_KINDS`, at a random hop), so a model cloned from these
demonstrations answers well but not perfectly, leaving room for RL. Every record stores its reward under
the real reward code, so the demonstrations' own EM is known.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from atpo_jax.data.prompts import build_messages
from atpo_jax.data.synthetic.expert import MISTAKE_KINDS, ExpertAgent, ExpertError, play_episode
from atpo_jax.data.synthetic.questions import Question
from atpo_jax.data.transcripts import Segment
from atpo_jax.rewards.qa import compute_reward
from atpo_jax.tools.toolbox import Toolbox


def make_demonstrations(
    questions: Sequence[Question],
    toolbox: Toolbox,
    rng: random.Random,
    *,
    mistake_rate: float,
    mistake_weights: Sequence[float],
    wrong_names: Sequence[str],
    shortcut_rate: float = 0.0,
    shortcut_hops: int = 3,
    prompt_style: str,
) -> list[dict[str, Any]]:
    """One demonstration record per question (see the module docstring).

    With probability ``shortcut_rate`` a question of ``shortcut_hops`` or more hops gets the
    systematic shortcut (answer the last intermediate name, one hop early) instead of a random
    mistake draw.
    """
    for name, rate in (("mistake_rate", mistake_rate), ("shortcut_rate", shortcut_rate)):
        if not 0 <= rate <= 1:
            raise ValueError(f"demo {name} must be in [0, 1], got {rate}")
    if len(mistake_weights) != len(MISTAKE_KINDS) or min(mistake_weights) < 0:
        raise ValueError(
            f"demo mistake_weights needs {len(MISTAKE_KINDS)} non-negative weights for "
            f"{MISTAKE_KINDS}, got {tuple(mistake_weights)}"
        )
    demos = []
    for index, question in enumerate(questions):
        mistake, hop = None, 0
        if question.hops >= shortcut_hops and rng.random() < shortcut_rate:
            mistake, hop = "early_answer", question.hops - 1
        elif rng.random() < mistake_rate:
            mistake = rng.choices(MISTAKE_KINDS, weights=mistake_weights)[0]
            hop = rng.randrange(question.hops)
        agent = ExpertAgent(
            question.text,
            mistake=mistake,
            mistake_hop=hop,
            rng=rng,
            wrong_names=wrong_names,
            avoid=[question.answer],
        )
        try:
            episode = play_episode(agent, toolbox)
        except ExpertError:
            # Only in the harder worlds: a long chain whose re-queries after retrieval misses, plus
            # the mistake's extra search, run past the call limit. Record the perfect expert.
            if mistake is None:
                raise
            mistake, hop = None, 0
            episode = play_episode(ExpertAgent(question.text), toolbox)
        reward = compute_reward(episode.response, [question.answer])
        demos.append(
            {
                "index": index,
                "question": question.text,
                "golds": [question.answer],
                "hops": question.hops,
                "template": question.template,
                "mistake": mistake,
                "prompt": build_messages(question.text, prompt_style),
                "segments": [s.to_json() for s in episode.segments],
                "num_calls": episode.num_calls,
                "reward": reward.score,
                "em": reward.em,
            }
        )
    return demos


def demo_segments(record: dict[str, Any]) -> list[Segment]:
    """The transcript segments of a demonstration record (as written to ``demos.jsonl``)."""
    return [Segment(s["text"], bool(s["trainable"])) for s in record["segments"]]
