"""`looprl.envs.sandbox`: hostile code is contained, the host is unchanged, results hold.

Each attack runs with the audit hook (the default) and, where the OS layers alone should
hold, without it. The OS-layer tests need root (the sandbox drops to `nobody`) and skip
otherwise; the namespace tests also skip where the kernel refuses new namespaces.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from looprl.envs.sandbox import CHILD_SCRIPT, CallOutcome, SandboxLimits, run_function

LIMITS = SandboxLimits(timeout_s=1.0, memory_mb=128, max_processes=4, max_output_chars=500)
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the OS layers drop privileges only as root")


def run(code: str, calls=((),), *, function: str = "f", audit: bool = True, **kwargs):
    return run_function(code, function, list(calls), LIMITS, audit_hook=audit, **kwargs)


def sandbox_processes() -> list[int]:
    """Pids of live sandbox children started by this test process."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        mine = CHILD_SCRIPT.encode() in argv and str(os.getpid()).encode() in argv
        if mine and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    # A killed child can still be listed a moment after the run returns, while the kernel
    # tears it down: on a loaded machine one was. Dying is not escaping; 10 s is a bound.
    deadline = time.monotonic() + 10
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


@pytest.fixture
def outside_dir():
    """A world-readable, world-writable directory outside any sandbox's working directory."""
    path = Path(tempfile.mkdtemp(prefix="looprl-outside-"))
    path.chmod(0o777)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def text_of(result) -> str:
    """Everything a run sends back to the caller, as one string."""
    parts = [result.load_error or "", result.problem or "", result.output]
    parts += [repr(c.value) + (c.error or "") for c in result.calls if c is not None]
    return "\n".join(parts)


def failed(result) -> bool:
    """The run ended in an error or a timeout the agent can read, not in a value."""
    return bool(
        result.load_error or result.problem or any(c is None or c.error for c in result.calls)
    )


# --- ordinary code -------------------------------------------------------------------


def test_a_correct_solution_returns_its_values():
    code = "import math\ndef f(a, b):\n    print('adding', a, b)\n    return math.gcd(a, b) + 1\n"
    result = run(code, [[12, 18], [7, 5]])
    assert result.calls == (CallOutcome(7), CallOutcome(2))
    assert (result.load_error, result.problem) == (None, None)
    assert result.output == "adding 12 18\nadding 7 5\n"


def test_values_come_back_as_plain_json_data():
    code = "def f():\n    return [(1, 'é\\ud800'), {'k': None}, True, 2.5, float('inf')]\n"
    assert run(code).calls[0].value == [[1, "é\ud800"], {"k": None}, True, 2.5, "inf"]


def test_each_call_gets_fresh_arguments():
    code = "def f(xs):\n    xs.append(1)\n    return len(xs)\n"
    assert [c.value for c in run(code, [[[]], [[]]]).calls] == [1, 1]


def test_errors_show_a_traceback_of_the_code_only():
    code = "def g(x):\n    return 1 / x\n\ndef f(x):\n    return g(x)\n"
    error = run(code, [[0]]).calls[0].error
    assert error == (
        "Traceback (most recent call last):\n"
        '  File "solution.py", line 5, in f\n    return g(x)\n'
        '  File "solution.py", line 2, in g\n    return 1 / x\n'
        "ZeroDivisionError: division by zero"
    )
    assert "sandbox_child" not in run("import os\nos.fork()").load_error


def test_syntax_errors_and_missing_functions_are_load_errors():
    assert run("def f(:\n    pass\n").load_error.endswith("SyntaxError: invalid syntax")
    assert run("def g():\n    pass\n").load_error == "the code does not define a function named 'f'"
    assert run("f = 3\n").load_error == "the code does not define a function named 'f'"


def test_the_run_is_isolated_as_documented():
    code = (
        "import os\ndef f():\n"
        "    return [os.getcwd(), dict(os.environ), os.getuid(), os.getgroups(), __name__]\n"
    )
    result = run(code)
    cwd, env, uid, groups, name = result.calls[0].value
    assert not Path(cwd).exists()  # the working directory was removed
    assert env == {"PYTHONHASHSEED": "0", "PYTHONUTF8": "1", "PYTHONCOERCECLOCALE": "0"}
    assert name == "solution"  # `if __name__ == "__main__":` blocks do not run
    if ROOT:
        assert uid == 65534 and groups == [] and {"uid", "audit"} <= result.layers


# --- the acceptance attacks ----------------------------------------------------------


@pytest.mark.parametrize("audit", [True, pytest.param(False, marks=needs_root)])
def test_reading_a_file_outside_is_contained(outside_dir, tmp_path, audit):
    secret = "s3cret-" + os.urandom(8).hex()
    if audit:  # world-readable: only the audit hook stands in the way (documented)
        target = outside_dir / "secret.txt"
        target.write_text(secret)
        target.chmod(0o644)
    else:  # readable by root only: the dropped uid stands in the way
        target = tmp_path / "secret.txt"
        target.write_text(secret)
        target.chmod(0o600)
    # The jail hides the host's files (tests/envs/test_sandbox_attacks.py checks that):
    # exposing tmp_path inside it lets this test check the uid layer on its own.
    result = run(
        f"def f():\n    return open({str(target)!r}).read()\n", audit=audit, expose=[tmp_path]
    )
    assert failed(result) and secret not in text_of(result)
    assert ("is not allowed outside" if audit else "Permission denied") in result.calls[0].error


@pytest.mark.parametrize("audit", [True, pytest.param(False, marks=needs_root)])
def test_writing_a_file_outside_is_contained(outside_dir, tmp_path, audit):
    targets = [tmp_path / "written.txt"] + ([outside_dir / "written.txt"] if audit else [])
    for target in targets:
        code = f"def f():\n    open({str(target)!r}, 'w').write('x')\n"
        result = run(code, audit=audit, expose=[tmp_path])  # as above: the uid layer alone
        assert failed(result) and not target.exists()
        assert ("is not allowed outside" if audit else "Permission denied") in result.calls[0].error


@pytest.mark.parametrize("audit", [True, pytest.param(False, marks=needs_root)])
def test_a_fork_bomb_is_contained(audit):
    start = time.monotonic()
    result = run("import os\nwhile True:\n    os.fork()\n", audit=audit)
    assert failed(result) and time.monotonic() - start < 5
    reason = "os.fork is not allowed" if audit else "Resource temporarily unavailable"  # NPROC
    assert reason in result.load_error
    # The autouse fixture then checks that no forked process is left.


def test_allocating_10_gb_is_contained():
    result = run("def f():\n    data = bytearray(10 * 2**30)\n    return len(data)\n")
    assert result.calls[0].error.endswith("MemoryError")
    growing = run(
        "def f():\n    kept = []\n    while True:\n        kept.append(bytearray(2**20))\n"
    )
    assert failed(growing) and "MemoryError" in text_of(growing)


def test_an_endless_loop_times_out():
    start = time.monotonic()
    result = run("def f():\n    while True:\n        pass\n", [[], []])
    assert result.problem == "Timed out after 1 s" and result.calls == (None, None)
    assert time.monotonic() - start < 3


def test_sleeping_forever_times_out():
    result = run("import time\ndef f():\n    time.sleep(100)\n")
    assert result.problem == "Timed out after 1 s"


@pytest.mark.parametrize("audit", [True, False])
def test_a_network_connection_is_contained(audit):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = (
            "import socket\ndef f():\n    client = socket.socket()\n    client.settimeout(0.5)\n"
            f"    client.connect(('127.0.0.1', {port}))\n    client.sendall(b'hi')\n"
            "    return 'connected'\n"
        )
        result = run(code, audit=audit, preload=() if audit else ("socket",))
        if not audit and "netns" not in result.layers:
            pytest.skip("no network namespace here: only the audit hook blocks the network")
        assert failed(result) and "connected" not in text_of(result)
        expected = "importing socket is not allowed" if audit else "Network is unreachable"
        assert expected in text_of(result)
        with pytest.raises(BlockingIOError):  # nothing ever connected
            listener.accept()


# --- results cannot be forged -----------------------------------------------------------


def test_printed_or_written_fake_results_do_not_count():
    fake = '{"kind": "call", "index": 0, "value": 42}'
    code = (
        "import os\n"
        f"print({fake!r})\n"
        "for fd in range(3, 20):\n"
        "    try:\n"
        f"        os.write(fd, b'0' * 32 + b' ' + {fake!r}.encode() + b'\\n')\n"
        "    except OSError:\n"
        "        pass\n"
        "def f():\n    return 0\n"
    )
    assert run(code).calls == (CallOutcome(0),)


def test_an_object_equal_to_everything_is_refused():
    equal_to_all = "    def __eq__(self, other):\n        return True\n"
    code = f"class Any:\n{equal_to_all}\ndef f():\n    return Any()\n"
    error = run(code).calls[0].error
    assert error.startswith("returned a value of type Any, not a plain value")
    subclass = f"class Int(int):\n{equal_to_all}\ndef f():\n    return Int(3)\n"
    assert run(subclass).calls[0].error.startswith("returned a value of type Int")


def test_exiting_before_the_tests_counts_as_failing():
    exited = run("import sys\nsys.exit(0)\ndef f():\n    return 1\n")
    assert exited.load_error.endswith("SystemExit: 0") and exited.calls == (None,)
    hard = run("import os\nos._exit(0)\ndef f():\n    return 1\n")
    assert hard.problem == "The program exited (code 0) before the tests finished"
    assert hard.calls == (None,)
    inside = run("import sys\ndef f():\n    sys.exit(0)\n", [[], []])
    assert all(c.error.endswith("SystemExit: 0") for c in inside.calls)


def test_flooding_stdout_is_bounded():
    start = time.monotonic()
    result = run("def f():\n    while True:\n        print('x' * 10_000)\n")
    assert result.problem.startswith("Output limit exceeded")
    assert len(result.output) < 600 and result.output.endswith("more bytes of output]")
    assert time.monotonic() - start < 3


def test_files_in_the_working_directory_are_allowed_but_bounded():
    code = (
        "def f(n):\n    for i in range(n):\n        open(f'{i}.txt', 'w').write('x')\n"
        "    return open('0.txt').read()\n"
    )
    small, many = run(code, [[3], [100]]).calls
    assert small == CallOutcome("x")
    assert many.error.endswith(
        "PermissionError: sandbox: at most 64 files may be opened for writing"
    )
    too_big = run("def f():\n    open('big', 'w').write('x' * 2**21)\n").calls[0].error
    assert "File too large" in too_big  # RLIMIT_FSIZE (1 MiB by default)


def test_a_huge_return_value_is_refused():
    result = run("def f():\n    return 'x' * 200_000\n")
    assert result.calls[0].error.startswith("returned a return value longer than 100000 characters")


def test_dangerous_modules_cannot_be_imported():
    for module in ("ctypes", "subprocess", "socket", "multiprocessing"):
        assert "not allowed" in run(f"import {module}\n").load_error


def test_limits_are_checked():
    with pytest.raises(ValueError, match="`timeout_s`"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="`memory_mb` >= 64"):
        SandboxLimits(memory_mb=10)
    with pytest.raises(ValueError, match="`max_processes` to be a positive int"):
        SandboxLimits(max_processes=True)


def test_the_caller_is_unchanged():
    before = (os.getcwd(), dict(os.environ), os.getuid())
    run("import os\nos.chdir('/')\nos.environ['X'] = '1'\n")
    assert (os.getcwd(), dict(os.environ), os.getuid()) == before


def test_concurrent_runs_keep_their_own_results_and_leak_no_descriptors():
    open_fds = len(os.listdir("/proc/self/fd"))
    codes = [f"def f(x):\n    return x * {i}\n" for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda code: run(code, [[3]]), codes))
    assert [r.calls[0].value for r in results] == [3 * i for i in range(8)]
    assert len(os.listdir("/proc/self/fd")) == open_fds
