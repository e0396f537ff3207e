"""The ``unshare`` isolation level, run INSIDE the sandbox helper (standard library only; Linux).

:mod:`atpo_jax.tools._sandbox_child` loads this file by path and calls :func:`enter` before it reads
or runs any model code. Three processes result::

    helper (A, the trainer's child; new user/mount/pid/ipc/uts[/net] namespaces)
      └─ init (C, pid 1 of the new pid namespace): builds the filesystem, waits, reports the status
           └─ code (D, pid 2): drops every privilege, sets the limits, runs the model's code

:func:`enter` returns only in D. When C exits, the kernel kills every process left in the pid
namespace (``setsid``, double-forked daemons, anything), so nothing the code starts outlives a call.

Syscalls Python 3.11 does not wrap (``unshare``, ``mount``, ``pivot_root``, ``prctl``, ``capset``) go
through ``ctypes``. That is our trusted setup code, run before the model's code exists in the
process; the model's code can use ``ctypes`` too, which is why the boundary is the kernel's
namespaces, mounts and credentials set up here, not the audit hook.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# pivot_root has no libc wrapper; its syscall number per architecture.
_SYS_PIVOT_ROOT = {
    "x86_64": 155,
    "aarch64": 41,
    "arm64": 41,
    "riscv64": 41,
    "ppc64le": 203,
    "ppc64": 203,
    "s390x": 217,
}

NOBODY = 65534  # the uid/gid the code runs as (nobody/nogroup)
SETUP_FAILED = 125  # exit code of the helper when the sandbox could not be built
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
_SKELETON_OPTIONS = "size=1m,nr_inodes=4096,mode=0755"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.prctl.argtypes = (
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
)


class SetupError(OSError):
    """A step of building the sandbox failed; the message says which."""


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise SetupError(errno, f"{what}: {os.strerror(errno)}")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    def enc(value: str | None) -> bytes | None:
        return None if value is None else os.fsencode(value)

    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


# --- A: the namespaces and the uid maps --------------------------------------------------------------


def enter(config: dict) -> int:
    """Moves this (single-threaded) process into fresh namespaces; returns only in the sandboxed process,
    with the number of helper processes that share its uid (for RLIMIT_NPROC: the helper and pid 1
    when the code could not be given uid 65534 of its own).

    Every failure before the code runs exits with ``SETUP_FAILED`` and a ``[sandbox] setup failed``
    line on stderr, so the trainer reports "could not start" rather than a result of the code.
    """
    try:
        alive_read, alive_write = _unshare_and_map(config)
    except OSError as e:
        _fail(e)
    init = os.fork()
    if init == 0:
        os.close(alive_write)  # so that the read end sees EOF once the helper is gone
        _become_init(config, alive_read)  # returns in the code process only
        return 0 if _nobody_is_mapped() else 2
    os.close(alive_read)
    os.chdir("/")  # the helper must not pin a directory of the host tree for longer than needed
    _, status = os.waitpid(init, 0)
    os._exit(0 if os.waitstatus_to_exitcode(status) == 0 else SETUP_FAILED)


def _unshare_and_map(config: dict) -> tuple[int, int]:
    """New namespaces with uid 0 inside; returns the helper's "still alive" pipe (read, write): the
    write end stays open in the helper until it exits."""
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if not config["allow_network"]:
        flags |= CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    alive = os.pipe()
    if uid == 0:
        # Root may map two ids: 0 for the setup and 65534 for the code. Running the code as host
        # uid 65534 (not root without capabilities) matters: the kernel never applies
        # RLIMIT_NPROC to host uid 0, and root-owned files stay unreadable. Only a process outside
        # the new user namespace may write such a map, so a child that stays outside writes it.
        ready_read, ready_write = os.pipe()
        helper = os.getpid()
        writer = os.fork()
        if writer == 0:
            os.close(ready_write)
            if os.read(ready_read, 1) != b"x":  # the helper failed (and exited) before unsharing
                os._exit(1)
            code = 0
            try:
                _write_maps(helper, f"0 0 1\n{NOBODY} {NOBODY} 1\n", deny_setgroups=False)
            except OSError as e:
                sys.stderr.write(f"[sandbox] setup failed: uid map: {e}\n")
                code = 1
            os._exit(code)
        os.close(ready_read)
        _check(_libc.unshare(flags), "unshare")
        os.write(ready_write, b"x")
        os.close(ready_write)
        _, status = os.waitpid(writer, 0)
        if status != 0:
            raise SetupError("the uid map of the sandbox could not be written")
    else:
        # An unprivileged user may map exactly itself; the code later drops its capabilities.
        _check(_libc.unshare(flags), "unshare")
        _write_maps(os.getpid(), f"0 {uid} 1\n", deny_setgroups=True, gid_map=f"0 {gid} 1\n")
    return alive


def _write_maps(
    pid: int, uid_map: str, *, deny_setgroups: bool, gid_map: str | None = None
) -> None:
    if deny_setgroups:  # required before an unprivileged process may write its gid_map
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(uid_map)
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(gid_map if gid_map is not None else uid_map)


def _fail(error: BaseException) -> None:
    sys.stderr.write(f"[sandbox] setup failed: {error}\n")
    sys.stderr.flush()
    os._exit(SETUP_FAILED)


# --- C: pid 1, the filesystem --------------------------------------------------------------------


def _become_init(config: dict, alive_read: int) -> None:
    """Pid 1: builds the root, forks the code process and reports its exit status."""
    try:
        # The helper killed (the trainer's timeout) -> so is pid 1, and with it the whole namespace.
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if _helper_gone(alive_read):  # it died before PDEATHSIG was armed
            os._exit(SETUP_FAILED)
        # Pid 1 ignores signals without a handler when they come from inside the namespace; Python's
        # SIGINT handler would let the code interrupt us, so pid 1 keeps none.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _build_root(config)
        _lock_down_namespace()
    except OSError as e:
        _fail(e)
    code = os.fork()
    if code == 0:
        os.close(alive_read)
        os.close(config["status_fd"])
        try:
            _drop_privileges(runs_as_nobody=_nobody_is_mapped())
        except OSError as e:
            _fail(e)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return
    status = _reap_until(code)
    os.write(config["status_fd"], json.dumps({"exit": os.waitstatus_to_exitcode(status)}).encode())
    os._exit(0)  # the kernel now kills whatever the code left running in this pid namespace


def _helper_gone(alive_read: int) -> bool:
    """The helper holds the pipe's write end until it exits: EOF means it is gone."""
    os.set_blocking(alive_read, False)
    try:
        return os.read(alive_read, 1) == b""
    except BlockingIOError:
        return False


def _reap_until(pid: int) -> int:
    """Waits for ``pid``, reaping the orphans that pid 1 inherits on the way."""
    while True:
        done, status = os.waitpid(-1, 0)
        if done == pid:
            return status


def _build_root(config: dict) -> None:
    """A new root on a small tmpfs: read-only binds of the system and interpreter directories, device
    nodes, a fresh /proc and the size-limited working directory; then the old root is detached."""
    root = config["mountpoint"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount propagates back to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, _SKELETON_OPTIONS)
    for path in config["ro_binds"]:
        _bind_read_only(path, root + path)
    for link, target in config["symlinks"]:
        if not os.path.lexists(root + link):
            os.makedirs(os.path.dirname(root + link), exist_ok=True)
            os.symlink(target, root + link)
    _make_dev(root)
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _mount_workdir(config, root)
    _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _pivot_root(root)


def _bind_read_only(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
    _mount(source, target, None, MS_BIND | MS_REC)
    # A recursive bind copies the submounts writable; each one is made read-only on its own.
    for mountpoint in _mounts_under(target):
        _mount(None, mountpoint, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _kept_flags(mountpoint))


def _mounts_under(target: str) -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return [p for p in points if p == target or p.startswith(target.rstrip("/") + "/")]


def _unescape(field: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as octal."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def _kept_flags(mountpoint: str) -> int:
    """Flags a remount inside a user namespace must keep (the kernel locks them), plus nosuid/nodev."""
    flag = os.statvfs(mountpoint).f_flag
    flags = MS_NOSUID | MS_NODEV
    if flag & os.ST_NOEXEC:
        flags |= MS_NOEXEC
    if flag & os.ST_NOATIME:
        flags |= MS_NOATIME
    elif flag & os.ST_RELATIME:
        flags |= MS_RELATIME
    else:
        flags |= MS_STRICTATIME
    if flag & os.ST_NODIRATIME:
        flags |= MS_NODIRATIME
    return flags


def _make_dev(root: str) -> None:
    """A /dev with only the harmless character devices (bound from the host) and the fd links."""
    os.makedirs(root + "/dev", exist_ok=True)
    for name in _DEVICES:
        if os.path.exists("/dev/" + name):
            target = f"{root}/dev/{name}"
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o666))
            _mount("/dev/" + name, target, None, MS_BIND)
    for name, target in _DEV_LINKS.items():
        os.symlink(target, f"{root}/dev/{name}")


def _mount_workdir(config: dict, root: str) -> None:
    """The only writable place: a tmpfs whose size and inode count are the disk quota."""
    target = root + config["workdir"]
    os.makedirs(target, exist_ok=True)
    owner = NOBODY if _nobody_is_mapped() else 0
    options = f"size={config['disk_bytes']},nr_inodes={config['max_inodes']},mode=0700,uid={owner},gid={owner}"
    _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)


def _pivot_root(root: str) -> None:
    """Makes ``root`` the root and detaches the old one, so no path (or chroot escape) leads back."""
    machine = os.uname().machine
    number = _SYS_PIVOT_ROOT.get(machine)
    if number is None:
        raise SetupError(f"pivot_root: no known syscall number on {machine}")
    os.chdir(root)
    _check(_libc.syscall(number, b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount the old root")
    os.chdir("/")


def _lock_down_namespace() -> None:
    """No further user namespaces from inside (a new one would grant capabilities again), and a
    neutral host name."""
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    # sethostname(2), not /proc/sys/kernel/hostname: that file belongs to the host's root, which an
    # unprivileged trainer's user namespace does not map.
    _check(_libc.sethostname(b"sandbox", len(b"sandbox")), "sethostname")


def _nobody_is_mapped() -> bool:
    with open("/proc/self/uid_map", encoding="ascii") as f:
        return any(line.split()[0] == str(NOBODY) for line in f)


# --- D: the code process -------------------------------------------------------------------------


def _drop_privileges(*, runs_as_nobody: bool) -> None:
    """No capabilities (now or after an exec), and no way to gain any: the code cannot undo the
    read-only mounts, mount anything, or raise its limits."""
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    if runs_as_nobody:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)  # leaving uid 0 clears every capability set
    else:
        _clear_capabilities()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)  # setuid binaries and file capabilities grant nothing
    # Changing uid made the process non-dumpable, which hands its /proc/self files to root: the code
    # could not list /proc/self/fd or read /proc/self/environ. Only its own processes share its uid.
    _prctl(PR_SET_DUMPABLE, 1)


def _clear_capabilities() -> None:
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable for both 32-bit halves
    _check(_libc.capset(header, data), "capset")
