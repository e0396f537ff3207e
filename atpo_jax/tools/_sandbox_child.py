"""Bootstrap that runs INSIDE the python-tool subprocess (standard library only; not imported by atpo_jax).

Usage (by :mod:`atpo_jax.tools.python_sandbox`): ``python -I -B _sandbox_child.py CONFIG_JSON``.

Order matters: the code file is read first (the isolated levels hide the host's files), then, for the
``unshare`` level, :mod:`atpo_jax.tools.sandbox_namespace` moves the process into its namespaces and
drops its privileges; the limits are set before the audit hook goes in, and the modules the error path
needs are imported first, so the hook never has to allow anything for us. The audit hook is a friendly
first line against accidents, not the boundary (``ctypes`` gets around it); the isolated levels' kernel
namespaces are. Exit codes: 0 ok, 1 uncaught exception (and any ``sys.exit`` code outside 0..127, so
that codes above 128 keep meaning "killed by a signal"), 3 MemoryError (memory limit), 4 a blocked
operation was attempted and not handled.
"""

import atexit
import contextlib
import importlib.util
import json
import os
import resource
import signal
import sys
import traceback

EXIT_MEMORY = 3
EXIT_BLOCKED = 4
_MAX_BLOCK_REPORTS = 5


class SandboxViolation(PermissionError):
    """Raised by the audit hook for an operation the sandbox does not allow."""


def _set_limit(kind: int, value: int) -> None:
    # soft == hard, so the code cannot raise its own limits (setrlimit is also blocked below).
    resource.setrlimit(kind, (value, value))


def _install_guard(workdir: str, allow_network: bool) -> None:
    root = os.path.realpath(workdir)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    process_events = {
        "os.fork",
        "os.forkpty",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "subprocess.Popen",
        "os.startfile",
        "resource.setrlimit",
        "resource.prlimit",
    }
    path_events = {  # event -> indices of the path arguments that must stay inside the workdir
        "os.remove": (0,),
        "os.rmdir": (0,),
        "os.mkdir": (0,),
        "os.rename": (0, 1),
        "os.symlink": (1,),
        "os.link": (1,),
        "os.chmod": (0,),
        "os.chown": (0,),
        "os.truncate": (0,),
        "os.utime": (0,),
        "os.setxattr": (0,),
        "os.removexattr": (0,),
    }
    network_events = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}
    reports = [0]

    def inside(path: object) -> bool:
        if isinstance(path, int):  # an already-open file descriptor
            return True
        try:
            resolved = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False
        return resolved == os.devnull or os.path.commonpath([root, resolved]) == root

    def block(event: str, detail: str) -> None:
        if reports[0] < _MAX_BLOCK_REPORTS:  # bounded, so a retry loop cannot flood stderr
            reports[0] += 1
            sys.stderr.write(f"[sandbox] blocked: {event} {detail}\n")
        raise SandboxViolation(f"the sandbox does not allow {event} {detail}".rstrip())

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, flags = args[0], args[2]
            if isinstance(flags, int) and flags & write_flags and not inside(path):
                block("writing", repr(path))
        elif event in process_events:
            block(event, "")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and not inside(args[i]):
                    block(event, repr(args[i]))
        elif event in ("os.kill", "os.killpg") and args and args[0] not in (0, os.getpid()):
            block(event, repr(args[0]))
        elif event in network_events and not allow_network:
            block(event, "")

    sys.addaudithook(hook)


def _enter_namespaces(config: dict) -> int:
    """The ``unshare`` level's setup (returns in the sandboxed process only); loaded by path because
    ``-I`` keeps this directory off ``sys.path``. Returns how many helper processes share the code's
    uid (they count against its RLIMIT_NPROC)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_namespace.py")
    spec = importlib.util.spec_from_file_location("sandbox_namespace", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.enter(config)


def _set_limits(config: dict, max_processes: int | None) -> None:
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_AS, config["memory_bytes"])
    _set_limit(resource.RLIMIT_FSIZE, config["file_size_bytes"])
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_seconds"], config["cpu_seconds"] + 1))
    if max_processes is not None:
        # Counted per user in the sandbox's own user namespace, so concurrent calls do not share it.
        # Not used at the unsafe level, where it would count every process of the trainer's user.
        _set_limit(resource.RLIMIT_NPROC, max_processes)
    # CPython ignores SIGXFSZ, which turns an over-long output into EFBIG errors and "Exception ignored"
    # noise at exit; the default action stops the process at once and the parent reports the limit.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)


def _exit_code(exc: SystemExit) -> int:
    """``sys.exit``'s code, kept in 0..127: above 128 the parent reads "killed by signal n - 128"."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code if 0 <= code <= 127 else 1
    sys.stderr.write(f"{code}\n")  # what the interpreter does with sys.exit("message")
    return 1


def main() -> None:
    config = json.loads(sys.argv[1])
    with open(config["code_path"], encoding="utf-8") as f:
        source = f.read()
    isolation = config.get("isolation", "unsafe")
    helpers = 0
    if isolation == "unshare":
        helpers = _enter_namespaces(config)
    elif isolation == "bwrap":
        helpers = 1  # bwrap's pid 1 runs as the same uid inside the sandbox
    max_processes = None if isolation == "unsafe" else config["max_processes"] + helpers
    _set_limits(config, max_processes)
    workdir = config["workdir"]
    os.chdir(workdir)
    sys.path[0] = workdir  # the code may import helper files it wrote into its own directory
    sys.argv = ["main.py"]
    if config.get("audit_hook", True):
        _install_guard(workdir, config["allow_network"])
    _finish(_run_code(source), forked=isolation == "unshare")


def _run_code(source: str) -> int:
    """Runs the model's code as ``__main__``; returns the exit code (see the module docstring)."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "main.py", "exec"), namespace)
    except SystemExit as e:
        return _exit_code(e)
    except MemoryError:
        sys.stderr.write("MemoryError: the memory limit was exceeded\n")
        return EXIT_MEMORY
    except SandboxViolation as e:
        _print_user_traceback(e)
        return EXIT_BLOCKED
    except BaseException as e:
        _print_user_traceback(e)
        return 1
    return 0


def _finish(code: int, *, forked: bool) -> None:
    if not forked:
        sys.exit(code)
    # The unshare level's code process is a fork of the helper: a full interpreter shutdown writes to
    # nearly every page it shares with its parent (reference counts), copying them all, which cost
    # 20-80 ms per call. Do what the shutdown does for the user's code, then leave.
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()  # join non-daemon threads, as the interpreter would
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _print_user_traceback(exc: BaseException) -> None:
    """Prints the traceback without this bootstrap's frames (exec and audit hook), i.e. the user's view."""
    report = traceback.TracebackException.from_exception(exc)
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if frame.filename != __file__]
    )
    sys.stderr.write("".join(report.format()))


if __name__ == "__main__":
    main()
