"""A custom tool and a custom reward named by dotted path in the config, used through
``build_run`` (no training): the run's toolbox holds the tool (its closing tag is a stop string of
both searches), and the run's reward is the function, with its JSON arguments."""

from __future__ import annotations

import pytest

from atpo_jax.builder import build_run
from atpo_jax.config import run_settings
from atpo_jax.settings import ConfigError
from tests.train import runs


def _config(world_dir, **overrides):
    return runs.load_config(
        "tiny", {**runs.TINY, "data.synthetic_dir": world_dir, "sft.steps": 0, **overrides}
    )


def test_a_dotted_path_tool_and_reward_through_build_run(world_dir, tmp_path):
    config = _config(
        world_dir,
        **{
            "tools.instances": ("search", 'tests.plugins:EchoTool{"times": 2}'),
            "reward.fn": 'tests.plugins:length_reward{"scale": 3.0}',
        },
    )
    run = build_run(run_settings(config), str(tmp_path))
    assert run.toolbox.tags == ("search", "echo")
    assert "</echo>" in run.toolbox.stop_strings  # what build_search gives both engines
    assert run.search.toolbox is run.toolbox and run.eval_search.toolbox is run.toolbox
    assert run.toolbox.run("echo", "abc").text == "ABC ABC"
    assert run.toolbox.run("search", run.data.train[0].golds[0]).ok
    row = run.data.train[0]
    response = f"<answer>\\boxed{{{row.golds[0]}}}</answer>"
    assert run.settings.reward.score(response, row.golds).score == pytest.approx(3.0 - 1.0)
    assert run.settings.reward.score(response, row.golds, validate=True).em == 1.0


def test_a_bad_plugin_stops_build_run_with_the_setting_named(world_dir, tmp_path):
    bad_reward = _config(world_dir, **{"reward.fn": "tests.plugins:no_such_function"})
    with pytest.raises(ConfigError, match="reward.fn=.*has no attribute 'no_such_function'"):
        build_run(run_settings(bad_reward), str(tmp_path / "reward"))
    bad_tool = _config(world_dir, **{"tools.instances": ("search", "calculator")})
    with pytest.raises(ConfigError, match="no tool is registered as 'calculator'"):
        build_run(run_settings(bad_tool), str(tmp_path / "tool"))
