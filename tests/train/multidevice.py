"""Run a Python snippet in a fresh interpreter with N simulated CPU devices and collect its result.

The pytest process keeps its single CPU device (XLA's device count is fixed at backend start), so
anything that needs a mesh of 8 devices runs here, in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The snippet reports back by calling
``emit(obj)`` (defined for it), which prints one JSON line the parent picks out of the output.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Time limits on child processes guard against hangs, they do not measure speed: the suite runs on 2
# pytest-xdist workers on a 2-core machine, where a child can take twice its time alone and more.
HANG_GUARD_SCALE = 3.0
_MARKER = "@@RESULT@@ "

_PRELUDE = f"""
import json as _json, sys as _sys
def emit(obj):
    print({_MARKER!r} + _json.dumps(obj), flush=True)
"""


def subprocess_env(devices: int = 8, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child with ``devices`` CPU devices and the repo importable."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def run_python(
    code: str, *, devices: int = 8, timeout: float = 120.0, env: dict[str, str] | None = None
) -> Any:
    """Runs ``code`` (dedented) in a child process; returns the object it passed to ``emit``.

    Raises:
      AssertionError: with the child's output when it fails, emits nothing, or times out.
    """
    source = _PRELUDE + textwrap.dedent(code)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", source],
            env=subprocess_env(devices, env),
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout * HANG_GUARD_SCALE,
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"child timed out after {timeout * HANG_GUARD_SCALE}s\n{err.stdout}\n{err.stderr}"
        ) from None
    results = [
        line[len(_MARKER) :] for line in proc.stdout.splitlines() if line.startswith(_MARKER)
    ]
    if proc.returncode != 0 or len(results) != 1:
        raise AssertionError(
            f"child exited {proc.returncode} with {len(results)} result(s)\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return json.loads(results[0])
