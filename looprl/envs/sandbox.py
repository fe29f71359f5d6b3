"""Runs model-written Python functions in a separate, confined, short-lived process.

`run_function(code, function, calls)` starts a fresh interpreter on
`looprl/envs/sandbox_child.py`, which defines the code's functions, calls `function`
on each argument list and reports what each call returned (or raised). The caller
compares the returned values with the expected ones; those never enter the sandbox.

Threat model. The code is untrusted: it may try to read or write files, open network
connections, start processes, exhaust memory, CPU or disk, flood its output, exit early,
print fake results, or tamper with the harness that runs it (it runs in the same
process). The layers, from the ones that are a boundary to the ones that are not:

* **A separate process** in its own session, killed with its whole process group (and,
  without a PID namespace, every process left in its session) at the wall-clock
  deadline. A crash, `os._exit`, or a hang costs one run, never the caller.
* **Resource limits** (`setrlimit`): CPU seconds, address space, processes, file size,
  open files, no core dumps.
* **Another user.** Running as root (as in CI), the child drops to `nobody` (uid and gid
  65534 where it has no entry) with no supplementary groups before it reads the code, so
  files that are not world-readable stay out of reach, nothing outside world-writable
  places can be written, and `RLIMIT_NPROC` binds (it does not bind root).
* **Namespaces**, as root and where the kernel allows (silently skipped where not): a new
  network namespace, whose loopback is down, so no connection can be made; a new PID
  namespace, so every process the code forks dies with the run.
* **A private working directory**, owned by the sandbox user, removed afterwards, and an
  environment holding nothing but `PYTHONHASHSEED=0` (for reproducible runs) and UTF-8.
* **An audit hook** (PEP 578), installed before the code is read: no reads outside the
  working directory and the standard library, no writes outside the working directory,
  no sockets, `ctypes`, subprocesses, `fork`, `exec`, signals to other processes, `gc`
  object walks or further hooks. This is defence in depth, **not** a security
  boundary: code in the same interpreter can reach around an audit hook (for one,
  through the interpreter's internals or a bug in them). It is also what keeps
  world-readable files outside the working directory unread: only the user layer and
  the hook stand between the code and a world-readable file.
* **Results it cannot forge.** Results travel on a pipe of their own as JSON lines
  prefixed by a random per-run nonce that only the harness was told (through stdin,
  before the code ran). The code can find the nonce (it shares the process), so the
  real guarantee is the first line of this docstring: the child only reports returned
  values, converted by exact type (an object whose `__eq__` always says yes is
  refused), and the parent compares them with expected values the child never saw.
  Stopping early (`sys.exit`, `os._exit`, a crash) leaves the remaining calls without
  results, which count as failures.

Not covered: disk usage inside the working directory beyond the per-file size limit, a
sleeping process that escaped with `setsid` where there is no PID namespace, kernel
exploits, side channels, and anything when the caller is not root (then only the
process, limits, working directory and audit hook apply). Run it in a container or VM
for a stronger boundary.
"""

from __future__ import annotations

import json
import marshal
import math
import os
import pwd
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD_SCRIPT = str(Path(__file__).with_name("sandbox_child.py"))
SANDBOX_USER = "nobody"
NOBODY_ID = 65534
CHILD_ENV = {"PYTHONHASHSEED": "0", "PYTHONUTF8": "1", "PYTHONCOERCECLOCALE": "0"}
KILL_OUTPUT_FACTOR = 64  # output past this many times the kept amount ends the run
MAX_RESULT_BYTES = 16 * 2**20
MAX_LINE_BYTES = 2**20  # a harness line holds at most ~100 KB of value and 2 KB of traceback
GRACE_S = 0.2  # after the harness says it is done, how long to wait for the pipes' EOF
READ_CHUNK = 65536
SIGNAL_REASONS = {
    "SIGXCPU": "CPU time limit exceeded",
    "SIGKILL": "killed (CPU or memory limit)",
    "SIGSEGV": "crashed (segmentation fault)",
    "SIGXFSZ": "file size limit exceeded",
}


@dataclass(frozen=True)
class SandboxLimits:
    """What one run may use.

    Attributes:
        timeout_s: Wall-clock seconds for the whole run (interpreter start included).
        memory_mb: Address-space limit per process, in MiB.
        max_processes: `RLIMIT_NPROC` for the sandbox user (threads count too).
        max_file_kb: Largest file the code may write, in KiB.
        max_open_files: `RLIMIT_NOFILE`.
        max_output_chars: Output (stdout and stderr) kept for the caller; a run that
            writes more than 64 times this much is stopped.
    """

    timeout_s: float = 2.0
    memory_mb: int = 256
    max_processes: int = 8
    max_file_kb: int = 1024
    max_open_files: int = 64
    max_output_chars: int = 4096

    def __post_init__(self) -> None:
        timeout = self.timeout_s
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout <= 600
        ):
            raise ValueError(
                f"Expect `timeout_s` in (0, 600] seconds, actually: {self.timeout_s!r}"
            )
        for name in (
            "memory_mb",
            "max_processes",
            "max_file_kb",
            "max_open_files",
            "max_output_chars",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expect `{name}` to be a positive int, actually: {value!r}")
        if self.memory_mb < 64:
            raise ValueError(
                f"Expect `memory_mb` >= 64 (the interpreter needs it), actually: {self.memory_mb}"
            )

    def for_child(self) -> dict[str, int]:
        """The limits as the child applies them."""
        return {
            "cpu_s": math.ceil(self.timeout_s) + 1,  # a backstop: the wall clock stops it first
            "memory_bytes": self.memory_mb * 2**20,
            "max_processes": self.max_processes,
            "max_file_bytes": self.max_file_kb * 1024,
            "max_open_files": self.max_open_files,
        }


@dataclass(frozen=True)
class CallOutcome:
    """What one call did: returned `value` (plain JSON data) or raised (`error`)."""

    value: Any = None
    error: str | None = None


@dataclass(frozen=True)
class SandboxResult:
    """One run.

    Attributes:
        calls: One outcome per requested call, in order; `None` where the call never
            finished (the run stopped first).
        load_error: Why the code could not be run or lacks the function, if so.
        problem: Why the run stopped before finishing (a timeout, a limit, a crash, an
            early exit), if it did.
        output: What the code printed (stdout and stderr), cut to the kept amount.
        layers: The isolation layers the child reported: "uid", "netns", "pidns", "audit".
    """

    calls: tuple[CallOutcome | None, ...]
    load_error: str | None
    problem: str | None
    output: str
    layers: frozenset[str]


def run_function(
    code: str,
    function: str,
    calls: Sequence[Sequence[Any]],
    limits: SandboxLimits | None = None,
    *,
    audit_hook: bool = True,
    preload: Sequence[str] = (),
) -> SandboxResult:
    """Defines `code` in a sandbox and calls `function(*arguments)` for each of `calls`.

    Args:
        code: Python source that defines `function`.
        function: The name of the function to call.
        calls: One argument list per call (JSON data; each call gets fresh copies).
        limits: What the run may use (`SandboxLimits()` by default).
        audit_hook: Install the in-process audit hook. Turning it off leaves only the
            OS-level layers, which is what tests of those layers need.
        preload: Extra standard modules to import before the privileges are dropped.

    Returns:
        The outcomes. Whatever the code does, this returns (it raises only if the
        sandbox cannot be started at all, e.g. out of file descriptors).
    """
    limits = limits or SandboxLimits()
    nonce = secrets.token_hex(16)
    user = sandbox_user()
    work_dir = tempfile.mkdtemp(prefix="looprl-sandbox-")
    read_fd = write_fd = -1
    try:
        if user is not None:
            os.chown(work_dir, *user)
        read_fd, write_fd = os.pipe()
        config = {
            "uid": None if user is None else user[0],
            "gid": None if user is None else user[1],
            "result_fd": write_fd,
            "limits": limits.for_child(),
            "audit": audit_hook,
            "preload": list(preload),
        }
        stdin = _payload(config, nonce, code, function, calls)
        process = _start(write_fd, work_dir)
        os.close(write_fd)  # the child holds the only write end: its exit is our EOF
        write_fd = -1
        streams = _Streams(nonce, limits.max_output_chars)
        try:
            _exchange(process, read_fd, stdin, streams, time.monotonic() + limits.timeout_s)
        finally:
            _stop(process, streams.layers)
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(work_dir, ignore_errors=True)
    return streams.result(len(calls), process.returncode, limits.timeout_s)


def sandbox_user() -> tuple[int, int] | None:
    """`(uid, gid)` of the user the child drops to, or None when not running as root."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        return NOBODY_ID, NOBODY_ID
    return entry.pw_uid, entry.pw_gid


def _payload(
    config: dict[str, Any], nonce: str, code: str, function: str, calls: Sequence[Sequence[Any]]
) -> bytes:
    """What the child reads from stdin: `marshal` (trusted data, and cheap to load there)."""
    if not isinstance(code, str) or not isinstance(function, str):
        raise TypeError(
            f"Expect `code` and `function` to be str, actually: {type(code)}, {type(function)}"
        )
    arguments = [marshal.dumps(list(args)) for args in calls]  # each call loads a fresh copy
    return marshal.dumps({"config": config, "nonce": nonce, "code": code, "function": function,
                          "calls": arguments})  # fmt: skip


def _start(result_fd: int, work_dir: str) -> subprocess.Popen:
    # -S: no site (no site-packages, no .pth code); -B: no bytecode written; -P (3.11+):
    # the script's folder stays off sys.path. The environment is ours, so -E/-I add nothing.
    # The parent's pid is only there so that a process listing shows whose sandbox it is.
    flags = ["-S", "-B", *(["-P"] if sys.version_info >= (3, 11) else [])]
    return subprocess.Popen(
        [sys.executable, *flags, CHILD_SCRIPT, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=work_dir,
        env=dict(CHILD_ENV),
        pass_fds=(result_fd,),
        start_new_session=True,  # its own process group, killed as a whole
    )


class _Streams:
    """One run's output and result records, read incrementally and bounded."""

    def __init__(self, nonce: str, max_output_chars: int) -> None:
        self.prefix = nonce.encode() + b" "
        self.keep = max_output_chars
        self.output = bytearray()
        self.output_bytes = 0
        self.result_bytes = 0
        self.pending = b""
        self.records: list[dict[str, Any]] = []
        self.done = False
        self.overflow: str | None = None
        self.timed_out = False

    @property
    def layers(self) -> frozenset[str]:
        ready = [r for r in self.records if r.get("kind") == "ready"]
        layers = ready[0].get("layers") if ready else []
        return (
            frozenset(x for x in layers if isinstance(x, str))
            if isinstance(layers, list)
            else frozenset()
        )

    def add_output(self, chunk: bytes) -> None:
        self.output_bytes += len(chunk)
        if len(self.output) < self.keep * 4:  # utf-8: at most 4 bytes a character
            self.output += chunk[: self.keep * 4 - len(self.output)]
        if self.output_bytes > self.keep * KILL_OUTPUT_FACTOR:
            self.overflow = (
                f"Output limit exceeded: more than {self.keep * KILL_OUTPUT_FACTOR} bytes"
            )

    def add_results(self, chunk: bytes) -> None:
        self.result_bytes += len(chunk)
        if self.result_bytes > MAX_RESULT_BYTES:
            self.overflow = "Result limit exceeded: the program wrote too much to the result pipe"
            return
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        if len(self.pending) > MAX_LINE_BYTES:  # no harness line is this long
            self.overflow = "Result limit exceeded: an endless line on the result pipe"
        for line in lines:
            record = self._record(line)
            if record is not None:
                self.records.append(record)
                self.done = self.done or record.get("kind") == "done"

    def _record(self, line: bytes) -> dict[str, Any] | None:
        if not line.startswith(self.prefix):
            return None  # not from the harness
        try:
            record = json.loads(line[len(self.prefix) :])
        except (ValueError, RecursionError):
            return None
        return record if isinstance(record, dict) else None

    def result(self, num_calls: int, returncode: int | None, timeout_s: float) -> SandboxResult:
        calls: list[CallOutcome | None] = [None] * num_calls
        load_error = None
        for record in self.records:
            kind, index = record.get("kind"), record.get("index")
            if kind == "load" and load_error is None:
                load_error = str(record.get("error"))
            elif (
                kind == "call"
                and type(index) is int
                and 0 <= index < num_calls
                and calls[index] is None
            ):
                error = record.get("error")
                calls[index] = CallOutcome(
                    record.get("value"), None if error is None else str(error)
                )
        return SandboxResult(
            calls=tuple(calls),
            load_error=load_error,
            problem=None if self.done else self._problem(returncode, timeout_s),
            output=self._text(),
            layers=self.layers,
        )

    def _problem(self, returncode: int | None, timeout_s: float) -> str:
        if self.overflow is not None:
            return self.overflow
        if self.timed_out:
            return f"Timed out after {timeout_s:g} s"
        if returncode is not None and returncode < 0:
            return _signal_problem(-returncode)
        return f"The program exited (code {returncode}) before the tests finished"

    def _text(self) -> str:
        text = self.output.decode("utf-8", "replace")[: self.keep]
        hidden = self.output_bytes - len(text.encode())
        return text + (f"\n[... {hidden} more bytes of output]" if hidden > 0 else "")


def _signal_problem(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    return f"The program was stopped by {name}: {SIGNAL_REASONS.get(name, 'it ended abnormally')}"


def _exchange(
    process: subprocess.Popen, result_fd: int, stdin: bytes, streams: _Streams, deadline: float
) -> None:
    """Feeds stdin and reads output and results until done, EOF, a limit or the deadline."""
    assert process.stdin is not None and process.stdout is not None
    in_fd, out_fd = process.stdin.fileno(), process.stdout.fileno()
    os.set_blocking(in_fd, False)
    with selectors.DefaultSelector() as selector:
        selector.register(in_fd, selectors.EVENT_WRITE, "stdin")
        selector.register(out_fd, selectors.EVENT_READ, "output")
        selector.register(result_fd, selectors.EVENT_READ, "results")
        while selector.get_map() and streams.overflow is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                streams.timed_out = not streams.done
                return
            for key, _ in selector.select(remaining):
                if key.data == "stdin":
                    stdin = _feed(in_fd, stdin)
                    if not stdin:
                        selector.unregister(in_fd)
                        process.stdin.close()
                    continue
                chunk = os.read(key.fd, READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fd)
                elif key.data == "output":
                    streams.add_output(chunk)
                else:
                    was_done = streams.done
                    streams.add_results(chunk)
                    if streams.done and not was_done:  # only the pipes' EOF is left to wait for
                        deadline = min(deadline, time.monotonic() + GRACE_S)
    if not streams.done and streams.overflow is None:  # both pipes closed: let it finish exiting
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.001))
        except subprocess.TimeoutExpired:
            streams.timed_out = True


def _feed(fd: int, data: bytes) -> bytes:
    """Writes what the pipe takes now; returns the rest (empty once done or if it broke)."""
    try:
        return data[os.write(fd, data[:READ_CHUNK]) :]
    except BlockingIOError:
        return data
    except (BrokenPipeError, OSError):  # the child is gone; its exit tells the story
        return b""


def _stop(process: subprocess.Popen, layers: frozenset[str]) -> None:
    """Kills the run's process group (and session) and reaps the child."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if "pidns" not in layers:  # forks that left the group but not the session
        _kill_session(process.pid)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for stream in (process.stdin, process.stdout):
        if stream is not None and not stream.closed:
            stream.close()


def _kill_session(session: int) -> None:
    if not os.path.isdir("/proc"):
        return
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == session:  # fields: state, ppid, pgrp, session, ...
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue
