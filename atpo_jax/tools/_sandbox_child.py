"""Bootstrap that runs INSIDE the python-tool subprocess (standard library only; not imported by atpo_jax).

Usage (by :mod:`atpo_jax.tools.python_sandbox`): ``python -I -B _sandbox_child.py CONFIG_JSON``.

Order matters: the limits are set and the code file is read before the audit hook goes in, and the
modules the error path needs are imported first, so the hook never has to allow anything for us.
Exit codes: 0 ok, 1 uncaught exception, 3 MemoryError (memory limit), 4 a blocked operation was
attempted and not handled.
"""

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


def main() -> None:
    config = json.loads(sys.argv[1])
    _set_limit(resource.RLIMIT_CORE, 0)
    _set_limit(resource.RLIMIT_AS, config["memory_bytes"])
    _set_limit(resource.RLIMIT_FSIZE, config["file_size_bytes"])
    resource.setrlimit(resource.RLIMIT_CPU, (config["cpu_seconds"], config["cpu_seconds"] + 1))
    # CPython ignores SIGXFSZ, which turns an over-long output into EFBIG errors and "Exception ignored"
    # noise at exit; the default action stops the process at once and the parent reports the limit.
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    with open(config["code_path"], encoding="utf-8") as f:
        source = f.read()
    workdir = config["workdir"]
    os.chdir(workdir)
    sys.path[0] = workdir  # the code may import helper files it wrote into its own directory
    sys.argv = ["main.py"]
    _install_guard(workdir, config["allow_network"])
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "main.py", "exec"), namespace)
    except SystemExit:
        raise
    except MemoryError:
        sys.stderr.write("MemoryError: the memory limit was exceeded\n")
        sys.exit(EXIT_MEMORY)
    except SandboxViolation as e:
        _print_user_traceback(e)
        sys.exit(EXIT_BLOCKED)
    except BaseException as e:
        _print_user_traceback(e)
        sys.exit(1)


def _print_user_traceback(exc: BaseException) -> None:
    """Prints the traceback without this bootstrap's frames (exec and audit hook), i.e. the user's view."""
    report = traceback.TracebackException.from_exception(exc)
    report.stack = traceback.StackSummary.from_list(
        [frame for frame in report.stack if frame.filename != __file__]
    )
    sys.stderr.write("".join(report.format()))


if __name__ == "__main__":
    main()
