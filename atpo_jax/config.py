"""The one boundary between ml_collections config files and the typed settings.

A config file (``configs/search_qa.py``) starts from :func:`default_config`, a ``ConfigDict`` made
from the settings dataclasses' defaults (``RunSettings``: one section per consumer), and only
overrides values. The builder (``atpo_jax.builder.build_run``) turns the whole dict back into a
``RunSettings`` with :func:`run_settings`, one call that rejects unknown keys, wrong types and
invalid choices with a message naming the setting. Below the entry points nothing else reads a
``ConfigDict``.

    config = default_config()
    config.rollout.beam_size = 4                 # what --config.rollout.beam_size=4 does
    settings = run_settings(config)              # RunSettings, validated
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from atpo_jax.settings import ConfigError, StrEnum, field_types
from atpo_jax.train.settings import RunSettings


def section(settings: Any) -> ml_collections.ConfigDict:
    """A settings dataclass instance as a ``ConfigDict`` (nested dataclasses become nested dicts,
    choices their strings)."""
    values = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if dataclasses.is_dataclass(value):
            value = section(value)
        elif isinstance(value, StrEnum):
            value = value.value
        values[field.name] = value
    return ml_collections.ConfigDict(values)


def default_config() -> ml_collections.ConfigDict:
    """Every setting of a run with its default, from the settings dataclasses."""
    return section(RunSettings())


def run_settings(config: Mapping[str, Any]) -> RunSettings:
    """The validated :class:`RunSettings` of a config (a ``ConfigDict`` or any mapping).

    Raises:
      ConfigError: an unknown or mistyped setting, an invalid choice, or a failed check; the
        message names the setting and the fix.
    """
    return to_settings(RunSettings, config, "")


def to_settings(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """``cls`` (a settings dataclass) from ``values``; keys it lacks keep their defaults."""
    if not isinstance(values, Mapping) and not hasattr(values, "keys"):
        raise ConfigError(f"{prefix or 'the config'} must be a section (a dict of settings)")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values.keys()) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]} is not a setting{' of ' + prefix if prefix else ''}; known: "
            f"{', '.join(sorted(known))}"
        )
    types = field_types(cls)
    kwargs = {
        name: _convert(types[name], values[name], f"{prefix}.{name}" if prefix else name)
        for name in known
        if name in values
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _convert(kind: Any, value: Any, setting: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return to_settings(kind, value, setting)
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return kind.parse(value, setting)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{setting}={value!r} must be true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{setting}={value!r} must be an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{setting}={value!r} must be a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{setting}={value!r} must be a string")
        return value
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{setting}={value!r} must be a tuple")
        args = typing.get_args(kind)
        items = tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]
            return tuple(_convert(args[0], item, setting) for item in items)
        if len(args) != len(items):
            raise ConfigError(f"{setting}={value!r} must have {len(args)} entries")
        return tuple(_convert(a, item, setting) for a, item in zip(args, items, strict=True))
    return value
