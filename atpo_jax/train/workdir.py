"""Who owns a run directory, and what it holds: the lock, the run manifest, fresh/resume/overwrite.

A workdir belongs to one run. Before a run writes anything there, :func:`claim_workdir`:

1. takes an exclusive lock on ``<workdir>/.lock`` (``fcntl.flock``: released by the kernel when
   the process dies, so a killed run never leaves a stale lock); a second run into the same
   workdir refuses, naming the holder (pid, host, start time);
2. decides what the run may do with what is already there (:class:`WorkdirMode`):

   * ``fresh`` (the default): the workdir must hold no earlier run (no checkpoint, metrics,
     manifest or export). Starting over silently would mix two runs: the old checkpoints would be
     kept (a step that exists is never saved again), and a later ``--resume`` or ``evaluate``
     would read them.
   * ``resume``: continue the run recorded there. Its manifest's settings are compared with the
     new ones; a difference that changes the run (shapes, seed, data, algorithm, ...) refuses,
     listing every difference, unless it is named in ``allow_changes``. Settings that only say how
     far or how visibly the run goes (:data:`RESUMABLE_CHANGES`: ``train.steps``, logging,
     checkpoint cadence, evaluation, the mesh, tool endpoints and timeouts) may change.
   * ``overwrite``: move everything the earlier run left into ``<workdir>/archive/<UTC time>/``
     (a rename: nothing is deleted, and ``rm -r`` of that folder is the user's call), then start
     fresh.
3. writes the manifest ``<workdir>/run.json``: the settings (every field, flattened), their
   fingerprint, the code version, the start time and the command line.

In a multi-process run only process 0 locks and reads or writes the workdir (it is shared), and
every process gets its verdict, so all of them refuse together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from atpo_jax import __version__
from atpo_jax.settings import ConfigError, StrEnum

LOCK_FILE = ".lock"
MANIFEST_FILE = "run.json"
ARCHIVE_DIR = "archive"

# What a run leaves in its workdir; any of these marks the workdir as used.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", MANIFEST_FILE, "hf_export", "traces", "tensorboard")

# Settings whose change on --resume does not change what the resumed steps compute: how many
# steps there are, how often and where things are logged, saved or evaluated, the device mesh
# (checkpoints reshard exactly), and how the tools are reached. A setting ending in ".*" covers
# its whole section.
RESUMABLE_CHANGES = (
    "variant",
    "required",
    "train.steps",
    "train.log_every",
    "train.max_nonfinite_skips",
    "logging.*",
    "checkpoint.*",
    "eval.*",
    "mesh.*",
    "rollout.trace_every",
    "tools.retriever_url",
    "tools.timeout_s",
    "tools.retries",
)


class WorkdirError(ConfigError):
    """The workdir cannot be used as asked (in use, holds another run, unreadable, ...)."""


class WorkdirMode(StrEnum):
    FRESH = "fresh"
    RESUME = "resume"
    OVERWRITE = "overwrite"


# --------------------------------------------------------------------------------------------
# Settings as a flat, comparable record


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN: JSON has no NaN
        return "nan"
    return value


def flat_settings(settings: Any) -> dict[str, Any]:
    """Every field of a settings dataclass tree as ``{"section.field": JSON value}``."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for field in dataclasses.fields(node):
            value = getattr(node, field.name)
            name = f"{prefix}{field.name}"
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, name + ".")
            else:
                out[name] = _plain(value)

    walk(settings, "")
    return out


def fingerprint(flat: Mapping[str, Any]) -> str:
    """A short hash of a flat settings record (stable across processes and Python versions)."""
    blob = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _allowed(key: str, patterns: Iterable[str]) -> bool:
    for pattern in patterns:
        if pattern == key or (pattern.endswith(".*") and key.startswith(pattern[:-1])):
            return True
    return False


def settings_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every key whose value differs (or exists in one
    record only, shown as ``"<absent>"``)."""
    absent = "<absent>"
    keys = sorted(set(saved) | set(new))
    return {
        k: (saved.get(k, absent), new.get(k, absent))
        for k in keys
        if saved.get(k, absent) != new.get(k, absent)
    }


def blocking_changes(
    saved: Mapping[str, Any], new: Mapping[str, Any], allow: Iterable[str] = ()
) -> dict[str, tuple]:
    """The changes :func:`settings_changes` finds that neither :data:`RESUMABLE_CHANGES` nor
    ``allow`` (setting names, or ``section.*``) permit on resume."""
    allow = tuple(allow)
    return {
        k: v
        for k, v in settings_changes(saved, new).items()
        if not _allowed(k, RESUMABLE_CHANGES) and not _allowed(k, allow)
    }


# --------------------------------------------------------------------------------------------
# Manifest


def code_version() -> str:
    """``atpo_jax <version>`` plus the git commit of the source tree when it is a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    version = f"atpo_jax {__version__}"
    if os.path.isdir(os.path.join(root, ".git")):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            commit = subprocess.run(
                ["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            if commit:
                version += f" (git {commit})"
    return version


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_manifest(workdir: str) -> dict[str, Any] | None:
    """The run manifest of ``workdir``, or None when it has none."""
    path = os.path.join(workdir, MANIFEST_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings"), dict):
            raise ValueError("no 'settings' record")
    except (OSError, ValueError) as e:
        raise WorkdirError(
            f"{path} is unreadable ({e}); it records the settings of the run in this workdir. "
            "Restore it, or pass --overwrite to archive the workdir's run and start afresh"
        ) from None
    return manifest


def write_manifest(workdir: str, flat: Mapping[str, Any], *, resumed_from: Any = None) -> None:
    """Writes ``run.json`` atomically (a temporary file renamed over the old one)."""
    manifest = {
        "fingerprint": fingerprint(flat),
        "code_version": code_version(),
        "started": _now(),
        "command": sys.argv,
        "settings": dict(flat),
    }
    if resumed_from is not None:
        manifest["resumed_from"] = resumed_from
    path = os.path.join(workdir, MANIFEST_FILE)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Lock


class WorkdirLock:
    """An exclusive ``flock`` on ``<workdir>/.lock``, holding the holder's pid, host and time."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise WorkdirError(
                f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait "
                "for it to finish, stop it, or choose another --workdir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------------------------------------
# Claiming a workdir


def earlier_run(workdir: str) -> list[str]:
    """The outputs of an earlier run found in ``workdir`` (empty: the workdir is unused)."""
    found = []
    for name in RUN_OUTPUTS:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and os.listdir(path):
            found.append(name + "/")
        elif os.path.isfile(path) and os.path.getsize(path) > 0:
            found.append(name)
    return found


def archive_run(workdir: str) -> str:
    """Moves everything in ``workdir`` but the lock and earlier archives to
    ``<workdir>/archive/<UTC time>/``; returns that folder."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = os.path.join(workdir, ARCHIVE_DIR, stamp)
    os.makedirs(target)
    for name in sorted(os.listdir(workdir)):
        if name in (LOCK_FILE, ARCHIVE_DIR):
            continue
        os.rename(os.path.join(workdir, name), os.path.join(target, name))
    return target


def describe_changes(changes: Mapping[str, tuple]) -> str:
    """``"a.b: 1 -> 2; c.d: 'x' -> 'y'"`` for a :func:`settings_changes` result."""
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


@dataclasses.dataclass
class Claim:
    """The outcome of :func:`claim_workdir`: the lock (release it when the run ends), what was
    archived, and the changes accepted on resume."""

    lock: WorkdirLock | None
    archived_to: str | None = None
    accepted_changes: dict[str, tuple] = dataclasses.field(default_factory=dict)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim_workdir(
    workdir: str,
    settings: Any,
    mode: WorkdirMode | str = WorkdirMode.FRESH,
    *,
    allow_changes: Iterable[str] = (),
) -> Claim:
    """Locks ``workdir`` and checks that ``mode`` fits what it holds (see the module doc).

    Args:
      workdir: the run directory (created if missing).
      settings: the run's ``RunSettings`` (recorded in, or compared with, ``run.json``).
      mode: ``fresh``, ``resume`` or ``overwrite``.
      allow_changes: on resume, settings (``section.field`` or ``section.*``) allowed to differ
        from the saved run's beyond :data:`RESUMABLE_CHANGES`.

    Raises:
      WorkdirError: the workdir is locked by another run, holds a run that ``fresh`` would mix
        with, a resumed run's settings differ in a way not allowed, or it cannot be written.
    """
    mode = WorkdirMode.parse(mode, "workdir mode")
    try:
        os.makedirs(workdir, exist_ok=True)
        lock = WorkdirLock(workdir)
        lock.acquire()
    except OSError as e:
        raise WorkdirError(
            f"cannot use workdir {workdir}: {e.strerror or e}; choose a writable --workdir"
        ) from None
    claim = Claim(lock)
    try:
        flat = flat_settings(settings)
        found = earlier_run(workdir)
        if mode == WorkdirMode.FRESH and found:
            raise WorkdirError(
                f"workdir {workdir} already holds a run ({', '.join(found)}); pass --resume to "
                "continue it, --overwrite to archive it (to <workdir>/archive/) and start "
                "afresh, or choose another --workdir"
            )
        if mode == WorkdirMode.OVERWRITE and found:
            claim.archived_to = archive_run(workdir)
        resumed_from = None
        if mode == WorkdirMode.RESUME:
            manifest = read_manifest(workdir)
            if manifest is not None:
                saved = manifest["settings"]
                blocked = blocking_changes(saved, flat, allow_changes)
                if blocked:
                    names = ",".join(blocked)
                    raise WorkdirError(
                        f"--resume with settings that change the run in {workdir}: "
                        f"{describe_changes(blocked)}. Resume with the saved settings (run.json), or "
                        f"pass --resume_allow_changes={names} to accept these changes"
                    )
                claim.accepted_changes = settings_changes(saved, flat)
                resumed_from = manifest.get("fingerprint")
            elif found:
                # A workdir written before manifests existed: nothing to compare with.
                resumed_from = "unknown (no run.json)"
        write_manifest(workdir, flat, resumed_from=resumed_from)
    except OSError as e:
        claim.release()
        raise WorkdirError(
            f"cannot write workdir {workdir}: {e.strerror or e}; choose a writable --workdir"
        ) from None
    except BaseException:
        claim.release()
        raise
    return claim
