"""The python tool's OS isolation levels: each escape the audit found has no effect on the host.

Every escape runs at the isolated level that ``auto`` picks here (bwrap or unshare); the tests skip,
saying why, on a machine where neither works. Where the audit hook would already stop an escape, the
test turns the hook off (``audit_hook=False``) so that what is tested is the kernel boundary. Host-side
checks look at the host itself: its files, its processes (``/proc/*/cmdline`` of the test's own
view) and a signal handler in this process. ``test_a_setsid_daemon_escapes_the_unsafe_level`` shows
that the process check does see an escape when there is one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import stat
import textwrap
import time
import uuid

import pytest

from atpo_jax.settings import ConfigError
from atpo_jax.tools import python_sandbox, sandbox_isolation
from atpo_jax.tools.python_sandbox import (
    Isolation,
    PythonSandboxConfig,
    PythonTool,
    SandboxUnavailableError,
    resolve_isolation,
)
from atpo_jax.tools.settings import ToolSettings, build_toolbox

LIMITS = dict(
    enabled=True,
    timeout_s=15,
    cpu_seconds=5,
    memory_mb=512,
    max_file_mb=1,
    max_output_chars=4000,
    disk_mb=4,
    max_processes=8,
)


@pytest.fixture(scope="module")
def level() -> Isolation:
    try:
        return resolve_isolation(PythonSandboxConfig(**LIMITS))
    except SandboxUnavailableError as e:
        pytest.skip(f"no OS isolation mechanism on this machine: {e}")


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> str:
    """A host directory the sandbox may read (``read_only_paths``), with one file in it."""
    path = tmp_path_factory.mktemp("exposed")
    (path / "data.txt").write_text("original")
    # The code runs as uid 65534 when the trainer is root: it reads what "others" may read.
    path.chmod(0o755)
    (path / "data.txt").chmod(0o644)
    return str(path)


@pytest.fixture(scope="module")
def sandbox(level, exposed):
    """``sandbox(**overrides)`` -> a PythonTool at the isolated level that sees ``exposed``."""

    def make(**overrides) -> PythonTool:
        return PythonTool(
            PythonSandboxConfig(
                **LIMITS | {"isolation": level, "read_only_paths": (exposed,)} | overrides
            )
        )

    return make


def run(tool: PythonTool, code: str) -> str:
    result = tool.run(COUNT_INSIDE + textwrap.dedent(code))
    assert result.ok, result
    return result.text


def snapshot(directory: str) -> dict[str, tuple]:
    """Every entry of a host directory with its content, mode and mtime."""
    entries = {}
    for name in sorted(os.listdir(directory)):
        info = os.lstat(os.path.join(directory, name))
        content = b""
        if stat.S_ISREG(info.st_mode):
            with open(os.path.join(directory, name), "rb") as f:
                content = f.read()
        entries[name] = (content, info.st_mode, info.st_mtime_ns, info.st_nlink)
    return entries


def host_processes_with(marker: str) -> list[int]:
    """Pids of host processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except OSError:  # exited meanwhile
            continue
    return found


# Prepended to every test's code: how many of the sandbox's processes carry a marker (proves that
# an escape got going inside before the call ended).
COUNT_INSIDE = """import os


def count_inside(marker):
    n = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                n += marker.encode() in open(f"/proc/{p}/cmdline", "rb").read()
            except OSError:
                pass
    return n
"""


def token() -> str:
    return f"atpo-escape-{uuid.uuid4().hex[:12]}"


# --- processes ---------------------------------------------------------------------------------------


def test_multiprocessing_spawn_child_is_contained_and_dies_with_the_call(sandbox):
    marker = token()
    code = f"""
    import multiprocessing, os, sys, time
    # the bootstrap (sys.modules["__main__"]) is not visible in the sandbox; give spawn a main file
    open("job.py", "w").close()
    sys.modules["__main__"].__file__ = os.path.abspath("job.py")
    os.symlink(sys.executable, "{marker}")  # the child's argv[0] carries the marker
    ctx = multiprocessing.get_context("spawn")
    ctx.set_executable(os.path.abspath("{marker}"))
    p = ctx.Process(target=time.sleep, args=(60,))
    p.start()
    time.sleep(1.0)
    print(p.is_alive(), count_inside("{marker}"), flush=True)
    os._exit(0)  # leave without joining it
    """
    alive, running = run(sandbox(), code).split()
    # the hook does not see spawn: the child (and multiprocessing's resource tracker) ran, inside
    assert alive == "True" and int(running) >= 1
    assert host_processes_with(marker) == []


@pytest.mark.parametrize(
    "start",
    [
        "os.spawnv(os.P_NOWAIT, sys.executable, ARGS)",  # a fork the audit hook would refuse
        "spawnv_passfds(os.fsencode(sys.executable), ARGS, ())",  # _posixsubprocess, unaudited
    ],
)
def test_spawned_processes_die_with_the_call(sandbox, start):
    marker = token()
    code = f"""
    import os, sys, time
    from multiprocessing.util import spawnv_passfds
    ARGS = [sys.executable, "-c", "import time; time.sleep(60)", "{marker}"]
    {start}
    time.sleep(0.5)
    print(count_inside("{marker}"))
    """
    assert run(sandbox(audit_hook="spawnv(" not in start), code) == "1"
    assert host_processes_with(marker) == []


DAEMON = """
import os, sys, time
from multiprocessing.util import spawnv_passfds
daemon = "import os, time\\nos.setsid()\\nif os.fork():\\n    os._exit(0)\\ntime.sleep(60)"
spawnv_passfds(os.fsencode(sys.executable), [sys.executable, "-c", daemon, "{marker}"], ())
time.sleep(0.8)
print(count_inside("{marker}"))
"""


def test_a_setsid_daemon_dies_with_the_call(sandbox):
    marker = token()
    assert run(sandbox(), DAEMON.format(marker=marker)) == "1"
    assert host_processes_with(marker) == []


def test_a_timeout_kills_every_process_of_the_call(sandbox):
    marker = token()
    code = DAEMON.format(marker=marker) + "print('waiting', flush=True)\ntime.sleep(60)\n"
    result = sandbox(timeout_s=2).run(COUNT_INSIDE + code)
    assert result.status == "timeout" and result.text.startswith("1\nwaiting")
    deadline = time.monotonic() + 2  # the helper is killed; pid 1 follows it within moments
    while host_processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_processes_with(marker) == []


def test_a_setsid_daemon_escapes_the_unsafe_level():
    """Why the isolated levels exist, and proof that ``host_processes_with`` sees an escape."""
    marker = token()
    unsafe = PythonTool(PythonSandboxConfig(**LIMITS | {"isolation": Isolation.UNSAFE}))
    assert run(unsafe, DAEMON.format(marker=marker)) == "1"
    survivors = host_processes_with(marker)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert len(survivors) == 1


def test_a_fork_bomb_is_bounded_by_rlimit_nproc(sandbox):
    code = """
    import ctypes, os, time
    libc = ctypes.CDLL(None, use_errno=True)  # fork without the audit hook's os.fork event
    started = 0
    for _ in range(100):
        pid = libc.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        if pid < 0:
            break
        started += 1
    print(started, ctypes.get_errno(), os.getcwd())
    """
    started, error, workdir = run(sandbox(), code).split()
    # max_processes=8 counts the code's own process: 7 children, then EAGAIN
    assert (int(started), int(error)) == (7, errno.EAGAIN)
    assert host_processes_with(workdir) == []  # the children carry the call's config (its workdir)


# --- signals and secrets ---------------------------------------------------------------------------


def test_the_trainer_is_invisible_and_cannot_be_signalled(sandbox):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        code = f"""
        import os, signal
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        print("pids", pids, "ppid", os.getppid())
        for name, send in (
            ("kill", lambda: os.kill({os.getpid()}, signal.SIGUSR1)),
            ("pidfd", lambda: signal.pidfd_send_signal(os.pidfd_open({os.getpid()}), signal.SIGUSR1)),
            ("everyone", lambda: os.kill(-1, signal.SIGUSR1)),
        ):
            try:
                send()
                print(name, "sent")
            except OSError as e:
                print(name, type(e).__name__)
        """
        text = run(sandbox(audit_hook=False), code)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert received == []
    first, *attempts = text.splitlines()
    pids = json.loads(first.split("pids ")[1].split(" ppid")[0])
    assert os.getpid() not in pids and max(pids) < 10  # its own pid namespace: pid 1, 2, ...
    assert first.endswith("ppid 1")
    assert attempts[:2] == ["kill ProcessLookupError", "pidfd ProcessLookupError"]


def test_the_trainers_environment_is_not_visible(sandbox, monkeypatch):
    name = "ATPO_TEST_SECRET_" + uuid.uuid4().hex[:8].upper()
    monkeypatch.setenv(name, "hunter2")
    code = f"""
    import os
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if b"{name}=" in open(f"/proc/{{p}}/environ", "rb").read():
                    found.append(p)
            except OSError:
                pass
    own = b"HOME=" in open("/proc/self/environ", "rb").read()
    print("{name}" in os.environ, found, os.path.exists("/proc/{os.getpid()}"), own)
    """
    assert run(sandbox(), code) == "False [] False True"  # /proc works, shows nothing of ours


# --- files ---------------------------------------------------------------------------------------


def test_dir_fd_writes_into_a_host_directory_fail(sandbox, exposed):
    before = snapshot(exposed)
    code = f"""
    import os
    fd = os.open({exposed!r}, os.O_RDONLY)  # relative names below pass the audit hook's path check
    attempts = {{
        "create": lambda: os.open("new.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd),
        "truncate": lambda: os.open("data.txt", os.O_WRONLY | os.O_TRUNC, dir_fd=fd),
        "append": lambda: os.open("data.txt", os.O_WRONLY | os.O_APPEND, dir_fd=fd),
        "mkdir": lambda: os.mkdir("d", dir_fd=fd),
        "unlink": lambda: os.unlink("data.txt", dir_fd=fd),
        "rename": lambda: os.rename("data.txt", "x", src_dir_fd=fd, dst_dir_fd=fd),
        "symlink": lambda: os.symlink("/etc/passwd", "s", dir_fd=fd),
        "chmod": lambda: os.chmod("data.txt", 0o777, dir_fd=fd),
        "utime": lambda: os.utime("data.txt", (0, 0), dir_fd=fd),
    }}
    for name, attempt in attempts.items():
        try:
            attempt()
            print(name, "done")
        except OSError as e:
            print(name, e.errno)
    print(open("{exposed}/data.txt").read())
    """
    *results, content = run(sandbox(), code).splitlines()
    # EROFS, or EACCES where the permission check (uid 65534) comes before the read-only mount's
    assert [r.split()[0] for r in results] == [
        "create", "truncate", "append", "mkdir", "unlink", "rename", "symlink", "chmod", "utime"
    ]  # fmt: skip
    assert {int(r.split()[1]) for r in results} <= {errno.EROFS, errno.EACCES}
    assert content == "original"  # readable, not writable
    assert snapshot(exposed) == before


def test_hard_links_cannot_reach_host_files(sandbox, exposed):
    before = snapshot(exposed)
    code = f"""
    import os
    open("mine.txt", "w").write("mine")
    fd = os.open({exposed!r}, os.O_RDONLY)
    for name, attempt in (
        ("host file into workdir", lambda: os.link("{exposed}/data.txt", "alias")),
        ("workdir file into host", lambda: os.link("mine.txt", "stolen", dst_dir_fd=fd)),
    ):
        try:
            attempt()
            print(name, "linked")
        except OSError as e:
            print(name, e.errno)
    """
    assert run(sandbox(), code).splitlines() == [
        f"host file into workdir {errno.EXDEV}",  # different filesystems: no alias to write through
        f"workdir file into host {errno.EROFS}",
    ]
    assert snapshot(exposed) == before


def test_fifos_and_sqlite_files_outside_the_working_directory_do_not_persist(sandbox, exposed):
    before, marker = snapshot(exposed), token()
    code = f"""
    import os, sqlite3
    def attempt(name, action):
        try:
            action()
            print(name, "made")
        except (OSError, sqlite3.Error) as e:
            print(name, type(e).__name__)
    def database(path):
        sqlite3.connect(path).execute("create table t (x)")
    attempt("fifo host dir", lambda: os.mkfifo("{exposed}/fifo"))
    attempt("fifo /tmp", lambda: os.mkfifo("/tmp/{marker}.fifo"))
    attempt("sqlite host dir", lambda: database("{exposed}/db.sqlite"))
    attempt("sqlite /tmp", lambda: database("/tmp/{marker}.sqlite"))
    attempt("fifo workdir", lambda: os.mkfifo("inside.fifo"))
    attempt("sqlite workdir", lambda: database("inside.sqlite"))
    """
    assert run(sandbox(), code).splitlines() == [
        "fifo host dir OSError",
        "fifo /tmp OSError",
        "sqlite host dir OperationalError",
        "sqlite /tmp OperationalError",
        "fifo workdir made",
        "sqlite workdir made",
    ]
    assert snapshot(exposed) == before
    assert not [n for n in os.listdir("/tmp") if n.startswith(marker)]


def test_system_and_interpreter_directories_are_read_only(sandbox):
    code = """
    import os, sys, sysconfig
    import numpy  # the interpreter's packages are there to import
    for directory in ("/etc", "/usr", sys.prefix, sysconfig.get_paths()["purelib"], "/tmp", "/"):
        try:
            open(os.path.join(directory, "atpo-escape.txt"), "w")
            print(directory, "written")
        except OSError as e:
            print(e.errno, end=" ")
    """
    assert run(sandbox(audit_hook=False), code).split() == [str(errno.EROFS)] * 6


def test_unexposed_host_paths_are_invisible(sandbox, tmp_path):
    (tmp_path / "private.txt").write_text("secret")
    here = os.path.dirname(os.path.abspath(__file__))
    code = f"""
    import os
    paths = ({str(tmp_path)!r}, {here!r}, {os.path.expanduser("~/.ssh")!r}, "/root/.ssh", "/var")
    print([os.path.exists(p) for p in paths])
    """
    assert run(sandbox(), code) == "[False, False, False, False, False]"


def test_writing_more_than_the_disk_quota_fails(sandbox):
    code = """
    import os
    written = 0
    try:
        for i in range(100):  # 1 MiB files (max_file_mb=1) until the 4 MiB tmpfs is full
            with open(f"f{i}", "wb") as f:
                for _ in range(4):
                    f.write(b"x" * 2**18)
                    f.flush()
                    written += 2**18
    except OSError as e:
        print(written / 2**20, e.errno)
    """
    mib, error = run(sandbox(), code).split()
    assert int(error) == errno.ENOSPC and 3 <= float(mib) <= 4


def test_creating_more_files_than_the_inode_quota_fails(sandbox):
    code = """
    n = 0
    try:
        while True:
            open(f"{n}", "w").close()
            n += 1
    except OSError as e:
        print(n, e.errno)
    """
    count, error = run(sandbox(), code).split()
    assert int(error) == errno.ENOSPC and int(count) < 1024  # 4 MiB / 4 KiB inodes


def test_no_capabilities_and_no_way_back_to_them(sandbox):
    code = """
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    status = dict(line.split(":\\t") for line in open("/proc/self/status").read().splitlines())
    print(status["CapEff"].strip(), status["CapBnd"].strip(), status["NoNewPrivs"].strip())
    print("uid", os.getuid())
    print("new user namespace", libc.unshare(0x10000000), ctypes.get_errno() != 0)
    print("mount", libc.mount(b"none", b".", b"tmpfs", 0, None), ctypes.get_errno() != 0)
    """
    caps, uid, userns, mount = run(sandbox(audit_hook=False), code).splitlines()
    assert caps == "0000000000000000 0000000000000000 1"
    assert userns == "new user namespace -1 True" and mount == "mount -1 True"
    if os.geteuid() == 0:  # a root trainer's code runs as host uid 65534, not root
        assert uid == "uid 65534"


# --- network ---------------------------------------------------------------------------------------


@pytest.fixture
def listener():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    yield server
    server.close()


CONNECT = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
    print("connected", socket.if_nameindex())
except OSError as e:
    print(type(e).__name__, e.errno, [name for _, name in socket.if_nameindex()])
"""


def accepted(server: socket.socket) -> bool:
    try:
        server.accept()[0].close()
        return True
    except TimeoutError:
        return False


def test_no_network_without_allow_network(sandbox, listener):
    code = CONNECT.format(port=listener.getsockname()[1])
    text = run(sandbox(audit_hook=False), code)  # the audit hook would refuse connect() first
    assert text == f"OSError {errno.ENETUNREACH} ['lo']"  # a network namespace of its own, lo down
    assert not accepted(listener)


def test_allow_network_reaches_the_host(sandbox, listener):
    text = run(sandbox(allow_network=True), CONNECT.format(port=listener.getsockname()[1]))
    assert text.startswith("connected") and accepted(listener)


# --- choosing the level ----------------------------------------------------------------------------


def test_auto_reports_the_level_it_chose(level, caplog):
    with caplog.at_level(logging.INFO, logger="atpo_jax.tools.python_sandbox"):
        tool = PythonTool(PythonSandboxConfig(enabled=True))
    assert tool.isolation is level and level in (Isolation.BWRAP, Isolation.UNSHARE)
    assert f"python tool: isolation={level} (chosen by auto)" in caplog.text


def test_the_tool_refuses_to_enable_itself_without_a_mechanism(monkeypatch):
    monkeypatch.setattr(
        python_sandbox, "isolation_problem", lambda level, *_: f"simulated: no {level}"
    )
    with pytest.raises(SandboxUnavailableError) as refused:
        PythonTool(PythonSandboxConfig(enabled=True))
    message = str(refused.value)
    assert "PythonSandboxConfig.isolation='auto'" in message
    assert "bwrap: simulated: no bwrap; unshare: simulated: no unshare" in message
    assert "isolation='unsafe'" in message and "not a security boundary" in message
    with pytest.raises(SandboxUnavailableError, match="isolation='unshare'"):
        PythonTool(PythonSandboxConfig(enabled=True, isolation="unshare"))
    # a disabled tool probes nothing; unsafe has to be asked for, and then it runs
    assert PythonTool(PythonSandboxConfig()).isolation is None
    unsafe = PythonTool(PythonSandboxConfig(enabled=True, isolation="unsafe"))
    assert unsafe.isolation is Isolation.UNSAFE and unsafe.run("print(2)").text == "2"


def test_unsafe_is_never_the_default():
    assert PythonSandboxConfig().isolation is Isolation.AUTO
    assert ToolSettings().python_isolation is Isolation.AUTO
    with pytest.raises(SandboxUnavailableError):
        sandbox_isolation.choose(Isolation.AUTO, lambda level: "missing")


def test_the_run_config_setting(tmp_path, monkeypatch, caplog):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "1", "contents": '"Title"\nsome text'}) + "\n")
    settings = ToolSettings(python=True, python_isolation="unsafe")
    with caplog.at_level(logging.INFO, logger="atpo_jax.tools.python_sandbox"):
        toolbox = build_toolbox(settings, default_corpus=str(corpus), max_workers=2)
    assert "python" in toolbox.tags and toolbox.run("python", "print(6 * 7)").text == "42"
    assert "isolation=unsafe (as configured)" in caplog.text
    with pytest.raises(ConfigError, match="tools.python_isolation='chroot' is not one of"):
        ToolSettings(python_isolation="chroot")
    monkeypatch.setattr(python_sandbox, "isolation_problem", lambda level, *_: "simulated")
    with pytest.raises(
        ConfigError, match=r"tools.python_isolation='auto': the python tool refuses"
    ):
        build_toolbox(ToolSettings(python=True), default_corpus=str(corpus), max_workers=2)


# --- bubblewrap and the filesystem view --------------------------------------------------------------


def test_bwrap_command_line():
    command = sandbox_isolation.bwrap_command(
        python="/venv/bin/python",
        child="/pkg/_sandbox_child.py",
        child_config="{}",
        code_path="/tmp/call/main.py",
        workdir="/tmp/call/work",
        binds=["/usr", "/venv"],
        symlinks=[("/bin", "/usr/bin")],
        disk_bytes=4096,
        allow_network=False,
        status_fd=7,
    )
    joined = " ".join(command)
    for part in (
        "--unshare-user --unshare-pid --unshare-ipc --unshare-uts",
        "--unshare-net",
        "--disable-userns --die-with-parent --new-session --cap-drop ALL",
        "--uid 65534 --gid 65534",
        "--json-status-fd 7",
        "--ro-bind /usr /usr --ro-bind /venv /venv --symlink /usr/bin /bin",
        "--dev /dev --proc /proc --size 4096 --tmpfs /tmp/call/work --remount-ro /",
        "-- /venv/bin/python -I -B /pkg/_sandbox_child.py {}",
    ):
        assert part in joined, part
    assert sandbox_isolation.bwrap_exit_code('{ "child-pid": 5 }\n{ "exit-code": 137 }\n') == -9
    assert sandbox_isolation.bwrap_exit_code('{ "child-pid": 5 }\n{ "exit-code": 3 }\n') == 3
    assert sandbox_isolation.bwrap_exit_code('{ "child-pid": 5 }\n') is None


def test_bwrap_level_end_to_end():
    problem = sandbox_isolation.bwrap_problem()
    if problem is not None:
        pytest.skip(f"the bwrap level is not available here: {problem}")
    tool = PythonTool(PythonSandboxConfig(**LIMITS | {"isolation": Isolation.BWRAP}))
    assert tool.run("print(6 * 7)").text == "42"
    assert tool.run("import signal\nsignal.raise_signal(signal.SIGSEGV)").status == "error"
    text = tool.run("open('/usr/x', 'w')").text
    assert "Read-only file system" in text or "SandboxViolation" in text


def test_the_filesystem_view_has_no_nested_binds():
    import sys

    binds, symlinks = sandbox_isolation.filesystem_view(sys.executable, ())
    assert "/usr" in binds and "/proc" not in binds
    assert not [a for a in binds for b in binds if a != b and a.startswith(b.rstrip("/") + "/")]
    assert any(os.path.realpath(sys.prefix).startswith(b) for b in binds)
    for link, target in symlinks:
        assert os.path.realpath(link) == target


def test_a_setup_failure_is_reported_not_run(level, monkeypatch):
    if level is not Isolation.UNSHARE:
        pytest.skip("exercises the unshare level's own setup")
    config = PythonSandboxConfig(**LIMITS | {"isolation": level})
    real = sandbox_isolation.filesystem_view

    def missing_bind(python, extra):  # a bind source that does not exist: the mount fails
        binds, symlinks = real(python, extra)
        return (*binds, "/nonexistent-atpo-path"), symlinks

    monkeypatch.setattr(sandbox_isolation, "filesystem_view", missing_bind)
    result = python_sandbox._execute(config, level, "print('must not run')")
    assert not result.ok and result.status == "error"
    assert "could not start" in result.error and "mount" in result.error
