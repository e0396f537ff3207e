"""The ``python`` tool: runs model-written code in a separate, limited process. Off unless enabled.

Each call gets a fresh temporary directory, a new process session, stdin closed, a minimal environment and:

* a wall-clock timeout (the whole process group is killed with SIGKILL when it fires),
* ``RLIMIT_CPU`` (SIGXCPU), ``RLIMIT_AS`` (MemoryError), ``RLIMIT_FSIZE`` (SIGXFSZ; it also bounds the
  captured stdout/stderr, which go to files rather than pipes so a flood cannot fill our memory),
* an audit hook (:mod:`atpo_jax.tools._sandbox_child`) that refuses process creation, writes outside the
  temporary directory, raising its own limits, signalling other processes and (by default) network access.

What this is and is not: it contains the accidents a language model makes (infinite loops, huge
allocations, runaway output, a stray ``os.system``). It is NOT a security boundary against deliberately
hostile code: a ``ctypes`` call can bypass an audit hook, and the child runs as the same user as the
trainer. Run the trainer in a container (or as an unprivileged user) when that matters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from atpo_jax.tools.base import ToolResult

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_EXIT_MEMORY = 3  # keep in sync with _sandbox_child.EXIT_MEMORY
_EXIT_BLOCKED = 4
_FENCE = re.compile(r"^\s*```(?:python|py)?\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)
TRUNCATION_MARK = "\n... [output truncated]"


@dataclasses.dataclass(frozen=True)
class PythonSandboxConfig:
    """Limits of the python tool. ``enabled`` is False by default: the tool refuses to run code.

    Attributes:
      enabled: run code at all.
      python: interpreter for the child (default: the current one, so the same packages are available).
      timeout_s: wall-clock limit per call.
      cpu_seconds: CPU-time limit per call.
      memory_mb: address-space limit.
      max_file_mb: largest file the code may write, including its captured stdout/stderr.
      max_output_chars: characters of output returned to the agent.
      allow_network: let the code open network connections.
      max_concurrent: sandboxes running at once (the rollout may call from 32 threads).
    """

    enabled: bool = False
    python: str = sys.executable
    timeout_s: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    max_file_mb: float = 8.0
    max_output_chars: int = 4000
    allow_network: bool = False
    max_concurrent: int = 4

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_seconds", "memory_mb", "max_file_mb", "max_output_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"PythonSandboxConfig.{name} must be > 0, got {getattr(self, name)}"
                )
        if self.max_concurrent < 1:
            raise ValueError(
                f"PythonSandboxConfig.max_concurrent must be >= 1, got {self.max_concurrent}"
            )


def strip_code_fence(code: str) -> str:
    """Removes a surrounding Markdown code fence (```python … ```), which models often add."""
    match = _FENCE.match(code)
    return match.group(1) if match else code


def _read_head(path: str, max_chars: int) -> tuple[str, bool]:
    """First ``max_chars`` characters of a file (decoded leniently) and whether there was more."""
    with open(path, "rb") as f:
        data = f.read(4 * max_chars + 4)
    text = data.decode("utf-8", errors="replace")
    more = len(text) > max_chars or os.path.getsize(path) > len(data)
    return text[:max_chars], more


def _read_tail(path: str, max_chars: int) -> str:
    """Last ``max_chars`` characters of a file (where a traceback's final error line is)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 4 * max_chars))
        text = f.read().decode("utf-8", errors="replace")
    return text if len(text) <= max_chars and size <= 4 * max_chars else "..." + text[-max_chars:]


class PythonTool:
    """Runs the content of ``<python> … </python>`` and returns its output as the observation.

    ``run`` returns ``ok=True`` whenever the code ran, including when it raised or hit a limit: the text
    then explains what happened, and the agent sees it (the reference counts an error text as a successful
    call too). ``ok=False`` means the tool is disabled or the interpreter could not start.
    """

    tag = "python"

    def __init__(self, config: PythonSandboxConfig = PythonSandboxConfig()) -> None:
        self.config = config
        self._slots = threading.Semaphore(config.max_concurrent)

    def run(self, content: str) -> ToolResult:
        if not self.config.enabled:
            return ToolResult(
                ok=False,
                text="",
                status="disabled",
                error="the python tool is disabled; enable it with PythonSandboxConfig(enabled=True)",
            )
        with self._slots:
            tmp = tempfile.mkdtemp(prefix="atpo-python-")
            try:
                return self._run_in(tmp, strip_code_fence(content))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def _run_in(self, tmp: str, code: str) -> ToolResult:
        cfg = self.config
        workdir = os.path.join(tmp, "work")
        os.mkdir(workdir)
        code_path = os.path.join(tmp, "main.py")
        with open(code_path, "w", encoding="utf-8") as f:
            f.write(code)
        child_config = {
            "workdir": workdir,
            "code_path": code_path,
            "memory_bytes": int(cfg.memory_mb * 2**20),
            "file_size_bytes": int(cfg.max_file_mb * 2**20),
            "cpu_seconds": int(cfg.cpu_seconds),
            "allow_network": cfg.allow_network,
        }
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
            # BLAS/OpenMP thread pools reserve address space per thread; one thread keeps RLIMIT_AS honest.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        timed_out = False
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [cfg.python, "-I", "-B", _CHILD, json.dumps(child_config)],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # own process group: one killpg reaches every descendant
                    close_fds=True,
                )
            except OSError as e:
                return ToolResult(
                    ok=False,
                    text="",
                    status="error",
                    error=f"could not start the python sandbox with {cfg.python!r}: {e}",
                )
            try:
                returncode = proc.wait(timeout=cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                returncode = proc.wait()
            finally:
                _kill_group(proc.pid)  # anything the code left behind in its group
        return self._report(returncode, timed_out, out_path, err_path)

    def _report(self, returncode: int, timed_out: bool, out_path: str, err_path: str) -> ToolResult:
        cfg = self.config
        stdout, stdout_cut = _read_head(out_path, cfg.max_output_chars)
        stderr = _read_tail(err_path, cfg.max_output_chars)
        if stdout_cut:
            stdout += TRUNCATION_MARK
        if timed_out:
            status, note = "timeout", f"Execution timed out after {cfg.timeout_s:g} s."
        elif returncode == -signal.SIGXCPU:
            status, note = (
                "cpu_limit",
                f"Execution stopped: CPU time limit of {cfg.cpu_seconds} s exceeded.",
            )
        elif returncode == -signal.SIGXFSZ:
            status, note = "output_limit", "Execution stopped: output or file size limit exceeded."
            stdout = stdout if stdout.endswith(TRUNCATION_MARK) else stdout + TRUNCATION_MARK
        elif returncode == _EXIT_MEMORY:
            status, note = (
                "memory_limit",
                f"Execution stopped: memory limit of {cfg.memory_mb} MB exceeded.",
            )
        elif returncode == _EXIT_BLOCKED or "[sandbox] blocked:" in stderr:
            status, note = (
                "blocked",
                "Execution error: an operation not allowed in the sandbox was attempted.",
            )
        elif returncode < 0:
            status, note = (
                "error",
                f"Execution killed by signal {_signal_name(-returncode)}.",
            )
        elif returncode != 0:
            status, note = "error", "Execution error."
        else:
            status, note = "ok", ""
        parts = [stdout.rstrip("\n")] if stdout.strip() else []
        if status != "ok":
            parts.append(note)
            if stderr.strip():
                parts.append(stderr.rstrip("\n"))
        text = "\n".join(parts) if parts else "Execution finished with no output."
        return ToolResult(ok=True, text=text, status=status, error=None if status == "ok" else note)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time or platform-specific signal without a name
        return str(number)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is already gone
        os.killpg(pgid, signal.SIGKILL)
