"""Demonstration augmentation: consistent random renaming of the entities in a transcript.

A tiny model trained on a few hundred demonstrations tends to memorise "question about X -> search Y"
instead of learning to copy names from the question and from search results. Renaming every entity
of a demonstration to other names of the world (the same new name for every mention, distinct names
for distinct entities) keeps the transcript internally consistent while making memorised facts
useless, so only copying predicts the names. The renamed transcript no longer matches the corpus;
it is only meant for supervised training.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Sequence
from typing import Any

_WORD = re.compile(r"\w+")


def rename_entities(
    demo: dict[str, Any], names: Sequence[str], rng: random.Random
) -> dict[str, Any]:
    """A copy of ``demo`` (a demonstration record) with its entities renamed consistently.

    Args:
      demo: a record of ``demos.jsonl`` (``prompt`` messages, ``segments``, ``golds``, ...).
      names: every entity name of the world (the renaming draws from these).
      rng: source of the permutation.
    """
    known = set(names)
    texts = [m["content"] for m in demo["prompt"]] + [s["text"] for s in demo["segments"]]
    present = sorted({w for text in texts for w in _WORD.findall(text) if w in known})
    # New names come from the other entities when there are enough, so every entity changes.
    pool = [n for n in names if n not in set(present)]
    targets = rng.sample(pool if len(pool) >= len(present) else list(names), len(present))
    mapping = dict(zip(present, targets, strict=True))

    def rename(text: str) -> str:
        return _WORD.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)

    out = copy.deepcopy(demo)
    for message in out["prompt"]:
        message["content"] = rename(message["content"])
    for segment in out["segments"]:
        segment["text"] = rename(segment["text"])
    out["golds"] = [rename(g) for g in out.get("golds", [])]
    if "question" in out:
        out["question"] = rename(out["question"])
    return out


def augmented_demos(
    demos: Sequence[dict[str, Any]], names: Sequence[str], copies: int, seed: int
) -> list[dict[str, Any]]:
    """The demonstrations followed by ``copies`` renamed copies of each (seeded)."""
    rng = random.Random(seed)
    out = list(demos)
    for _ in range(copies):
        out.extend(rename_entities(d, names, rng) for d in demos)
    return out
