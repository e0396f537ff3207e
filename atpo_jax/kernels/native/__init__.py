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

Settings (environment variables):

* ``ATPO_JAX_NATIVE=0`` (or ``false``/``off``/``no``) — never build or use the native kernels
  (pure-JAX everywhere, no warning).
* ``ATPO_JAX_CACHE_DIR`` — where built libraries go (default ``$XDG_CACHE_HOME/atpo_jax/native`` or
  ``~/.cache/atpo_jax/native``; a private temporary directory if that is not writable).
* ``CXX`` — the C++17 compiler to use (default: the first of ``g++``, ``c++``, ``clang++`` on PATH).
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
DISABLE_ENV = "ATPO_JAX_NATIVE"
CACHE_ENV = "ATPO_JAX_CACHE_DIR"
_OFF_VALUES = ("0", "false", "off", "no")

_SOURCE_DIR = Path(__file__).resolve().parent
_RUN_MEAN_SOURCE = _SOURCE_DIR / "run_mean.cc"
_RUN_MEAN_SYMBOL = "AtpoRunMean"
_CXX_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden")
_BUILD_TIMEOUT_S = 300

_lock = threading.Lock()
# None until the first attempt; then True (registered) or the reason it is unavailable.
_run_mean_status: bool | str | None = None
_disabled_depth = 0
# Loaded libraries stay referenced for the life of the process: XLA holds pointers into them.
_loaded_libraries: list[ctypes.CDLL] = []


class NativeBuildError(RuntimeError):
    """The C++ kernel could not be compiled or loaded (the message says why and what to do)."""


def run_mean_available() -> bool:
    """True when the CPU run-mean kernel is built, loaded and registered with XLA.

    The first call per process builds (or loads from the cache) and registers it; later calls are
    free. Returns False when it cannot be built, after one warning naming the cause if the default
    JAX backend is the CPU, and without a warning when ``ATPO_JAX_NATIVE=0`` or inside
    :func:`disabled`.
    """
    global _run_mean_status
    if _disabled_depth or os.environ.get(DISABLE_ENV, "1").strip().lower() in _OFF_VALUES:
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
                if jax.default_backend() != "cpu":
                    # GPU/TPU programs never use the CPU kernel: no reason to bother their users.
                    return False
                warnings.warn(
                    f"atpo_jax: the native CPU run-mean kernel is unavailable, so the slower "
                    f"pure-JAX path is used. {error} Set {DISABLE_ENV}=0 to use the pure-JAX path "
                    "without this warning.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _run_mean_status is True


@contextlib.contextmanager
def disabled():
    """Traces inside this block use the pure-JAX kernels, in every thread of the process (for
    comparisons; functions already traced keep what they were traced with)."""
    global _disabled_depth
    with _lock:
        _disabled_depth += 1
    try:
        yield
    finally:
        with _lock:
            _disabled_depth -= 1


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
