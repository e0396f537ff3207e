"""Reward functions from the config (``reward.fn``): the built-in, registered names, dotted paths
with JSON arguments, and one clear ConfigError for each way it goes wrong."""

from __future__ import annotations

import math

import pytest

from atpo_jax.rewards import RewardResult, RewardSettings, registry
from atpo_jax.settings import ConfigError

GOOD = "<think>x</think><answer>\\boxed{Paris}</answer>"


def test_the_default_is_the_built_in_qa_reward():
    assert RewardSettings().fn == "qa"
    assert RewardSettings().score(GOOD, ["paris"]).score == 1.0
    assert RewardSettings(mode="f1").score(
        "<answer>\\boxed{Paris France}</answer>", ["paris"]
    ).score == (pytest.approx(2 / 3))


def test_a_dotted_path_reward_with_arguments():
    settings = RewardSettings(fn='tests.plugins:length_reward{"scale": 2.5}')
    settings.load()
    # 2.5 per gold in the response, minus 1 while training; evaluation (validate) keeps it all.
    result = settings.score(GOOD, ["paris", "lyon"])
    assert result.score == pytest.approx(2.5 - 1.0)
    assert settings.score(GOOD, ["paris"], validate=True).score == pytest.approx(2.5)
    # A float score still reports the standard EM/F1 of the extracted answer (evaluation tables).
    assert (result.em, result.f1, result.answer) == (1.0, 1.0, "Paris")
    assert settings.score("no answer", "paris").em == 0.0  # a single gold string works too
    full = RewardSettings(fn="tests.plugins.full_result").score(GOOD, ["x"])
    assert full == RewardResult(0.25, em=1.0, f1=0.5, answer="x", reason="custom")


def test_a_registered_reward(monkeypatch):
    monkeypatch.setattr(registry, "_FUNCTIONS", {})
    registry.resolve_reward.cache_clear()
    registry.register_reward("always_half", lambda response, golds, *, validate: 0.5)
    assert registry.registered_rewards() == ("qa", "always_half")
    assert RewardSettings(fn="always_half").score(GOOD, ["paris"]).score == 0.5


@pytest.mark.parametrize(
    "fn, message",
    [
        ("exact", r"no reward function is registered as 'exact'; registered: qa"),
        ("no_such_pkg:score", r"cannot import module 'no_such_pkg'"),
        ("tests.plugin_import_error.score", r"importing module 'tests.plugin_import_error' failed"),
        ("tests.plugins:nope", r"module 'tests.plugins' has no attribute 'nope'"),
        ('tests.plugins:length_reward{"weight": 1}', r"does not take the keyword arguments"),
        ("tests.plugins:EchoTool.run", r"does not take the keyword arguments"),  # no `validate`
    ],
)
def test_each_bad_reward_is_one_config_error_naming_the_setting(fn, message):
    with pytest.raises(ConfigError, match=r"reward.fn.*" + message):
        RewardSettings(fn=fn).load()


def test_the_settings_check_the_spec_and_the_returned_score(monkeypatch):
    with pytest.raises(ConfigError, match="the built-in 'qa' reward takes no arguments"):
        RewardSettings(fn='qa{"mode": "em"}')
    with pytest.raises(ConfigError, match="reward.fn='my reward'"):
        RewardSettings(fn="my reward")
    monkeypatch.setattr(registry, "_FUNCTIONS", {})
    registry.register_reward("nan_reward", lambda response, golds, *, validate: math.nan)
    with pytest.raises(ValueError, match="returned nan: a reward function returns a finite"):
        RewardSettings(fn="nan_reward").score(GOOD, ["paris"])
