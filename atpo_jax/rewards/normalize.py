"""SQuAD-style answer normalisation, exact match and token F1 (ALGORITHM.md §3.1).

Normalisation: lower-case, drop ASCII punctuation, drop the words a/an/the, collapse whitespace (in that
order, as the reference does). F1 is the best token F1 over the gold answers, except that when the
prediction or a gold answer normalises to ``yes``, ``no`` or ``noanswer`` that pair only counts if both are
identical (so "yes" vs "yes it is" scores 0, not 0.67).

Empty answers never match (a difference from the reference). SQuAD normalisation empties a text made
only of articles and punctuation, so there ``\\boxed{}`` is an exact match of a blank gold and
``\\boxed{the}`` of the gold "A". Here a gold that normalises to nothing never matches, and an answer
made only of articles ("The The", the letter "A") is compared with its articles kept
(:func:`comparable_answer`), so it is matched by itself and by nothing else.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPECIAL = ("yes", "no", "noanswer")


def normalize_answer(text: str) -> str:
    """``"The  Beatles!"`` -> ``"beatles"``."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def comparable_answer(text: str) -> str:
    """What EM and F1 compare: :func:`normalize_answer`, or, when that leaves nothing because the
    text is only articles ("The The", "A"), the text lower-cased without punctuation, articles kept.
    Empty only for a text with no word at all (blank or punctuation), which never matches."""
    normalised = normalize_answer(text)
    if normalised:
        return normalised
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def as_gold_list(golds: str | Iterable[str]) -> list[str]:
    """Accepts one gold string or any iterable of them (lists, tuples, NumPy arrays from parquet)."""
    if isinstance(golds, str):
        return [golds]
    return [str(g) for g in golds]


def exact_match(prediction: str, golds: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0 (an empty
    one never matches: ``\\boxed{}`` against a blank gold is not correct)."""
    pred = comparable_answer(prediction)
    refs = (comparable_answer(g) for g in as_gold_list(golds))
    return float(any(ref and pred == ref for ref in refs))


def token_f1(prediction: str, golds: str | Iterable[str]) -> float:
    """Best token-level F1 between the prediction and the gold answers (0.0 when nothing overlaps)."""
    pred = comparable_answer(prediction)
    pred_tokens = pred.split()
    best = 0.0
    for gold in as_gold_list(golds):
        ref = comparable_answer(gold)
        if (pred in _SPECIAL or ref in _SPECIAL) and pred != ref:
            continue
        ref_tokens = ref.split()
        common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
        if common == 0:
            continue
        precision, recall = common / len(pred_tokens), common / len(ref_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best
