"""Entity renaming keeps demonstrations consistent and changes every entity name."""

from __future__ import annotations

import random

from atpo_jax.data.synthetic.augment import augmented_demos, rename_entities

NAMES = ["Kelmi", "Norvia", "Dravon", "Velmora", "Trisko", "Bramu", "Zelt"]
DEMO = {
    "prompt": [{"role": "system", "content": "Answer.\nuser\nWho is the founder of Velmora?"}],
    "segments": [
        {
            "text": "<think> I will search Velmora . </think> <search> Velmora </search>",
            "trainable": True,
        },
        {
            "text": ' <result>\nPage 1: "Velmora"\nVelmora was founded by Dravon.\n</result>',
            "trainable": False,
        },
        {
            "text": " <think> Velmora was founded by Dravon . </think> <answer> \\boxed{ Dravon } </answer>",
            "trainable": True,
        },
    ],
    "golds": ["Dravon"],
    "question": "Who is the founder of Velmora?",
}


def test_renaming_is_consistent_and_total():
    out = rename_entities(DEMO, NAMES, random.Random(0))
    new_subject = out["question"].split()[-1].rstrip("?")
    new_answer = out["golds"][0]
    assert new_subject != "Velmora" and new_answer != "Dravon" and new_subject != new_answer
    assert new_subject in NAMES and new_answer in NAMES
    text = out["prompt"][0]["content"] + "".join(s["text"] for s in out["segments"])
    assert "Velmora" not in text and "Dravon" not in text
    # Velmora: question 1, first turn 2, result 2, second think 1; Dravon: result, think, answer.
    assert text.count(new_subject) == 6 and text.count(new_answer) == 3
    assert [s["trainable"] for s in out["segments"]] == [True, False, True]
    assert DEMO["golds"] == ["Dravon"]  # the input is not modified


def test_augmented_demos_are_seeded():
    a = augmented_demos([DEMO], NAMES, copies=3, seed=1)
    assert len(a) == 4 and a[0] is DEMO
    assert a == augmented_demos([DEMO], NAMES, copies=3, seed=1)
