"""Shared fixtures for the kernel tests: every kernel test runs eagerly and under jax.jit."""

from __future__ import annotations

import jax
import numpy as np
import pytest

_JITTED: dict = {}


def _jitted(fn, static_names: tuple[str, ...]):
    key = (fn, static_names)
    if key not in _JITTED:
        _JITTED[key] = jax.jit(fn, static_argnames=static_names)
    return _JITTED[key]


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray | jax.Array)


@pytest.fixture(params=["eager", "jit"])
def call(request):
    """call(fn, *arrays, **kwargs): runs the kernel eagerly or jitted (non-array kwargs are static)."""

    def run(fn, *args, **kwargs):
        if request.param == "eager":
            return fn(*args, **kwargs)
        static = tuple(sorted(k for k, v in kwargs.items() if not _is_array(v)))
        return _jitted(fn, static)(*args, **kwargs)

    run.mode = request.param
    return run
