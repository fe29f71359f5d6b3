"""Runs model-written Python functions in a separate, confined, short-lived process.

`run_function(code, function, calls)` starts a fresh interpreter on
`looprl/envs/sandbox_child.py`, which defines the code's functions, calls `function`
on each argument list and reports what each call returned (or raised). The caller
compares the returned values with the expected ones; those never enter the sandbox.

Threat model. The code is untrusted and, in RL, optimised against its reward: it may try
to read or write files, open network connections, start programs, signal or trace other
processes, exhaust memory, CPU or disk, flood its output, exit early, print fake
results, or tamper with the harness that runs it (it runs in the same process). The
layers, from the ones that are a boundary to the ones that are not (`SandboxResult.layers`
names those a run had; `isolation()` says which this machine gives, and why not the rest):

* **A separate process** in its own session, killed with its whole process group (and,
  without a PID namespace, every process left in its session) at the wall-clock
  deadline. A crash, `os._exit`, or a hang costs one run, never the caller.
* **A jail** ("mountns", "pidns"), where bubblewrap (`bwrap`) is installed and may make
  namespaces: a private mount namespace whose root is an empty read-only tmpfs holding
  only the interpreter, the shared libraries it and its extension modules load, the
  standard library (its `site-packages` hidden) and the child script, all read-only; a
  private, size-capped `/tmp` (the working directory lies in it) and `/dev/shm`; a
  private `/proc` of a new PID namespace, so that no host process, file, or host
  `/proc` entry is visible, and every process the code forks dies with the run; new
  IPC, UTS (host name `sandbox`) and cgroup namespaces. Without bwrap the child still
  makes a PID namespace of its own where the kernel allows.
* **A network namespace** ("netns") made by the child as root (before it drops its
  privileges, so nothing inside can configure it) or inside its user namespace: its
  loopback is down, so no connection can be made, to the host's loopback either.
* **A uid of its own** ("uid", "uid-per-run"). As root (as in CI), the child drops to a
  uid drawn at random per run from a range no account uses (`UID_RANGE`), with no
  supplementary groups, before it reads the code: no other sandbox shares it, so
  `RLIMIT_NPROC` binds each run alone, and no run can signal or trace another's
  processes; only world-readable files are readable and nothing outside world-writable
  places is writable. Where user namespaces are unavailable, every run drops to `nobody`
  (65534) instead, shared by all.
* **A user namespace** ("userns"), in which that uid appears as `nobody` (65534), which is
  what the code sees.
* **No capabilities, and a seccomp filter** ("seccomp", x86_64 and aarch64): no `execve`
  (no program can be run, not even the interpreter again), no signal sent to any process
  (`kill`, `tgkill`, `sigqueue`, pidfds; the kernel's own, such as SIGXCPU, still come),
  no `ptrace`, no new namespaces or mounts, no io_uring, bpf, perf or keyrings.
* **Resource limits** (`setrlimit`): CPU seconds, address space, processes, file size,
  open files, no core dumps; the jail's tmpfs sizes bound the memory its files can take.
* **An environment** holding nothing but `PYTHONHASHSEED=0` (for reproducible runs) and
  UTF-8, and a private working directory owned by the run's uid, removed afterwards.
* **An audit hook** (PEP 578, "audit"), installed before the code is read: no reads
  outside the working directory and the standard library, no writes outside the working
  directory (at most 64 files), no sockets, `ctypes`, subprocesses, `fork`, `exec`,
  signals to other processes, tracing, `gc` object walks or further hooks. Its policy is
  frozen into it (default arguments, never module globals or `builtins`), so rebinding
  names in `__main__` or `builtins` does not loosen it. It is still defence in depth,
  **not** a security boundary: code in the same interpreter can reach around an audit
  hook (for one, through the interpreter's internals or a bug in them). The layers above
  hold without it; the tests run each attack with the hook and again without it.
* **Results it cannot forge.** Results travel on a pipe of their own as JSON lines
  prefixed by a random per-run nonce that only the harness was told (through stdin,
  before the code ran). The code can find the nonce (it shares the process), so the
  real guarantee is the first line of this docstring: the child only reports returned
  values, converted by exact type (an object whose `__eq__` always says yes is
  refused), and the parent compares them with expected values the child never saw.
  Stopping early (`sys.exit`, `os._exit`, a crash) leaves the remaining calls without
  results, which count as failures.

Where a layer is missing, `run_function` logs one warning naming it, and the layers
that remain are all there is. Without bwrap or namespaces (e.g. an unprivileged
container), world-readable host files and world-writable places such as `/tmp` are kept
from the code only by the audit hook (as root with a uid per run, what that uid left at
the top of `/tmp`, `/var/tmp` and `/dev/shm` is removed afterwards); without root there
is no uid of the run's own, and the trainer's processes are protected by the PID
namespace and the seccomp filter where they exist, and the hook. In the jail, extension
modules whose libraries it leaves out (`SKIPPED_EXTENSIONS`: sqlite3, bz2, lzma, ...)
cannot be imported. Not covered in any case: kernel exploits, side channels (timing, the
CPU and memory load of other runs), host information in the jail's `/proc` (kernel
version, CPU and memory totals), and inode exhaustion of the jail's tmpfs within the
time limit. For a stronger boundary, run training in a VM.
"""

from __future__ import annotations

import json
import logging
import marshal
import math
import os
import pwd
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

CHILD_SCRIPT = str(Path(__file__).with_name("sandbox_child.py"))
SANDBOX_USER = "nobody"
NOBODY_ID = 65534
# Per-run uids are drawn from here: above the ranges distributions give accounts
# (< 60000), systemd's dynamic users (61184-65519) and the usual subordinate-id ranges
# of rootless containers (from 100000, 65536 per user), and below 2**31, which some
# tools still read as signed.
UID_RANGE = (1_000_000_000, 2_000_000_000)
CHILD_ENV = {"PYTHONHASHSEED": "0", "PYTHONUTF8": "1", "PYTHONCOERCECLOCALE": "0"}
KILL_OUTPUT_FACTOR = 64  # output past this many times the kept amount ends the run
MAX_RESULT_BYTES = 16 * 2**20
MAX_LINE_BYTES = 2**20  # a harness line holds at most ~100 KB of value and 2 KB of traceback
GRACE_S = 0.2  # after the harness says it is done, how long to wait for the pipes' EOF
READ_CHUNK = 65536
# The jail's /tmp (which holds the working directory) and /dev/shm hold at most this
# many files of the largest allowed size: the audit hook's 64 write opens, and a few.
JAIL_TMP_FILES = 64
JAIL_SHM_FILES = 4
# Extension modules whose extra shared libraries stay out of the jail (GUI, terminal,
# databases, TLS, NIS, compression, OpenSSL hashes): they then fail to import. Sandboxed
# code computes, and never could import them before the jail (the sandbox user could not
# read the interpreter's files); each library left out is one bind mount less per run
# (about 1 ms). `hashlib` falls back to its built-in algorithms without `_hashlib`.
SKIPPED_EXTENSIONS = frozenset(
    {
        "_tkinter", "readline", "_curses", "_curses_panel", "nis", "_dbm", "_gdbm", "_ssl",
        "_crypt", "_hashlib", "_sqlite3", "_bz2", "_lzma", "_uuid",
    }
)  # fmt: skip
PROBE_TIMEOUT_S = 30.0  # the one-off check that the layers work; generous for a busy machine
HOST_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # world-writable places cleaned without a jail
ALL_LAYERS = ("mountns", "pidns", "netns", "uid", "uid-per-run", "userns", "seccomp", "audit")
SIGNAL_REASONS = {
    "SIGXCPU": "CPU time limit exceeded",
    "SIGKILL": "killed (CPU or memory limit)",
    "SIGSEGV": "crashed (segmentation fault)",
    "SIGXFSZ": "file size limit exceeded",
}
log = logging.getLogger(__name__)


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
        layers: The isolation layers the child reported, of `ALL_LAYERS`: "mountns"
            (the jail), "pidns", "netns", "uid", "uid-per-run", "userns", "seccomp",
            "audit".
    """

    calls: tuple[CallOutcome | None, ...]
    load_error: str | None
    problem: str | None
    output: str
    layers: frozenset[str]


@dataclass(frozen=True)
class Isolation:
    """What this machine gives a run.

    Attributes:
        layers: The layers a run with the audit hook has here (see `ALL_LAYERS`).
        missing: Each layer it lacks, with why (what to install or allow to get it).
    """

    layers: frozenset[str]
    missing: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Plan:
    """How runs are set up here: chosen once per process by `_plan`, after a probe run.

    Attributes:
        jail: bwrap and its fixed arguments, or None without a jail.
        userns: Whether the child enters a user namespace (where its uid is 65534).
        own_uid: Whether each run (as root) gets a uid of its own, not `nobody`.
    """

    jail: tuple[str, ...] | None
    userns: bool
    own_uid: bool


_plan_lock = threading.Lock()
_chosen: tuple[_Plan, Isolation] | None = None
_uids_lock = threading.Lock()
_uids_in_use: set[int] = set()


def run_function(
    code: str,
    function: str,
    calls: Sequence[Sequence[Any]],
    limits: SandboxLimits | None = None,
    *,
    audit_hook: bool = True,
    preload: Sequence[str] = (),
    expose: Sequence[str | os.PathLike[str]] = (),
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
        expose: Host paths to make visible inside the jail, read-write at the same path,
            so that their own permissions decide what the run's uid may do there: what
            tests of the uid layer need. Without a jail every host path is visible.

    Returns:
        The outcomes. Whatever the code does, this returns (it raises only if the
        sandbox cannot be started at all, e.g. out of file descriptors).
    """
    plan, _ = _plan()
    return _run(plan, code, function, calls, limits or SandboxLimits(), audit_hook, preload, expose)


def isolation() -> Isolation:
    """The layers runs get on this machine, and why any are missing (probed once)."""
    return _plan()[1]


def sandbox_user() -> tuple[int, int] | None:
    """`(uid, gid)` of `nobody`, which runs drop to as root without user namespaces.

    None when not running as root (then runs keep the caller's uid).
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SANDBOX_USER)
    except KeyError:
        return NOBODY_ID, NOBODY_ID
    return entry.pw_uid, entry.pw_gid


# --- choosing the layers ------------------------------------------------------------


def _plan() -> tuple[_Plan, Isolation]:
    global _chosen
    with _plan_lock:
        if _chosen is None:
            _chosen = _choose_plan()
        return _chosen


def _choose_plan() -> tuple[_Plan, Isolation]:
    """Probes the strongest setup, then weaker ones; warns once about what is missing."""
    root = os.geteuid() == 0
    missing: dict[str, str] = {}
    jail, why_no_jail = _jail_arguments(root)
    candidates = [_Plan(None, True, root)]
    if jail is not None:
        candidates.insert(0, _Plan(jail, True, root))
    plan, result = candidates[-1], None
    for candidate in candidates:
        result, why = _probe(candidate)
        if result is not None:
            plan = candidate
            break
        if candidate.jail is not None:
            why_no_jail = f"bwrap could not start a jail here: {why}"
    if result is None:  # not even the child's own namespaces: the layers of old
        plan = _Plan(None, False, False)
        result, why = _probe(plan)
        if result is None:
            raise RuntimeError(f"The sandbox cannot run a trivial function here: {why}")
    if plan.userns and "userns" not in result.layers:  # the kernel refused: share `nobody`
        missing["userns"] = "the kernel refused an unprivileged user namespace"
        plan = replace(plan, userns=False, own_uid=False)
        result, _ = _probe(plan)
        if result is None:
            raise RuntimeError("The sandbox cannot run a trivial function here")
    layers = result.layers
    if plan.jail is None:
        missing["mountns"] = why_no_jail or "no jail"
    for layer, why in (
        ("pidns", "the kernel refused a PID namespace"),
        ("netns", "the kernel refused a network namespace"),
        ("seccomp", f"no seccomp filter for {os.uname().machine} or the kernel refused it"),
        ("uid", "not running as root: runs keep the caller's uid"),
        ("uid-per-run", "not running as root: runs keep the caller's uid" if not root
         else "without user namespaces every run drops to nobody"),  # fmt: skip
    ):
        if layer not in layers:
            missing.setdefault(layer, why)
    if missing:
        details = "; ".join(f"{layer}: {why}" for layer, why in missing.items())
        log.warning(
            "looprl sandbox: some isolation layers are unavailable here, so model code is "
            "contained by the others alone: %s. See the docstring of looprl.envs.sandbox; "
            "`make setup` installs bubblewrap (as root, on Debian).",
            details,
        )
    return plan, Isolation(frozenset(layers), missing)


def _probe(plan: _Plan) -> tuple[SandboxResult | None, str]:
    """Runs a trivial function under `plan`: the result if it worked, else why not."""
    result = _run(plan, "def f():\n    return 1\n", "f", [[]],
                  SandboxLimits(timeout_s=PROBE_TIMEOUT_S), True, (), ())  # fmt: skip
    if result.calls == (CallOutcome(1),) and result.problem is None:
        return result, ""
    why = result.load_error or result.problem or "no result"
    return None, f"{why}: {result.output.strip()[:300]}" if result.output.strip() else why


def _jail_arguments(root: bool) -> tuple[tuple[str, ...] | None, str]:
    """bwrap's fixed arguments (the read-only root), or None and why there is no jail."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed"
    exe = os.path.realpath(sys.executable)
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    dynload = os.path.join(stdlib, "lib-dynload")
    extensions = [
        os.path.join(dynload, name)
        for name in (sorted(os.listdir(dynload)) if os.path.isdir(dynload) else [])
        if name.endswith(".so") and name.partition(".")[0] not in SKIPPED_EXTENSIONS
    ]
    libraries, why = _shared_libraries([exe])
    if libraries is None:
        return None, why
    # ldd runs the loader once per file (~10 ms each): ask it only about the extension
    # modules that need a library the interpreter does not load already.
    known = {os.path.basename(library) for library in libraries}
    others = [path for path in extensions if not set(_needed(path) or ["?"]) <= known]
    if others:
        more, why = _shared_libraries(others)
        if more is None:
            return None, why
        libraries = sorted(set(libraries) | set(more))
    binds = {exe: exe, stdlib: stdlib}
    for library in libraries:
        if not library.startswith(stdlib + os.sep):
            binds[library] = os.path.realpath(library)
    args = [bwrap, "--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", "sandbox"]  # fmt: skip
    if root:  # the child keeps only what it needs to make its netns and drop to its uid
        args += ["--cap-drop", "ALL"]
        args += [a for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SYS_ADMIN") for a in ("--cap-add", cap)]
    else:  # bwrap itself needs a user namespace; the child makes its own inside it
        args += ["--unshare-user", "--uid", str(NOBODY_ID), "--gid", str(NOBODY_ID)]
    args += _directories(binds)
    for dest, source in binds.items():
        args += ["--ro-bind", source, dest]
    site = os.path.join(stdlib, "site-packages")
    if os.path.isdir(site):  # installed packages are not the standard library
        args += ["--perms", "0555", "--tmpfs", site]
    args += _directories({CHILD_SCRIPT: CHILD_SCRIPT})  # again: some may lie in that tmpfs
    args += ["--ro-bind", os.path.realpath(CHILD_SCRIPT), CHILD_SCRIPT]
    args += ["--proc", "/proc", "--dev", "/dev"]
    if os.path.isdir(site):
        args += ["--remount-ro", site]
    return tuple(args), ""


def _directories(binds: dict[str, str]) -> list[str]:
    """`--dir` arguments for every ancestor of the bind targets, world-traversable.

    bwrap would make them with the mode of their host counterparts (`/root` is 0700),
    which would keep the run's uid out of the interpreter.
    """
    ancestors = set()
    for dest in binds:
        parent = os.path.dirname(dest)
        while parent not in ("/", ""):
            ancestors.add(parent)
            parent = os.path.dirname(parent)
    return [a for d in sorted(ancestors) for a in ("--perms", "0755", "--dir", d)]


def _needed(path: str) -> list[str] | None:
    """The sonames an ELF64 little-endian file names as DT_NEEDED; None if it is not one."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
            return None
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        loads, dynamic = [], None
        for i in range(phnum):
            kind, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
            if kind == 1:  # PT_LOAD
                loads.append((vaddr, offset, filesz))
            elif kind == 2:  # PT_DYNAMIC
                dynamic = (offset, filesz)
        if dynamic is None:
            return []
        needed, strtab = [], None
        for at in range(dynamic[0], dynamic[0] + dynamic[1], 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == 0:  # DT_NULL
                break
            if tag == 1:  # DT_NEEDED: an offset into the string table
                needed.append(value)
            elif tag == 5:  # DT_STRTAB: the string table's address
                strtab = next((value - v + o for v, o, n in loads if v <= value < v + n), None)
        if needed and strtab is None:
            return None
        return [data[strtab + n : data.index(b"\0", strtab + n)].decode() for n in needed]
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None


def _shared_libraries(files: list[str]) -> tuple[list[str] | None, str]:
    """The shared libraries `files` load, as the dynamic loader finds them (`ldd`)."""
    ldd = shutil.which("ldd") or ("/usr/bin/ldd" if os.path.exists("/usr/bin/ldd") else None)
    if ldd is None:
        return None, "ldd is not installed, so the interpreter's libraries cannot be listed"
    try:
        listing = subprocess.run([ldd, *files], capture_output=True, text=True, timeout=120,
                                 env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"ldd failed: {error}"
    libraries = set()
    for line in listing.splitlines():
        words = line.split()
        path = words[2] if len(words) >= 3 and words[1] == "=>" else (words[0] if words else "")
        if path.startswith("/") and os.path.exists(path):
            libraries.add(path)
    if not libraries:
        return None, "ldd listed no shared libraries for the interpreter"
    return sorted(libraries), ""


# --- one run ------------------------------------------------------------------------


def _run(
    plan: _Plan,
    code: str,
    function: str,
    calls: Sequence[Sequence[Any]],
    limits: SandboxLimits,
    audit_hook: bool,
    preload: Sequence[str],
    expose: Sequence[str | os.PathLike[str]],
) -> SandboxResult:
    nonce = secrets.token_hex(16)
    uid = _take_uid() if plan.own_uid else None
    user = (uid, uid) if uid is not None else sandbox_user()
    host_dir = None if plan.jail is not None else tempfile.mkdtemp(prefix="looprl-sandbox-")
    read_fd = write_fd = args_fd = -1
    try:
        if host_dir is not None and user is not None:
            os.chown(host_dir, *user)
        read_fd, write_fd = os.pipe()
        config = {
            "uid": None if user is None else user[0],
            "gid": None if user is None else user[1],
            "own_uid": uid is not None,
            "userns": plan.userns,
            "layers": [] if plan.jail is None else ["mountns", "pidns"],
            "work_dir": None if plan.jail is None else f"/tmp/looprl-sandbox-{secrets.token_hex(6)}",
            "result_fd": write_fd,
            "limits": limits.for_child(),
            "audit": audit_hook,
            "preload": list(preload),
        }
        stdin = _payload(config, nonce, code, function, calls)
        argv = _child_argv()
        if plan.jail is not None:
            args_fd = _jail_options(plan.jail, limits, expose)
            argv = [plan.jail[0], "--args", str(args_fd), "--", *argv]
        process = _start(argv, (write_fd,) + ((args_fd,) if args_fd >= 0 else ()), host_dir)
        os.close(write_fd)  # the child holds the only write end: its exit is our EOF
        write_fd = -1
        streams = _Streams(nonce, limits.max_output_chars)
        try:
            _exchange(process, read_fd, stdin, streams, time.monotonic() + limits.timeout_s)
        finally:
            _stop(process, streams.layers)
    finally:
        for fd in (read_fd, write_fd, args_fd):
            if fd >= 0:
                os.close(fd)
        if host_dir is not None:
            shutil.rmtree(host_dir, ignore_errors=True)
            if uid is not None:  # no jail: what this run's uid left in the host's /tmp
                _remove_files_of(uid)
        if uid is not None:
            with _uids_lock:
                _uids_in_use.discard(uid)
    returncode = process.returncode
    if plan.jail is not None and returncode is not None and 128 < returncode <= 128 + 64:
        # bwrap exits 128 + N when its child died of signal N. Code that exits with 128 + N
        # itself reads the same: it only changes the message of its own failed run.
        returncode = 128 - returncode
    return streams.result(len(calls), returncode, limits.timeout_s)


def _take_uid() -> int:
    """A uid from `UID_RANGE` that no account and no other run of this process has."""
    low, high = UID_RANGE
    with _uids_lock:
        while True:
            uid = low + secrets.randbelow(high - low)
            if uid in _uids_in_use:
                continue
            try:
                pwd.getpwuid(uid)
            except KeyError:
                _uids_in_use.add(uid)
                return uid


def _remove_files_of(uid: int) -> None:
    """Removes what `uid` (one run's own) left at the top of the host's world-writable dirs."""
    for directory in HOST_TMP_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def _jail_options(fixed: tuple[str, ...], limits: SandboxLimits, expose: Sequence[Any]) -> int:
    """A pipe's read end holding bwrap's options for this run, NUL-separated.

    Passed as `--args FD`, so that the jail's `/proc/1/cmdline` (and the host's process
    list) shows `bwrap --args N` instead of every path bound into it.
    """
    file_bytes = limits.max_file_kb * 1024
    options = list(fixed[1:])
    options += ["--perms", "1777", "--size", str(JAIL_TMP_FILES * file_bytes), "--tmpfs", "/tmp"]
    options += ["--perms", "1777", "--size", str(JAIL_SHM_FILES * file_bytes),
                "--tmpfs", "/dev/shm"]  # fmt: skip
    shown = {os.path.abspath(os.fspath(p)): os.path.realpath(os.fspath(p)) for p in expose}
    options += _directories(shown)
    for dest, source in shown.items():
        options += ["--bind", source, dest]
    options += ["--remount-ro", "/", "--chdir", "/"]
    data = b"".join(os.fsencode(option) + b"\0" for option in options)
    read_fd, write_fd = os.pipe()
    try:
        if len(data) > 60_000:  # more than a pipe takes without a reader
            raise ValueError(f"bwrap's options take {len(data)} bytes; expose fewer paths")
        os.write(write_fd, data)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


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


def _child_argv() -> list[str]:
    # -S: no site (no site-packages, no .pth code); -B: no bytecode written; -P (3.11+):
    # the script's folder stays off sys.path. The environment is ours, so -E/-I add nothing.
    # The parent's pid is only there so that a process listing shows whose sandbox it is.
    # The interpreter's real path: a venv's `python` is a symlink whose pyvenv.cfg the
    # jail does not hold.
    flags = ["-S", "-B", *(["-P"] if sys.version_info >= (3, 11) else [])]
    return [os.path.realpath(sys.executable), *flags, CHILD_SCRIPT, str(os.getpid())]


def _start(argv: list[str], pass_fds: tuple[int, ...], work_dir: str | None) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=work_dir or "/",
        env=dict(CHILD_ENV),
        pass_fds=pass_fds,
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
