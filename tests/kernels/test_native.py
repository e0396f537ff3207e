"""The native CPU kernels: building, caching, dispatch, and falling back when they cannot be built.

Their numerical results are tested in test_turns.py (every per_token_run_mean test runs on the
default path, which is the native kernel here, and on the pure-JAX windowed path) and test_losses.py.
"""

from __future__ import annotations

import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atpo_jax import kernels
from atpo_jax.kernels import native
from atpo_jax.kernels.turns import per_token_run_mean

SOURCE = native._RUN_MEAN_SOURCE


def _has_compiler() -> bool:
    return bool(os.environ.get("CXX")) or any(
        shutil.which(name) for name in ("g++", "c++", "clang++")
    )


def _lowered_cpu_hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_kernel_is_built_and_used_on_cpu_when_a_compiler_exists():
    # CI and the development machine have g++: there the fast path must really be taken.
    values, mask = jnp.ones((2, 8)), jnp.ones((2, 8))
    if _has_compiler():
        assert native.run_mean_available()
        assert native.RUN_MEAN_TARGET in _lowered_cpu_hlo(per_token_run_mean, values, mask)
        loss_hlo = _lowered_cpu_hlo(
            lambda lp: kernels.atpo_policy_loss(lp, values, values, mask)[0], values
        )
        assert native.RUN_MEAN_TARGET in loss_hlo
    else:
        with pytest.warns(RuntimeWarning, match="No C\\+\\+ compiler found"):
            assert not native.run_mean_available()


def test_argument_and_environment_variable_select_the_pure_jax_path(monkeypatch):
    values, mask = jnp.ones((2, 8)), jnp.ones((2, 8))
    hlo = _lowered_cpu_hlo(lambda v, m: per_token_run_mean(v, m, native=False), values, mask)
    assert native.RUN_MEAN_TARGET not in hlo
    for value in ("0", "off", "False", " no "):
        monkeypatch.setenv(native.SWITCH_ENV, value)
        assert native.switch() == "off"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Disabling on purpose is silent.
            assert not native.run_mean_available()
            hlo = _lowered_cpu_hlo(lambda v, m: per_token_run_mean(v, m), values, mask)
        assert native.RUN_MEAN_TARGET not in hlo
        with pytest.raises(native.NativeBuildError, match="native=True"):
            per_token_run_mean(values, mask, native=True)
    for value, mode in (("1", "on"), ("yes", "on"), ("auto", "auto"), ("", "auto")):
        monkeypatch.setenv(native.SWITCH_ENV, value)
        assert native.switch() == mode
        assert native.run_mean_available() == _has_compiler()
    monkeypatch.setenv(native.SWITCH_ENV, "maybe")
    with pytest.raises(ValueError, match="ATPO_JAX_NATIVE='maybe': use auto"):
        native.switch()


def test_importing_the_kernels_compiles_nothing(tmp_path):
    """A fresh process that imports (and uses nothing of) the kernels builds no library."""
    import subprocess
    import sys

    env = {**os.environ, native.CACHE_ENV: str(tmp_path), "JAX_PLATFORMS": "cpu"}
    code = (
        "import atpo_jax.kernels, atpo_jax.kernels.native as n; assert n._run_mean_status is None"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not list(tmp_path.iterdir())


def test_required_kernel_that_cannot_be_built_raises(monkeypatch):
    def fail(source, cache_dir=None):
        raise native.NativeBuildError("No C++ compiler found (simulated).")

    monkeypatch.setattr(native, "_run_mean_status", None)
    monkeypatch.setattr(native, "build_library", fail)
    monkeypatch.setenv(native.SWITCH_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a warning
        with pytest.raises(native.NativeBuildError, match="ATPO_JAX_NATIVE=1 requires.*simulated"):
            native.run_mean_available()


def test_build_is_cached_by_content(tmp_path):
    if not _has_compiler():
        with pytest.raises(native.NativeBuildError, match="No C\\+\\+ compiler found"):
            native.build_library(SOURCE, cache_dir=tmp_path)
        return
    first = native.build_library(SOURCE, cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = native.build_library(SOURCE, cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp  # Loaded, not rebuilt.
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # No leftover temporary files.
    # A different source is a different library.
    changed = tmp_path / "src" / SOURCE.name
    changed.parent.mkdir()
    changed.write_text(SOURCE.read_text() + "\n// changed\n")
    other = native.build_library(changed, cache_dir=tmp_path)
    assert other != first and other.exists()


def test_missing_or_failing_compiler_is_one_clear_error(tmp_path, monkeypatch):
    has_compiler = _has_compiler()
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native.NativeBuildError, match="no-such-compiler"):
        native.build_library(SOURCE, cache_dir=tmp_path)
    monkeypatch.delenv("CXX")
    if not has_compiler:
        return
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++;\n")
    with pytest.raises(native.NativeBuildError, match="Compiling broken.cc failed"):
        native.build_library(broken, cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob(".broken-*"))


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def fail(source, cache_dir=None):
        raise native.NativeBuildError("No C++ compiler found (simulated).")

    # Pretend this process has not tried yet, with a build that fails.
    monkeypatch.setattr(native, "_run_mean_status", None)
    monkeypatch.setattr(native, "build_library", fail)
    with pytest.warns(RuntimeWarning, match="simulated.*ATPO_JAX_NATIVE=0"):
        assert not native.run_mean_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Only the first attempt warns.
        assert not native.run_mean_available()
        values = np.array([[1.0, 3.0, 0.0, 5.0]], np.float32)
        mask = np.array([[1, 1, 0, 1]])
        mean, runs = jax.jit(lambda v, m: per_token_run_mean(v, m))(values, mask)
    np.testing.assert_allclose(mean, [[2.0, 2.0, 0.0, 5.0]])
    np.testing.assert_array_equal(runs, [2])


def test_native_and_pure_jax_losses_agree():
    rng = np.random.default_rng(2)
    mask = (rng.uniform(size=(6, 300)) < 0.8).astype(np.float32)
    old = -rng.exponential(size=mask.shape).astype(np.float32)
    new = (old + rng.normal(0, 2e-3, mask.shape)).astype(np.float32)
    adv = rng.normal(size=mask.shape).astype(np.float32)

    def value_and_grad(lp, o, a, m):
        return jax.value_and_grad(lambda x: kernels.atpo_policy_loss(x, o, a, m)[0])(lp)

    loss, grad = jax.jit(value_and_grad)(new, old, adv, mask)
    with pytest.MonkeyPatch.context() as patch:  # the pure-JAX path, traced afresh
        patch.setenv(native.SWITCH_ENV, "0")
        want_loss, want_grad = jax.jit(lambda *a: value_and_grad(*a))(new, old, adv, mask)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-9)


def test_build_failure_is_silent_when_the_default_backend_is_not_cpu(monkeypatch):
    def fail(source, cache_dir=None):
        raise native.NativeBuildError("No C++ compiler found (simulated).")

    monkeypatch.setattr(native, "_run_mean_status", None)
    monkeypatch.setattr(native, "build_library", fail)
    monkeypatch.setattr(native.jax, "default_backend", lambda: "gpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # GPU/TPU programs never run the CPU kernel: no warning.
        assert not native.run_mean_available()
