"""Small numeric helpers shared by the kernels (not part of the public API)."""

from __future__ import annotations

import chex
import jax.numpy as jnp


def as_float(x: chex.Array) -> chex.Array:
    """Casts to at least float32 (bf16/f16 are promoted; float64 stays float64 in x64 mode)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def as_mask(mask: chex.Array, dtype) -> chex.Array:
    """A {0, 1} float mask from a bool / int / float mask (any non-zero entry counts as 1)."""
    return (jnp.asarray(mask) != 0).astype(dtype)


def safe_divide(numerator: chex.Array, denominator: chex.Array) -> chex.Array:
    """numerator / denominator, and 0 where the denominator is 0 (no NaN, no NaN gradient)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def masked_mean(values: chex.Array, mask: chex.Array, axis=None) -> chex.Array:
    """sum(values * mask) / sum(mask) over ``axis``; 0 for an empty mask."""
    return safe_divide(jnp.sum(values * mask, axis=axis), jnp.sum(mask, axis=axis))


def check_choice(setting: str, value: str, choices: tuple[str, ...]) -> None:
    """Raises ``ValueError`` naming ``setting`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"{setting}={value!r} is not supported; choose one of {', '.join(choices)}"
        )
