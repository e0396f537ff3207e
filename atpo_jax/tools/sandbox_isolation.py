"""Isolation levels of the python tool: which mechanism contains model code, and what it may see.

``bwrap`` (bubblewrap) and ``unshare`` (our own namespace setup, :mod:`atpo_jax.tools.sandbox_namespace`)
are OS-level boundaries: new user, mount, pid, ipc, uts and (unless network is allowed) network
namespaces, a read-only view of the system and interpreter directories, a size-limited tmpfs as the only
writable directory, a fresh /proc, no capabilities, ``RLIMIT_NPROC``, and every process killed when the
call ends. ``unsafe`` is the child process with limits and an audit hook only: it contains accidents,
not hostile code. ``auto`` picks the strongest level this machine supports and refuses when there is
none. docs/security.md says what each level contains and what it does not.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable

from atpo_jax.settings import StrEnum


class Isolation(StrEnum):
    """How the python tool isolates the code it runs (``PythonSandboxConfig.isolation``)."""

    AUTO = (
        "auto"  # bwrap when it can give every guarantee, else unshare; refuses when neither works
    )
    BWRAP = "bwrap"  # bubblewrap >= 0.8 (for --size), run by a non-root user
    UNSHARE = "unshare"  # user namespaces through the kernel directly (Linux, nothing to install)
    UNSAFE = "unsafe"  # no OS isolation: rlimits and an audit hook only


class SandboxUnavailableError(RuntimeError):
    """The requested isolation level (or, for ``auto``, every level) is not available here."""


# Directories every program needs (the dynamic loader, libc, locale data, /etc/passwd, certificates).
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Paths that the sandbox builds itself and that a read-only bind must not replace.
RESERVED_PATHS = ("/", "/proc", "/dev", "/sys")

_PATHS_QUERY = (
    "import json, sys; print(json.dumps([sys.executable, sys.prefix, sys.exec_prefix, "
    "sys.base_prefix, sys.base_exec_prefix, *sys.path]))"
)


def check_read_only_path(path: str) -> None:
    """Raises ``ValueError`` for a path that cannot be exposed read-only (relative or reserved)."""
    if not os.path.isabs(path):
        raise ValueError(f"PythonSandboxConfig.read_only_paths: {path!r} must be an absolute path")
    normal = os.path.normpath(path)
    if _inside(os.path.realpath(tempfile.gettempdir()), os.path.realpath(normal)):
        # Each call's working directory lives under the temporary directory: a bind above it would
        # show the other calls' directories and hide this call's behind the host's permissions.
        raise ValueError(
            f"PythonSandboxConfig.read_only_paths: {path!r} contains the temporary directory "
            f"{tempfile.gettempdir()!r}, where the sandboxes' working directories live; expose a "
            "subdirectory instead"
        )
    for reserved in RESERVED_PATHS:
        if normal == reserved or (reserved != "/" and normal.startswith(reserved + "/")):
            raise ValueError(
                f"PythonSandboxConfig.read_only_paths: {path!r} is {reserved} or inside it, which the "
                "sandbox provides itself"
            )


@functools.cache
def interpreter_paths(python: str) -> tuple[str, ...]:
    """What ``python -I`` needs to start and import its packages (prefixes and ``sys.path``), asked of
    the interpreter itself once: another interpreter than ours has other paths."""
    out = subprocess.run(
        [python, "-I", "-c", _PATHS_QUERY], capture_output=True, text=True, timeout=60, check=True
    )
    executable, *paths = json.loads(out.stdout)
    return tuple(
        [os.path.dirname(executable), os.path.dirname(os.path.realpath(executable)), *paths]
    )


@functools.cache
def filesystem_view(
    python: str, extra: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The host paths bound read-only into the sandbox, and the symlinks that lead to them.

    Returns ``(binds, symlinks)``: real directories (or files) without one inside another, and
    ``(link, target)`` pairs for the requested paths that are symlinks or lie behind one (``/bin ->
    usr/bin`` on merged-/usr systems, a venv reached through a symlinked home directory).
    """
    wanted = [*SYSTEM_DIRS, *interpreter_paths(python), *extra]
    real = {os.path.realpath(p) for p in wanted if os.path.isabs(p) and os.path.exists(p)}
    binds = _outermost(real)
    symlinks = []
    for path in sorted({os.path.normpath(p) for p in wanted if os.path.isabs(p)}):
        if not os.path.exists(path) or os.path.realpath(path) == path:
            continue
        if _inside_any(path, binds) or any(_inside(path, link) for link, _ in symlinks):
            continue  # already reachable through a bind or an earlier link
        symlinks.append((path, os.path.realpath(path)))
    return binds, tuple(symlinks)


def _outermost(paths: Iterable[str]) -> tuple[str, ...]:
    kept: list[str] = []
    for path in sorted(paths):
        if not _inside_any(path, kept):
            kept.append(path)
    return tuple(kept)


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _inside_any(path: str, parents: Iterable[str]) -> bool:
    return any(_inside(path, parent) for parent in parents)


# --- bubblewrap ------------------------------------------------------------------------------------

_BWRAP_NEEDS = ("--size", "--disable-userns", "--json-status-fd", "--die-with-parent")


@functools.cache
def bwrap_problem() -> str | None:
    """Why the ``bwrap`` level cannot be used here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux (this is {sys.platform})"
    path = shutil.which("bwrap")
    if path is None:
        return "bwrap is not installed (apt-get install bubblewrap; version 0.8 or newer)"
    if os.geteuid() == 0:
        # bwrap maps the sandbox's uid to the caller's: for root that is host uid 0, which the kernel
        # exempts from RLIMIT_NPROC and which owns most files. The unshare level maps uid 65534.
        return "bwrap cannot run the code as a non-root host user when the trainer runs as root"
    try:
        usage = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{path} --help failed: {e}"
    missing = [flag for flag in _BWRAP_NEEDS if not re.search(rf"^\s*{flag}\b", usage, re.M)]
    if missing:
        return f"{path} lacks {', '.join(missing)} (needs bubblewrap 0.8 or newer)"
    return None


def bwrap_command(
    *,
    python: str,
    child: str,
    child_config: str,
    code_path: str,
    workdir: str,
    binds: Iterable[str],
    symlinks: Iterable[tuple[str, str]],
    disk_bytes: int,
    allow_network: bool,
    status_fd: int,
) -> list[str]:
    """The bubblewrap command line that runs the child bootstrap with the same guarantees as the
    unshare level."""
    command = [shutil.which("bwrap") or "bwrap"]
    command += ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    command += ["--unshare-cgroup-try"] + ([] if allow_network else ["--unshare-net"])
    # --die-with-parent: bwrap's pid 1 dies with its monitor, which returns when the code exits, and
    # the kernel then kills the rest of the pid namespace.
    command += ["--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL"]
    command += ["--uid", "65534", "--gid", "65534", "--hostname", "sandbox"]
    command += ["--json-status-fd", str(status_fd)]
    for path in binds:
        command += ["--ro-bind", path, path]
    for link, target in symlinks:
        command += ["--symlink", target, link]
    command += ["--ro-bind", child, child, "--ro-bind", code_path, code_path]
    command += ["--dev", "/dev", "--proc", "/proc", "--size", str(disk_bytes), "--tmpfs", workdir]
    command += ["--remount-ro", "/", "--chdir", workdir]
    return [*command, "--", python, "-I", "-B", child, child_config]


def bwrap_exit_code(status_text: str) -> int | None:
    """The code's exit status from bwrap's --json-status-fd output (signals as negative numbers, like
    ``Popen.returncode``), or None when bwrap never started it."""
    for line in status_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "exit-code" in record:
            code = int(record["exit-code"])
            return -(code - 128) if code > 128 else code  # bwrap reports a signal n as 128 + n
    return None


# --- choosing a level --------------------------------------------------------------------------------


def choose(requested: Isolation, problem: Callable[[Isolation], str | None]) -> Isolation:
    """The level to use for ``requested``; ``problem(level)`` says why a level is unavailable.

    Raises:
      SandboxUnavailableError: the requested level (for ``auto``: both OS levels) is unavailable. The
        message names the setting and the ways to fix it, including the explicit opt-out.
    """
    if requested is Isolation.UNSAFE:
        return Isolation.UNSAFE
    candidates = (
        (Isolation.BWRAP, Isolation.UNSHARE) if requested is Isolation.AUTO else (requested,)
    )
    reasons = {}
    for level in candidates:
        reason = problem(level)
        if reason is None:
            return level
        reasons[level] = reason
    raise SandboxUnavailableError(refusal_message(requested, reasons))


def refusal_message(requested: Isolation, reasons: dict[Isolation, str]) -> str:
    details = "; ".join(f"{level}: {reason}" for level, reason in reasons.items())
    return (
        f"the python tool refuses to run: PythonSandboxConfig.isolation={str(requested)!r} needs OS "
        f"isolation that this machine does not provide ({details}). Fix: allow unprivileged user "
        "namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone=1 on "
        "Debian/Ubuntu kernels that have it, a container seccomp/AppArmor profile that permits "
        "unshare/clone with CLONE_NEWUSER), or install bubblewrap >= 0.8 and run as a non-root user; "
        "or set isolation='unsafe' (tools.python_isolation=unsafe) to run model code with only "
        "resource limits and an audit hook, which is not a security boundary (docs/security.md)."
    )
