"""The ``python`` tool: runs model-written code in a separate, limited process. Off unless enabled.

Each call gets a fresh temporary working directory, stdin closed, a minimal environment and:

* a wall-clock timeout (every process of the call is killed with SIGKILL when it fires),
* ``RLIMIT_CPU`` (SIGXCPU), ``RLIMIT_AS`` (MemoryError), ``RLIMIT_FSIZE`` (SIGXFSZ; it also bounds the
  captured stdout/stderr, which go to files rather than pipes so a flood cannot fill our memory),
* an audit hook (:mod:`atpo_jax.tools._sandbox_child`) that refuses process creation, writes outside the
  working directory, raising its own limits, signalling other processes and (by default) network
  access: a friendly first line that turns a model's accidents into a clear "blocked" message.

What contains the code depends on ``PythonSandboxConfig.isolation`` (docs/security.md has the detail):

* ``unshare`` and ``bwrap`` are OS-level boundaries meant to hold against deliberately hostile code
  (``ctypes``, ``os.spawnv``, ``multiprocessing`` spawn, ``dir_fd`` tricks...): new user, mount, pid,
  ipc, uts and (unless ``allow_network``) network namespaces; a read-only view of the system, the
  interpreter and its packages, and nothing else of the host's files; the working directory is a tmpfs
  of ``disk_mb``; a fresh /proc that shows only the sandbox's processes; the code runs without
  capabilities (as uid 65534 when the trainer is root), under ``RLIMIT_NPROC``, and every process it
  starts is killed when the call ends. They do not protect against kernel exploits or side channels.
* ``unsafe`` adds nothing to the limits and the audit hook: it contains the accidents a language model
  makes (infinite loops, huge allocations, runaway output, a stray ``os.system``) and is NOT a security
  boundary (``ctypes`` or ``os.spawnv`` bypass an audit hook; the child runs as the trainer's user).
* ``auto`` (the default) uses ``bwrap`` when it can give every guarantee, else ``unshare``, and refuses
  to enable the tool when neither works: running without isolation takes an explicit ``unsafe``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

from atpo_jax.tools import sandbox_isolation
from atpo_jax.tools.base import ToolResult
from atpo_jax.tools.sandbox_isolation import Isolation, SandboxUnavailableError

__all__ = [
    "Isolation",
    "PythonSandboxConfig",
    "PythonTool",
    "SandboxUnavailableError",
    "TRUNCATION_MARK",
    "resolve_isolation",
    "strip_code_fence",
]

log = logging.getLogger(__name__)

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_EXIT_MEMORY = 3  # keep in sync with _sandbox_child.EXIT_MEMORY
_EXIT_BLOCKED = 4
_FENCE = re.compile(r"^\s*```(?:python|py)?\s*\n(.*?)\n?\s*```\s*$", re.DOTALL)
_BYTES_PER_INODE = 4096  # the tmpfs gets one inode per 4 KiB of quota: empty files cannot escape it
_PROBE_OUTPUT = "sandbox-probe-ok"
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
      allow_network: let the code open network connections (isolated levels: the host's network
        namespace; otherwise a private one with no interfaces up).
      max_concurrent: sandboxes running at once (the rollout may call from 32 threads).
      isolation: ``auto`` | ``bwrap`` | ``unshare`` | ``unsafe`` (see :class:`Isolation` and
        docs/security.md). ``auto`` refuses to enable the tool where no OS isolation works.
      max_processes: processes and threads the code may have at once, itself included (isolated levels:
        ``RLIMIT_NPROC`` in the sandbox's own user namespace).
      disk_mb: size of the tmpfs working directory (isolated levels), the code's whole disk quota.
      read_only_paths: extra host paths (data files, say) the code may read (isolated levels; the
        system directories and the interpreter's prefixes and ``sys.path`` are always visible).
      audit_hook: install the audit hook that turns process creation, writes outside the working
        directory, signals and (without ``allow_network``) sockets into a "blocked" message. A
        courtesy against accidents, not a boundary; an isolated level may turn it off to let code
        start processes inside its sandbox. The unsafe level requires it.
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
    isolation: Isolation = Isolation.AUTO
    max_processes: int = 32
    disk_mb: float = 64.0
    read_only_paths: tuple[str, ...] = ()
    audit_hook: bool = True

    def __post_init__(self) -> None:
        isolation = Isolation.parse(self.isolation, "PythonSandboxConfig.isolation")
        object.__setattr__(self, "isolation", isolation)
        object.__setattr__(self, "read_only_paths", tuple(self.read_only_paths))
        for name in (
            "timeout_s",
            "cpu_seconds",
            "memory_mb",
            "max_file_mb",
            "max_output_chars",
            "disk_mb",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"PythonSandboxConfig.{name} must be > 0, got {getattr(self, name)}"
                )
        for name in ("max_concurrent", "max_processes"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"PythonSandboxConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        for path in self.read_only_paths:
            sandbox_isolation.check_read_only_path(path)
        if not self.audit_hook and isolation is Isolation.UNSAFE:
            raise ValueError(
                "PythonSandboxConfig.audit_hook=False needs an isolated level: at isolation='unsafe' "
                "the audit hook is all that stands between the code and the trainer's processes"
            )


def resolve_isolation(config: PythonSandboxConfig) -> Isolation:
    """The level ``config.isolation`` resolves to on this machine (``auto`` -> bwrap or unshare).

    Raises:
      SandboxUnavailableError: no OS isolation is available for what was asked; the message names the
        setting and how to fix it.
    """
    return sandbox_isolation.choose(
        config.isolation,
        lambda level: isolation_problem(level, config.python, config.allow_network),
    )


def isolation_problem(level: Isolation, python: str, allow_network: bool) -> str | None:
    """Why ``level`` cannot contain code here (None: it can). Tests replace this to simulate a machine
    without isolation mechanisms."""
    if level is Isolation.BWRAP:
        return sandbox_isolation.bwrap_problem()
    if level is Isolation.UNSHARE:
        return _unshare_problem(python, allow_network)
    return None


@functools.cache
def _unshare_problem(python: str, allow_network: bool) -> str | None:
    """Probes the unshare level end to end once per interpreter: user namespaces may be compiled out,
    limited to 0, forbidden by seccomp/AppArmor, or /proc may be masked so no new one can be mounted."""
    if not sys.platform.startswith("linux"):
        return f"user namespaces need Linux (this is {sys.platform})"
    config = PythonSandboxConfig(
        enabled=True,
        python=python,
        allow_network=allow_network,
        isolation=Isolation.UNSHARE,
        timeout_s=60,
    )
    result = _execute(config, Isolation.UNSHARE, f"print({_PROBE_OUTPUT!r})")
    if result.status == "ok" and result.text == _PROBE_OUTPUT:
        return None
    detail = (result.error or result.text).strip().splitlines()
    return "the probe failed: " + (detail[-1] if detail else result.status)


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
    call too). ``ok=False`` means the tool is disabled or the sandbox could not start.

    An enabled tool resolves its isolation level when it is built (``self.isolation``, logged), so a
    machine without the mechanism fails at start-up with :class:`SandboxUnavailableError`, not at the
    first call.
    """

    tag = "python"

    def __init__(self, config: PythonSandboxConfig = PythonSandboxConfig()) -> None:
        self.config = config
        self._slots = threading.Semaphore(config.max_concurrent)
        self.isolation: Isolation | None = None
        if config.enabled:
            self.isolation = resolve_isolation(config)
            how = "chosen by auto" if config.isolation is Isolation.AUTO else "as configured"
            log.info("python tool: isolation=%s (%s)", self.isolation, how)

    def run(self, content: str) -> ToolResult:
        if not self.config.enabled or self.isolation is None:
            return ToolResult(
                ok=False,
                text="",
                status="disabled",
                error="the python tool is disabled; enable it with PythonSandboxConfig(enabled=True)",
            )
        with self._slots:
            return _execute(self.config, self.isolation, strip_code_fence(content))


@dataclasses.dataclass(frozen=True)
class _CallFiles:
    """The host side of one call, all inside one temporary directory."""

    tmp: str

    @property
    def workdir(self) -> str:  # the code's cwd; the isolated levels mount their tmpfs at this path
        return os.path.join(self.tmp, "work")

    @property
    def code(self) -> str:
        return os.path.join(self.tmp, "main.py")

    @property
    def mountpoint(self) -> str:  # unshare: where the new root is assembled (in its own mount ns)
        return os.path.join(self.tmp, "root")

    @property
    def stdout(self) -> str:
        return os.path.join(self.tmp, "stdout")

    @property
    def stderr(self) -> str:
        return os.path.join(self.tmp, "stderr")

    @property
    def status(self) -> str:  # isolated levels: the code's exit status, written from inside
        return os.path.join(self.tmp, "status")


def _execute(cfg: PythonSandboxConfig, level: Isolation, code: str) -> ToolResult:
    """One call in a fresh temporary directory, removed afterwards."""
    files = _CallFiles(tempfile.mkdtemp(prefix="atpo-python-"))
    try:
        os.mkdir(files.workdir)
        os.mkdir(files.mountpoint)
        with open(files.code, "w", encoding="utf-8") as f:
            f.write(code)
        return _spawn_and_report(cfg, level, files)
    finally:
        shutil.rmtree(files.tmp, ignore_errors=True)


def _child_config(
    cfg: PythonSandboxConfig, level: Isolation, files: _CallFiles, status_fd: int
) -> dict:
    disk_bytes = int(cfg.disk_mb * 2**20)
    config = {
        "isolation": str(level),
        "workdir": files.workdir,
        "code_path": files.code,
        "memory_bytes": int(cfg.memory_mb * 2**20),
        "file_size_bytes": int(cfg.max_file_mb * 2**20),
        "cpu_seconds": int(cfg.cpu_seconds),
        "allow_network": cfg.allow_network,
        "max_processes": cfg.max_processes,
        "audit_hook": cfg.audit_hook,
    }
    if level is Isolation.UNSHARE:
        binds, symlinks = sandbox_isolation.filesystem_view(cfg.python, cfg.read_only_paths)
        config |= {
            "status_fd": status_fd,
            "mountpoint": files.mountpoint,
            "ro_binds": list(binds),
            "symlinks": [list(pair) for pair in symlinks],
            "disk_bytes": disk_bytes,
            "max_inodes": max(1024, disk_bytes // _BYTES_PER_INODE),
        }
    return config


def _command(
    cfg: PythonSandboxConfig, level: Isolation, files: _CallFiles, status_fd: int
) -> list[str]:
    child_config = json.dumps(_child_config(cfg, level, files, status_fd))
    if level is not Isolation.BWRAP:
        return [cfg.python, "-I", "-B", _CHILD, child_config]
    binds, symlinks = sandbox_isolation.filesystem_view(cfg.python, cfg.read_only_paths)
    return sandbox_isolation.bwrap_command(
        python=cfg.python,
        child=_CHILD,
        child_config=child_config,
        code_path=files.code,
        workdir=files.workdir,
        binds=binds,
        symlinks=symlinks,
        disk_bytes=int(cfg.disk_mb * 2**20),
        allow_network=cfg.allow_network,
        status_fd=status_fd,
    )


def _environment(workdir: str) -> dict[str, str]:
    return {
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


def _spawn_and_report(cfg: PythonSandboxConfig, level: Isolation, files: _CallFiles) -> ToolResult:
    isolated = level is not Isolation.UNSAFE
    timed_out = False
    status_fd = (
        os.open(files.status, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if isolated else -1
    )
    try:
        with open(files.stdout, "wb") as out, open(files.stderr, "wb") as err:
            try:
                proc = subprocess.Popen(
                    _command(cfg, level, files, status_fd),
                    cwd=files.workdir,
                    env=_environment(files.workdir),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,  # own process group: one killpg reaches every descendant
                    close_fds=True,
                    pass_fds=(status_fd,) if isolated else (),
                )
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                # a missing interpreter, or (isolated levels) one that cannot report its paths
                return ToolResult(
                    ok=False,
                    text="",
                    status="error",
                    error=f"could not start the python sandbox with {cfg.python!r}: {e}",
                )
            try:
                returncode = _wait(proc, cfg.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)  # the isolated levels' pid 1 is in the group: its pid ns dies
                returncode = proc.wait()
            finally:
                _kill_group(proc.pid)  # anything the code left behind in its group
    finally:
        if isolated:
            os.close(status_fd)
    if isolated and not timed_out:
        code_status = _isolated_exit_status(level, files.status)
        if code_status is None:
            return _setup_failure(level, files.stderr, returncode)
        returncode = code_status
    return _report(cfg, returncode, timed_out, files.stdout, files.stderr)


def _wait(proc: subprocess.Popen, timeout_s: float) -> int:
    """``proc.wait(timeout)`` without its polling: Popen sleeps up to 50 ms between checks, which was
    most of a short call's latency. A pidfd wakes us the moment the child exits (Linux >= 5.3)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux, or an old kernel
        return proc.wait(timeout=timeout_s)
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(timeout_s * 1000):
            raise subprocess.TimeoutExpired(proc.args, timeout_s)
    finally:
        os.close(pidfd)
    return proc.wait()


def _isolated_exit_status(level: Isolation, status_path: str) -> int | None:
    """The code's exit status as reported from inside the sandbox (None: the code never ran)."""
    with open(status_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if level is Isolation.BWRAP:
        return sandbox_isolation.bwrap_exit_code(text)
    try:
        return int(json.loads(text)["exit"])
    except (ValueError, KeyError, TypeError):
        return None


def _setup_failure(level: Isolation, stderr_path: str, returncode: int) -> ToolResult:
    lines = _read_tail(stderr_path, 2000).strip().splitlines()
    detail = lines[-1] if lines else f"exit status {returncode}"
    return ToolResult(
        ok=False,
        text="",
        status="error",
        error=f"the python sandbox (isolation={level}) could not start: {detail}",
    )


def _report(
    cfg: PythonSandboxConfig, returncode: int, timed_out: bool, out_path: str, err_path: str
) -> ToolResult:
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
