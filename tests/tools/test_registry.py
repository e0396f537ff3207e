"""Tools from the config (``tools.instances``): registered names, dotted paths with JSON
arguments, the python tool's stop string, and one clear ConfigError for each way it goes wrong."""

from __future__ import annotations

import json

import pytest

from atpo_jax.rewards import compute_reward
from atpo_jax.settings import ConfigError, PluginSpec, load_object, parse_plugin_spec
from atpo_jax.tools import registry
from atpo_jax.tools.settings import ToolSettings, build_toolbox
from tests.plugins import EchoTool


@pytest.fixture
def corpus(tmp_path) -> str:
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": "1", "contents": '"Paris"\nParis is the capital of France.'}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toolbox(corpus: str, **settings):
    return build_toolbox(ToolSettings(**settings), default_corpus=corpus, max_workers=2)


def test_specs_parse_names_paths_and_json_arguments():
    assert parse_plugin_spec("search", "s") == PluginSpec("search", {})
    spec = parse_plugin_spec(' tests.plugins:EchoTool {"times": 2, "tag": "e"} ', "s")
    assert spec == PluginSpec("tests.plugins:EchoTool", {"times": 2, "tag": "e"}) and spec.is_path
    assert parse_plugin_spec("tests.plugins.EchoTool", "s").is_path
    assert load_object("tests.plugins.EchoTool", "s") is EchoTool
    assert load_object("tests.plugins:EchoTool.run", "s") is EchoTool.run
    with pytest.raises(ConfigError, match=r"tools.instances='my tool': expected a registered"):
        parse_plugin_spec("my tool", "tools.instances")
    with pytest.raises(ConfigError, match=r"several objects in one entry: give a tuple"):
        parse_plugin_spec("search,python", "tools.instances")
    with pytest.raises(ConfigError, match="not a valid JSON object"):
        parse_plugin_spec("tests.plugins:EchoTool{times: 2}", "tools.instances")
    with pytest.raises(ConfigError, match="expected a registered name or a dotted path"):
        parse_plugin_spec("tests.plugins:EchoTool[1]", "tools.instances")


def test_a_dotted_path_tool_joins_the_toolbox_with_its_arguments(corpus):
    box = toolbox(corpus, instances=("search", 'tests.plugins:EchoTool{"times": 2}'))
    assert box.tags == ("search", "echo")
    assert box.stop_strings == ("</search>", "</echo>")  # the rollout stops on its closing tag
    assert box.run("echo", "hi").text == "HI HI"
    assert "Paris" in box.run("search", "capital of France").text


def test_a_registered_name_and_a_run_without_search(corpus, monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", {})
    registry.register_tool("shout", lambda: EchoTool(times=3, tag="shout"))
    assert registry.registered_tools() == ("search", "python", "shout")
    box = toolbox(None, instances=("shout",))  # no search: no retriever needed
    assert box.tags == ("shout",) and box.run("shout", "a").text == "A A A"
    with pytest.raises(ValueError, match="plain identifier"):
        registry.register_tool("search", EchoTool)


def test_the_python_tool_as_in_the_reference(corpus):
    # Listed in tools.instances (or tools.python=true): </python> stops generation, and the
    # reward's +0.1 applies to a correct answer that used both tools.
    for settings in ({"instances": ("search", "python")}, {"python": True}):
        box = toolbox(corpus, python_isolation="unsafe", **settings)
        assert box.stop_strings == ("</search>", "</python>")
    both = (
        "<think>a</think> <search> q </search> <result> r </result> <think>b</think> "
        "<python> 1 </python> <result> 1 </result> <think>c</think> "
        "<answer> \\boxed{Paris} </answer>"
    )
    assert compute_reward(both, ["Paris"]).score == pytest.approx(1.1)
    assert compute_reward(both.replace("python", "calc"), ["Paris"]).score == 1.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("calculator", r"no tool is registered as 'calculator'; registered: search, python"),
        ("no_such_pkg.tools:Calc", r"cannot import module 'no_such_pkg.tools'"),
        ("tests.plugin_import_error:Tool", r"importing module 'tests.plugin_import_error' failed"),
        ("tests.plugins:Missing", r"module 'tests.plugins' has no attribute 'Missing'"),
        ("tests.plugins:NOT_CALLABLE", r"'tests.plugins:NOT_CALLABLE' is not callable"),
        ('tests.plugins:EchoTool{"size": 2}', r"does not take the keyword arguments.*times, tag"),
        ("tests.plugins:not_a_tool", r"returned a object, not a tool"),
        ("tests.plugins:broken_factory", r"failed: RuntimeError: no licence server"),
        ('tests.plugins:EchoTool{"tag": "a b"}', r"has tag 'a b'"),
        ('tests.plugins:EchoTool{"tag": "search"}', r"two tools registered for the tag 'search'"),
    ],
)
def test_each_bad_tool_is_one_config_error_naming_the_setting(corpus, spec, message):
    with pytest.raises(ConfigError, match=r"tools.instances.*" + message):
        toolbox(corpus, instances=("search", spec))


def test_the_settings_refuse_duplicates_and_arguments_for_built_ins():
    with pytest.raises(ConfigError, match="lists a tool twice"):
        ToolSettings(instances=("search", "search"))
    with pytest.raises(ConfigError, match="'search' takes no arguments"):
        ToolSettings(instances=('search{"topk": 5}',))
