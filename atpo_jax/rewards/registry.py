"""Reward functions by name: the built-in QA reward, any registered function, or a dotted path.

``reward.fn`` names the training and evaluation reward (``atpo_jax.settings.PluginSpec`` syntax):

* ``qa`` (the default): the paper's reward family of ``rewards.qa.compute_reward``, configured by
  ``reward.mode`` and ``reward.python_bonus``;
* a name given to :func:`register_reward`;
* a dotted path, ``my_pkg.rewards:score`` or ``my_pkg.rewards.score``, optionally with keyword
  arguments: ``'my_pkg.rewards:score{"partial": 0.5}'``.

A reward function is called as ``fn(response, golds, *, validate, **params)``: ``response`` is the
decoded response (prompt excluded, tool results included), ``golds`` the list of gold answers,
``validate`` True during evaluation. It returns a float (the score; evaluation then reports the
standard EM/F1 of the extracted answer) or a ``rewards.qa.RewardResult``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from atpo_jax.settings import ConfigError, check_call, load_object, parse_plugin_spec

BUILTIN_REWARD = "qa"
_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def register_reward(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Makes ``name`` usable as ``reward.fn``."""
    if name == BUILTIN_REWARD or not name.isidentifier():
        raise ValueError(f"register_reward: {name!r} must be a plain identifier other than 'qa'")
    _FUNCTIONS[name] = fn
    resolve_reward.cache_clear()
    return fn


def registered_rewards() -> tuple[str, ...]:
    """Every name ``reward.fn`` accepts without a dotted path."""
    return (BUILTIN_REWARD, *sorted(_FUNCTIONS))


@functools.cache
def resolve_reward(spec: str, setting: str = "reward.fn") -> Callable[..., Any]:
    """The function ``spec`` names (not ``qa``) with its JSON arguments bound, imported once;
    a ``ConfigError`` naming ``setting`` for an unknown name, an import failure or arguments the
    function does not take."""
    plugin = parse_plugin_spec(spec, setting)
    if plugin.is_path:
        fn = load_object(plugin.target, setting)
    elif plugin.target in _FUNCTIONS:
        fn = _FUNCTIONS[plugin.target]
    else:
        raise ConfigError(
            f"{setting}={spec!r}: no reward function is registered as {plugin.target!r}; "
            f"registered: {', '.join(registered_rewards())} (or give a dotted path, "
            "package.module:function)"
        )
    check_call(fn, {**plugin.params, "validate": False}, setting, repr(plugin.target))
    return functools.partial(fn, **plugin.params)
