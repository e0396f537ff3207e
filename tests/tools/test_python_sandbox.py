"""The python tool: every runaway case is stopped or contained and reported; the parent is unaffected.

Every test that takes the ``tool`` fixture runs twice: at the unsafe level (limits and the audit hook)
and at the isolated level ``auto`` picks on this machine (skipped, saying why, where there is none).
tests/tools/test_sandbox_isolation.py checks what only the isolated levels contain.
"""

import concurrent.futures
import dataclasses
import os
import resource
import signal
import time

import pytest

from atpo_jax.tools import PythonSandboxConfig, PythonTool, Toolbox
from atpo_jax.tools.python_sandbox import (
    TRUNCATION_MARK,
    Isolation,
    SandboxUnavailableError,
    resolve_isolation,
    strip_code_fence,
)

CONFIG = PythonSandboxConfig(
    enabled=True,
    timeout_s=3,
    cpu_seconds=1,
    memory_mb=256,
    max_file_mb=1,
    max_output_chars=300,
    isolation=Isolation.UNSAFE,
)


def isolated_level() -> Isolation:
    """The OS isolation level ``auto`` resolves to here; skips the test where there is none."""
    try:
        return resolve_isolation(dataclasses.replace(CONFIG, isolation=Isolation.AUTO))
    except SandboxUnavailableError as e:
        pytest.skip(f"no OS isolation mechanism on this machine: {e}")


@pytest.fixture(scope="module", params=["unsafe", "isolated"])
def tool(request):
    level = Isolation.UNSAFE if request.param == "unsafe" else isolated_level()
    return PythonTool(dataclasses.replace(CONFIG, isolation=level))


def _limits():
    kinds = (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE, resource.RLIMIT_CORE)
    return [resource.getrlimit(k) for k in kinds]


@pytest.fixture(autouse=True)
def parent_unaffected():
    cwd, limits = os.getcwd(), _limits()
    handlers = signal.getsignal(signal.SIGXFSZ), signal.getsignal(signal.SIGXCPU)
    yield
    assert os.getcwd() == cwd
    assert _limits() == limits
    assert (signal.getsignal(signal.SIGXFSZ), signal.getsignal(signal.SIGXCPU)) == handlers


def test_disabled_by_default():
    result = PythonTool().run("print(1)")
    assert not result.ok and result.status == "disabled"
    assert "PythonSandboxConfig(enabled=True)" in result.error


def test_runs_code_and_returns_stdout(tool):
    result = tool.run("```python\nimport math\nprint(math.factorial(5))\n```")
    assert (result.ok, result.status, result.text) == (True, "ok", "120")
    assert tool.run("x = 1").text == "Execution finished with no output."


def test_exception_is_reported_with_a_user_traceback(tool):
    result = tool.run("print('before')\n1/0")
    assert result.ok and result.status == "error"
    assert result.text.startswith("before\nExecution error.\nTraceback")
    assert "ZeroDivisionError: division by zero" in result.text
    assert "_sandbox_child" not in result.text  # the bootstrap's frames are hidden


def test_infinite_loop_hits_the_cpu_limit(tool):
    start = time.monotonic()
    result = tool.run("while True:\n    pass")
    assert result.status == "cpu_limit" and "CPU time limit of 1 s" in result.text
    assert time.monotonic() - start < CONFIG.timeout_s


def test_sleeping_code_hits_the_wall_clock_timeout(tool):
    tool = PythonTool(dataclasses.replace(tool.config, timeout_s=0.5))
    start = time.monotonic()
    result = tool.run("import time\nprint('started', flush=True)\ntime.sleep(60)")
    assert result.status == "timeout"
    assert result.text == "started\nExecution timed out after 0.5 s."
    assert time.monotonic() - start < 5


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(2**33)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"],
)
def test_memory_bomb_hits_the_memory_limit(tool, code):
    result = tool.run(code)
    assert result.status == "memory_limit" and "memory limit of 256 MB" in result.text


def test_fork_bomb_is_blocked(tool):
    result = tool.run("import os\nwhile True:\n    os.fork()")
    assert result.status == "blocked"
    assert "SandboxViolation: the sandbox does not allow os.fork" in result.text


@pytest.mark.parametrize(
    "code, event",
    [
        ("import subprocess\nsubprocess.run(['sleep', '30'])", "subprocess.Popen"),
        ("import os\nos.system('sleep 30')", "os.system"),
        ("import multiprocessing\nmultiprocessing.Process(target=print).start()", "os.fork"),
    ],
)
def test_process_creation_is_blocked(tool, code, event):
    result = tool.run(code)
    assert result.status == "blocked" and event in result.text


def test_fork_attempts_that_swallow_the_error_still_stop(tool):
    code = "import os\nn = 0\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        n += 1"
    result = tool.run(code)
    assert result.status == "cpu_limit"  # every fork refused; the busy loop then hits the CPU limit
    assert result.text.count("[sandbox] blocked: os.fork") == 5  # reports are bounded


def test_writes_outside_the_sandbox_are_blocked(tool, tmp_path):
    target = tmp_path / "outside.txt"
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        "import pathlib\npathlib.Path('../escape.txt').write_text('x')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.rename({str(tmp_path)!r}, 'moved')",
    ):
        result = tool.run(code)
        if tool.isolation is not Isolation.UNSAFE and "rmtree" in code:
            # tmp_path does not exist in the sandbox's filesystem: rmtree's first lstat fails
            assert result.status == "error" and "FileNotFoundError" in result.text, code
            continue
        assert result.status == "blocked", code
        assert "SandboxViolation" in result.text
    assert not target.exists() and tmp_path.exists()


def test_writes_inside_the_sandbox_work_and_vanish(tool):
    result = tool.run(
        "import os\nopen('data.txt', 'w').write('kept')\nos.mkdir('sub')\n"
        "open('sub/x', 'w').write('1')\nprint(open('data.txt').read(), sorted(os.listdir('.')), os.getcwd())"
    )
    assert result.status == "ok"
    text, _, cwd = result.text.rpartition(" ")
    assert text == "kept ['data.txt', 'sub']"
    assert not os.path.exists(cwd)  # the temporary directory is removed afterwards


@pytest.mark.parametrize("code", ["while True:\n    print('x' * 1000)", "print('y' * 10**8)"])
def test_huge_output_is_cut_and_stopped(tool, code):
    result = tool.run(code)
    assert result.status == "output_limit"
    head, _, rest = result.text.partition(TRUNCATION_MARK)
    assert len(head) == CONFIG.max_output_chars and set(head) <= {"x", "y", "\n"}
    assert rest == "\nExecution stopped: output or file size limit exceeded."


def test_network_signals_and_limits_are_blocked(tool):
    for code, event in (
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "socket.connect"),
        ("import os\nos.kill(os.getppid(), 9)", "os.kill"),
        (
            "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
            "resource.setrlimit",
        ),
    ):
        result = tool.run(code)
        assert result.status == "blocked" and event in result.text, code


def test_stdin_is_closed(tool):
    result = tool.run("print(input())")
    assert result.status == "error" and "EOFError" in result.text


def test_concurrent_runs_through_the_toolbox(tool):
    toolbox = Toolbox([tool])
    calls = [("python", f"print({i} * {i})") for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8):
        results = toolbox.run_many(calls)
    assert [r.text for r in results] == [str(i * i) for i in range(8)]


def test_strip_code_fence():
    assert strip_code_fence("```py\nx = 1\n```") == "x = 1"
    assert strip_code_fence("  ```\nprint(2)\n```  ") == "print(2)"
    assert strip_code_fence("x = '```'") == "x = '```'"


def test_bad_config_values():
    with pytest.raises(ValueError, match="timeout_s"):
        PythonSandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="PythonSandboxConfig.isolation='docker' is not one of"):
        PythonSandboxConfig(isolation="docker")
    with pytest.raises(ValueError, match="max_processes"):
        PythonSandboxConfig(max_processes=0)
    with pytest.raises(ValueError, match="disk_mb"):
        PythonSandboxConfig(disk_mb=0)
    with pytest.raises(ValueError, match="must be an absolute path"):
        PythonSandboxConfig(read_only_paths=("data",))
    with pytest.raises(ValueError, match="which the sandbox provides itself"):
        PythonSandboxConfig(read_only_paths=("/proc/1",))
    with pytest.raises(ValueError, match="contains the temporary directory"):
        PythonSandboxConfig(read_only_paths=("/",))
    with pytest.raises(ValueError, match="audit_hook=False needs an isolated level"):
        PythonSandboxConfig(isolation="unsafe", audit_hook=False)
    assert PythonSandboxConfig(isolation="unshare").isolation is Isolation.UNSHARE


def test_killed_by_a_signal(tool):
    result = tool.run("import signal, os\nsignal.raise_signal(signal.SIGSEGV)")
    assert result.status == "error" and result.text == "Execution killed by signal SIGSEGV."
