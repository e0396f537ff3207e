"""Hand-written CPU kernels, compiled on first use and registered with XLA as FFI custom calls.

XLA:CPU has no fast way to reduce a row over runs of its mask: the pure-JAX path needs a prefix
count plus scatter/gather, several ns per token. ``run_mean.cc`` does it in one streaming pass per row
and is what :func:`atpo_jax.kernels.turns.per_token_run_mean` lowers to on CPU. GPU and TPU keep the
pure-JAX path.

The kernel is C++ compiled against the XLA FFI headers that ship with jaxlib. Rather than shipping
binaries for every jaxlib release and platform, the first trace on a machine compiles it with the
system C++ compiler (about 2 s) into a cache directory, and later processes load the cached
library. Nothing here is needed for correctness: when no compiler is found or the build fails, a
warning names the cause and the pure-JAX path is used.

Nothing is compiled on import. The switch is one environment variable, read when a program is
traced:

* ``ATPO_JAX_NATIVE=auto`` (default) — build on first CPU use (or load the cached build); if that
  fails, warn once (naming the cause and the fix) and use the pure-JAX path.
* ``ATPO_JAX_NATIVE=1`` (or ``true``/``on``/``yes``) — the kernel is required: a failed build raises
  :class:`NativeBuildError` instead of falling back.
* ``ATPO_JAX_NATIVE=0`` (or ``false``/``off``/``no``) — never build or use it (pure JAX, no
  warning).

``make native`` (:func:`build_run_mean`) builds it ahead of time into the cache. Other settings:
``ATPO_JAX_CACHE_DIR`` (where built libraries go; default ``$XDG_CACHE_HOME/atpo_jax/native`` or
``~/.cache/atpo_jax/native``, a private temporary directory if that is not writable) and ``CXX``
(the C++17 compiler; default the first of ``g++``, ``c++``, ``clang++`` on PATH).

The only process-wide state is the cached outcome of the first build attempt (the loaded library
and its registration with XLA, which are process-wide by nature). The pure-JAX path is the
documented reference; a caller that wants it for one trace passes ``native=False`` to
:func:`atpo_jax.kernels.turns.per_token_run_mean`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jaxlib

RUN_MEAN_TARGET = "atpo_run_mean"
SWITCH_ENV = "ATPO_JAX_NATIVE"
CACHE_ENV = "ATPO_JAX_CACHE_DIR"
_OFF_VALUES = ("0", "false", "off", "no")
_ON_VALUES = ("1", "true", "on", "yes")

_SOURCE_DIR = Path(__file__).resolve().parent
_RUN_MEAN_SOURCE = _SOURCE_DIR / "run_mean.cc"
_RUN_MEAN_SYMBOL = "AtpoRunMean"
_CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
_BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
# None until the first attempt; then True (registered) or the reason it is unavailable.
_run_mean_status: bool | str | None = None
# Loaded libraries stay referenced for the life of the process: XLA holds pointers into them.
_loaded_libraries: list[ctypes.CDLL] = []


class NativeBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded (the message says why and what to do)."""


def switch() -> str:
    """``ATPO_JAX_NATIVE`` as one of ``auto``, ``on``, ``off``.

    Raises:
      ValueError: the variable holds anything else (naming it and the accepted values).
    """
    raw = os.environ.get(SWITCH_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in _ON_VALUES:
        return "on"
    if raw in _OFF_VALUES:
        return "off"
    raise ValueError(
        f"{SWITCH_ENV}={os.environ[SWITCH_ENV]!r}: use auto (default), 1 (required) or 0 (never)"
    )


def run_mean_available() -> bool:
    """True when the CPU run-mean kernel is built, loaded and registered with XLA.

    ``off``: False, nothing built. Otherwise the first call per process builds (or loads from the
    cache) and registers the kernel; later calls are free. When it cannot be built, ``on`` raises
    :class:`NativeBuildError`, ``auto`` returns False after one warning naming the cause (only if
    the default JAX backend is the CPU: GPU/TPU programs never run the kernel).
    """
    global _run_mean_status
    mode = switch()
    if mode == "off":
        return False
    with _lock:
        if _run_mean_status is None:
            try:
                library = ctypes.CDLL(str(build_library(_RUN_MEAN_SOURCE)))
                handler = getattr(library, _RUN_MEAN_SYMBOL)
                _loaded_libraries.append(library)
                jax.ffi.register_ffi_target(
                    RUN_MEAN_TARGET, jax.ffi.pycapsule(handler), platform="cpu"
                )
                _run_mean_status = True
            except (NativeBuildError, OSError, AttributeError) as error:
                _run_mean_status = str(error)
                if mode == "auto" and jax.default_backend() == "cpu":
                    warnings.warn(
                        f"atpo_jax: the native CPU run-mean kernel is unavailable, so the slower "
                        f"pure-JAX path is used. {error} Set {SWITCH_ENV}=0 to use the pure-JAX "
                        "path without this warning.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        if _run_mean_status is not True and mode == "on":
            raise NativeBuildError(
                f"{SWITCH_ENV}=1 requires the native CPU run-mean kernel, but it is unavailable: "
                f"{_run_mean_status} Set {SWITCH_ENV}=auto to fall back to pure JAX."
            )
        return _run_mean_status is True


def build_run_mean() -> Path:
    """Builds the run-mean kernel into the cache now (``make native``); returns the library."""
    return build_library(_RUN_MEAN_SOURCE)


def build_library(source: Path, cache_dir: Path | None = None) -> Path:
    """Compiles ``source`` into a shared library in the cache and returns its path.

    The file name carries a hash of the source, the compiler and its version, the flags, jaxlib's
    version and FFI headers and the machine type, so a change to any of them builds afresh and
    machines sharing a cache directory never load each other's builds. Builds go to a temporary
    file that is renamed into place, so concurrent processes never see a half-written library.

    Raises:
      NativeBuildError: no compiler, or the compiler failed (its output is in the message).
    """
    compiler = _compiler_command()
    include_dir = Path(jax.ffi.include_dir())
    flags = [*_CXX_FLAGS, f"-I{include_dir}"]
    key = hashlib.sha256()
    for part in (
        source.read_bytes(),
        " ".join(compiler + flags).encode(),
        _compiler_version(compiler).encode(),
        jaxlib.__version__.encode(),
        platform.machine().encode(),
        *(header.read_bytes() for header in sorted(include_dir.rglob("*.h"))),
    ):
        key.update(hashlib.sha256(part).digest())
    cache_dir = cache_dir or _cache_dir()
    target = cache_dir / f"{source.stem}-{key.hexdigest()[:20]}.so"
    if target.exists():
        return target
    handle, partial = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=cache_dir)
    os.close(handle)
    try:
        command = [*compiler, *flags, str(source), "-o", partial]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise NativeBuildError(f"Running {shlex.join(command)} failed: {error}.") from error
        if result.returncode != 0:
            raise NativeBuildError(
                f"Compiling {source.name} failed (exit {result.returncode}) with "
                f"{shlex.join(command)}:\n{result.stderr[-3000:]}\nSet CXX to a C++17 compiler."
            )
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return target


def _compiler_command() -> list[str]:
    if os.environ.get("CXX", "").strip():
        return shlex.split(os.environ["CXX"])
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return [found]
    raise NativeBuildError(
        "No C++ compiler found (looked for $CXX, g++, c++, clang++ on PATH). Install one, "
        "e.g. `apt-get install g++`, or point CXX at one."
    )


def _compiler_version(compiler: list[str]) -> str:
    try:
        result = subprocess.run(
            [*compiler, "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NativeBuildError(
            f"Running {shlex.join(compiler)} --version failed: {error}."
        ) from error
    return result.stdout + result.stderr


def _cache_dir() -> Path:
    """The configured cache directory, created if needed; a private temporary one if unwritable."""
    if os.environ.get(CACHE_ENV):
        candidates = [Path(os.environ[CACHE_ENV]).expanduser()]
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        candidates = [Path(base) / "atpo_jax" / "native"]
    uid = os.getuid() if hasattr(os, "getuid") else None
    shared_tmp = Path(tempfile.gettempdir()) / f"atpo_jax-native-{uid}"
    candidates.append(shared_tmp)
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError:
            continue
        # In a shared temporary directory, only load libraries from a directory this user owns.
        if candidate == shared_tmp and uid is not None and candidate.stat().st_uid != uid:
            continue
        if os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    raise NativeBuildError(
        f"No writable cache directory for the native kernels (tried {', '.join(map(str, candidates))}); "
        f"set {CACHE_ENV} to a writable directory."
    )
