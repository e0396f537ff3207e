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
import typing
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
