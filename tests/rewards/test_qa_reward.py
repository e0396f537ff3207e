"""Rewards: golden behaviour §9.13, the format rules in order, answer extraction, EM/F1 and modes."""

import pytest

from atpo_jax.rewards import (
    compute_reward,
    exact_match,
    extract_answer,
    last_boxed,
    normalize_answer,
    token_f1,
    validate_format,
)

GOOD = "<think>x</think><answer>\\boxed{Paris}</answer>"


# --- ALGORITHM.md §9 item 13 -------------------------------------------------------------------------


def test_golden_correct_answer_scores_one():
    r = compute_reward(GOOD, ["paris"])
    assert (r.score, r.em, r.f1, r.answer) == (1.0, 1.0, 1.0, "Paris")


def test_golden_wrong_answer_scores_zero():
    r = compute_reward("<think>x</think><answer>\\boxed{Lyon}</answer>", ["paris"])
    assert (r.score, r.em, r.f1) == (0.0, 0.0, 0.0)


def test_golden_missing_think_close_is_minus_one_in_training_only():
    response = "<think>x<answer>\\boxed{Paris}</answer>"
    assert compute_reward(response, ["paris"]).score == -1.0
    r = compute_reward(response, ["paris"], validate=True)
    assert (r.score, r.em) == (1.0, 1.0)


def test_golden_search_without_result_is_minus_one():
    response = "<think>x</think><search>q</search><answer>\\boxed{Paris}</answer>"
    r = compute_reward(response, ["paris"])
    assert r.score == -1.0 and r.reason == "bad format: search/result tags are incomplete"


def test_golden_articles_are_ignored():
    response = "<think>x</think><answer>\\boxed{beatles}</answer>"
    assert compute_reward(response, ["The Beatles"]).score == 1.0


def test_golden_partial_overlap_gives_zero_not_f1():
    response = "<think>x</think><answer>\\boxed{Paris Texas}</answer>"
    r = compute_reward(response, ["Paris"])
    assert r.f1 == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert (r.score, r.em) == (0.0, 0.0)


# --- format rules, in order --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        (
            "<think>a<think>b</think><answer>\\boxed{x}</answer>",
            "<think> and </think> are not paired",
        ),
        ("<answer>\\boxed{x}</answer>", "no <think> block"),
        ("<think>a</think>", "need exactly one <answer> and one </answer>"),
        ("<think>a</think><answer>\\boxed{x}</answer><answer>", "need exactly one <answer>"),
        (
            "<think>a</think><search>q</search><result>r<answer>\\boxed{x}</answer>",
            "search/result tags are incomplete",
        ),
        (
            "<think>a</think><search>q<result>r</result></search><answer>\\boxed{x}</answer>",
            "search/result tags are in the wrong order",
        ),
        (
            "<think>a</think><python>1</python><answer>\\boxed{x}</answer>",
            "python/result tags are incomplete",
        ),
        ("<think>a</think></answer>\\boxed{x}<answer>", "</answer> comes before <answer>"),
        ("<think>a</think><answer>x</answer>", "the answer has no \\boxed{}"),
        ("<think>a</think><answer>\\boxed{x</answer>", "the answer has no \\boxed{}"),
    ],
)
def test_format_failures(text, reason):
    check = validate_format(text)
    assert not check.ok and check.reason.startswith(reason)


def test_format_accepts_full_agent_transcript():
    text = (
        "<think> plan </think> <search> a </search> <result>\nPage 1: x\n</result>"
        " <think> more </think> <search> b </search> <result>\nNo search results found.\n</result>"
        "<think> done </think> <answer> The final answer is \\[ \\boxed{42} \\] </answer>"
    )
    assert validate_format(text).ok
    assert compute_reward(text, ["42"]).score == 1.0


def test_search_scan_resumes_after_each_result():
    # The second <search> must have its own </search>, <result>, </result> after the first result.
    text = "<think>a</think><search>q</search><result>r</result><search>q2</search><answer>\\boxed{x}</answer>"
    assert validate_format(text).reason == "search/result tags are incomplete"


# --- extraction --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{a} then \\boxed{b}", "b"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed 42$ and more", "42"),
        ("\\fbox{x}", "x"),
        ("\\boxed{open", None),
        ("no box", None),
        ("\\boxedx{y}", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_answer_comes_from_the_first_answer_block():
    text = "<answer>\\boxed{one}</answer> <answer>\\boxed{two}</answer>"
    assert extract_answer(text) == "one"
    assert extract_answer("<answer>\nmultiline \\boxed{a\nb}\n</answer>") == "a\nb"
    assert extract_answer("\\boxed{outside}") is None


def test_missing_answer_or_box_is_minus_one_even_in_validation():
    no_block = "<think>x</think> \\boxed{Paris}"
    r = compute_reward(no_block, ["Paris"], validate=True)
    assert (r.score, r.reason) == (-1.0, "no <answer> block")
    no_box = "<think>x</think><answer>Paris</answer>"
    r = compute_reward(no_box, ["Paris"], validate=True)
    assert (r.score, r.reason) == (-1.0, "no \\boxed{} in the answer")


# --- normalisation, EM, F1 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The Beatles", "beatles"),
        ("  A  cat,  an apple & THE end! ", "cat apple end"),
        ("U.S.A.", "usa"),
        ("theater", "theater"),  # articles only as whole words
        ("an-other", "another"),  # punctuation is removed before articles are
        ("Écoles", "écoles"),  # non-ASCII letters stay
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_exact_match_any_gold():
    assert exact_match("the U.S.", ["United States", "US"]) == 1.0
    assert exact_match("Paris", "paris.") == 1.0
    assert exact_match("Paris", ["London"]) == 0.0


def test_f1_hand_computed():
    # pred "new york city" vs gold "york city": common 2, precision 2/3, recall 1 -> F1 0.8.
    assert token_f1("New York City", ["York City"]) == pytest.approx(0.8)
    # Best over golds: vs "new jersey" common 1 -> P 1/3, R 1/2 -> 0.4; the max is taken.
    assert token_f1("New York City", ["new jersey", "york city"]) == pytest.approx(0.8)
    # "x b b" vs "b b b c": common tokens min(2, 3) = 2 -> P 2/3, R 2/4 -> F1 4/7.
    assert token_f1("x b b", ["b b b c"]) == pytest.approx(4 / 7)
    assert token_f1("a b b", ["b b c"]) == pytest.approx(0.8)  # "a" is an article: "b b" vs "b b c"


@pytest.mark.parametrize(
    "pred, gold, f1",
    [
        ("yes", "yes", 1.0),
        ("yes", "yes it is", 0.0),  # a yes/no/noanswer prediction must match exactly
        ("no, it is not", "no", 0.0),  # a yes/no/noanswer gold must match exactly
        ("noanswer", "no answer", 0.0),
        ("Yes.", "yes", 1.0),
    ],
)
def test_f1_yes_no_rule(pred, gold, f1):
    assert token_f1(pred, [gold]) == f1


# --- modes -------------------------------------------------------------------------------------------


def test_em_and_f1_modes_skip_the_format_check():
    response = "no think <answer>\\boxed{Paris Texas}</answer>"
    em = compute_reward(response, ["Paris"], mode="em")
    f1 = compute_reward(response, ["Paris"], mode="f1")
    assert (em.score, f1.score) == (0.0, pytest.approx(2 / 3))
    assert compute_reward("nothing", ["x"], mode="em").score == 0.0
    assert compute_reward("nothing", ["x"], mode="f1").reason == "no answer"


def test_python_bonus_reference_behaviour_and_switch():
    text = (
        "<think>a</think><search>q</search><result>r</result><python>1</python><result>1</result>"
        "<answer>\\boxed{Paris Texas}</answer>"
    )
    bonus = compute_reward(text, ["Paris"])
    assert bonus.score == pytest.approx(2 / 3 + 0.1)  # F1 + 0.1, as the reference
    assert compute_reward(text, ["Paris"], python_bonus=0.0).score == 0.0


def test_gold_answers_accept_strings_and_sequences():
    assert compute_reward(GOOD, "Paris").score == 1.0
    assert compute_reward(GOOD, ("London", "paris")).score == 1.0
    with pytest.raises(ValueError, match="gold"):
        compute_reward(GOOD, [])
    with pytest.raises(ValueError, match="reward mode"):
        compute_reward(GOOD, ["Paris"], mode="accuracy")


# --- empty answers never match (issue 20, item 8) ----------------------------------------------------


@pytest.mark.parametrize("mode", ["em_format", "em", "f1"])
@pytest.mark.parametrize(
    ("boxed", "gold"),
    [("", ""), ("", "   "), ("the", "A"), ("", "?!"), ("an", "The The")],
    ids=["empty-vs-empty", "empty-vs-blank", "article-vs-letter", "empty-vs-punct", "an-vs-band"],
)
def test_an_empty_answer_or_gold_never_matches(mode, boxed, gold):
    # SQuAD normalisation maps all of these to "": the reference would call them exact matches.
    r = compute_reward(f"<think>x</think><answer>\\boxed{{{boxed}}}</answer>", [gold], mode=mode)
    assert (r.score, r.em, r.f1) == (0.0, 0.0, 0.0)
    assert exact_match(boxed, gold) == 0.0 and token_f1(boxed, [gold]) == 0.0


@pytest.mark.parametrize("gold", ["A", "The The", "a"])
def test_answers_of_articles_only_still_match_themselves(gold):
    r = compute_reward(f"<think>x</think><answer>\\boxed{{{gold.upper()}}}</answer>", [gold])
    assert (r.score, r.em, r.f1) == (1.0, 1.0, 1.0)
    assert exact_match("Paris", [gold, "Paris"]) == 1.0  # other golds are unaffected
