"""What every layer's settings share: string enums for choices and the configuration error.

Each consumer owns a frozen dataclass of its settings, with its defaults and its validation in
``__post_init__`` (``models.ModelSettings``, ``rollout.RolloutSettings``, ``train.LossSettings``,
...). A run's config file is built from those dataclasses (``atpo_jax.run.config``), so a default
lives in exactly one place. This module has no dependency beyond the standard library.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import inspect
import json
import re
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A setting is missing, unknown or inconsistent; the message names it and the fix."""


class StrEnum(str, enum.Enum):
    """A choice among named strings (``enum.StrEnum`` for Python 3.10).

    Members compare equal to their values (``ExpansionMode.ENTROPY == "entropy"``), so they pass
    straight to the kernels, which take strings, and print as their value.
    """

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls, value: Any, setting: str) -> StrEnum:
        """``value`` (a member or its string) as a member; a ``ConfigError`` naming ``setting``
        and every valid value otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise ConfigError(f"{setting}={value!r} is not one of {choices}") from None


def check(condition: bool, message: str) -> None:
    """Raises ``ConfigError(message)`` unless ``condition`` (for ``__post_init__`` checks)."""
    if not condition:
        raise ConfigError(message)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every field of dataclass ``cls`` (string annotations evaluated)."""
    return typing.get_type_hints(cls)


def coerce_choices(settings: Any, section: str) -> None:
    """In a frozen settings dataclass's ``__post_init__``: turns every string given for an enum
    field into its member, or raises a ``ConfigError`` naming ``<section>.<field>`` and the valid
    values (so ``RolloutSettings(expansion_mode="entropy")`` works and a typo is one clear error)."""
    types = field_types(type(settings))
    for field in dataclasses.fields(settings):
        kind = types[field.name]
        if isinstance(kind, type) and issubclass(kind, StrEnum):
            value = kind.parse(getattr(settings, field.name), f"{section}.{field.name}")
            object.__setattr__(settings, field.name, value)


# ------------------------------------------------------------------ plugins named in a config

_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?")


@dataclasses.dataclass(frozen=True)
class PluginSpec:
    """A tool or reward function named in a config (``tools.instances``, ``reward.fn``).

    Written ``TARGET`` or ``TARGET{JSON object}``: ``TARGET`` is a registered name (``search``,
    ``qa``) or a dotted path to a Python object, ``package.module:attr`` (``attr`` may itself be
    dotted) or ``package.module.attr``; the JSON object holds the keyword arguments it is called
    with. Example: ``'my_tools.calc:Calculator{"precision": 4}'``.

    Attributes:
      target: the name or dotted path.
      params: the keyword arguments (empty without a JSON object).
    """

    target: str
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_path(self) -> bool:
        """A dotted path (imported), not a registered name."""
        return "." in self.target or ":" in self.target


def parse_plugin_spec(spec: str, setting: str) -> PluginSpec:
    """``spec`` as a :class:`PluginSpec`, or a ``ConfigError`` naming ``setting``."""
    text = spec.strip()
    brace = text.find("{")
    target = (text if brace < 0 else text[:brace]).strip()
    if not _TARGET.fullmatch(target):
        if "," in target:  # --config.tools.instances=a,b gives the one string "a,b"
            raise ConfigError(
                f"{setting}={spec!r} names several objects in one entry: give a tuple, e.g. "
                f"--config.{setting}=\"('search', 'python')\""
            )
        raise ConfigError(
            f"{setting}={spec!r}: expected a registered name or a dotted path "
            "(package.module:attr or package.module.attr), optionally followed by a JSON object "
            'of keyword arguments, e.g. my_pkg.tools:MyTool{"size": 3}'
        )
    params: dict[str, Any] = {}
    if brace >= 0:  # text[brace:] starts with "{": it parses to a dict or not at all
        try:
            params = json.loads(text[brace:])
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{setting}={spec!r}: the keyword arguments after {target!r} are not a valid "
                f"JSON object ({e.msg} at character {e.pos + 1})"
            ) from None
    return PluginSpec(target, params)


def load_object(target: str, setting: str) -> Any:
    """The object a dotted path names (``package.module:attr.sub`` or ``package.module.attr``),
    imported; a ``ConfigError`` naming ``setting`` and the module when it cannot be."""
    if ":" in target:
        module_name, _, attr_path = target.partition(":")
    else:
        module_name, _, attr_path = target.rpartition(".")
    try:
        value: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"{setting}={target!r}: cannot import module {module_name!r} ({e}); is it installed "
            "or on PYTHONPATH?"
        ) from e
    except Exception as e:  # the module itself fails while importing: say so, with the cause
        raise ConfigError(
            f"{setting}={target!r}: importing module {module_name!r} failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    for part in attr_path.split("."):
        if not hasattr(value, part):
            raise ConfigError(
                f"{setting}={target!r}: module {module_name!r} has no attribute {attr_path!r}"
            )
        value = getattr(value, part)
    return value


def check_call(fn: Any, params: Mapping[str, Any], setting: str, shown: str) -> None:
    """Raises a ``ConfigError`` naming ``setting`` unless ``fn`` accepts the keyword arguments
    ``params`` (on top of its positional ones); ``shown`` is how the config names ``fn``."""
    if not callable(fn):
        raise ConfigError(f"{setting}: {shown} is not callable")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: its call will tell
        return
    try:
        signature.bind_partial(**params)
    except TypeError as e:
        accepted = ", ".join(
            name
            for name, p in signature.parameters.items()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        raise ConfigError(
            f"{setting}: {shown} does not take the keyword arguments {dict(params)}: {e} "
            f"(it takes: {accepted or 'none'})"
        ) from None
