"""Tools by name: the built-in ones, any registered factory, or a dotted path from the config.

``tools.instances`` lists the tools of a run (``atpo_jax.settings.PluginSpec`` syntax):

* ``search`` and ``python``: built in, configured by the other ``tools.*`` settings (the
  retriever, ``tools.topk``, ``tools.python_isolation``, ...), so they take no JSON arguments.
* a name given to :func:`register_tool` (e.g. by a notebook before ``build_run``);
* a dotted path, ``my_pkg.my_tools:Calculator`` or ``my_pkg.my_tools.Calculator``, optionally with
  keyword arguments: ``'my_pkg.my_tools:Calculator{"precision": 4}'``.

A factory is called with the JSON arguments and must return a :class:`~atpo_jax.tools.base.Tool`:
an object with a ``tag`` (its trigger: ``<tag> ... </tag>``, whose closing tag becomes a stop
string of the rollout) and ``run(content) -> ToolResult`` (thread-safe: calls run concurrently).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from atpo_jax.settings import ConfigError, PluginSpec, check_call, load_object
from atpo_jax.tools.base import Tool

BUILTIN_TOOLS = ("search", "python")
_TAG = re.compile(r"[A-Za-z_][\w-]*")
_FACTORIES: dict[str, Callable[..., Tool]] = {}


def register_tool(name: str, factory: Callable[..., Tool]) -> Callable[..., Tool]:
    """Makes ``name`` usable in ``tools.instances``; ``factory(**params)`` builds the tool."""
    if name in BUILTIN_TOOLS or "." in name or ":" in name or not name.isidentifier():
        raise ValueError(
            f"register_tool: {name!r} must be a plain identifier other than {BUILTIN_TOOLS}"
        )
    _FACTORIES[name] = factory
    return factory


def registered_tools() -> tuple[str, ...]:
    """Every name ``tools.instances`` accepts without a dotted path."""
    return BUILTIN_TOOLS + tuple(sorted(_FACTORIES))


def make_tool(spec: PluginSpec, setting: str = "tools.instances") -> Tool:
    """The tool ``spec`` names (not a built-in), built and checked; a ``ConfigError`` naming
    ``setting`` for an unknown name, an import failure, wrong arguments or a non-tool."""
    if spec.is_path:
        factory = load_object(spec.target, setting)
    elif spec.target in _FACTORIES:
        factory = _FACTORIES[spec.target]
    else:
        raise ConfigError(
            f"{setting}: no tool is registered as {spec.target!r}; registered: "
            f"{', '.join(registered_tools())} (or give a dotted path, package.module:Factory)"
        )
    check_call(factory, spec.params, setting, repr(spec.target))
    try:
        tool = factory(**spec.params)
    except Exception as e:  # the user's constructor: report it as the config's problem
        raise ConfigError(
            f"{setting}: building {spec.target!r} with {dict(spec.params)} failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(tool, Tool):
        raise ConfigError(
            f"{setting}: {spec.target!r} returned a {type(tool).__name__}, not a tool (an object "
            "with a `tag` string and a `run(content) -> ToolResult` method)"
        )
    if not isinstance(tool.tag, str) or not _TAG.fullmatch(tool.tag):
        raise ConfigError(
            f"{setting}: {spec.target!r} has tag {tool.tag!r}; a tag is a name such as "
            "'calculator' (the model calls it as <calculator> ... </calculator>)"
        )
    return tool
