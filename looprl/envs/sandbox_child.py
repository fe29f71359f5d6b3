"""The child side of `looprl.envs.sandbox`: runs one untrusted program's function on inputs.

`looprl.envs.sandbox` starts this file as a script in a fresh interpreter
(`python -S -B [-P] sandbox_child.py PARENT_PID`, its own session and a near-empty
environment; where bubblewrap works, inside a jail whose root holds only the interpreter
and its standard library); looprl never imports it. Everything happens in this order, so
that no model-written code runs before the boundary is up:

1. Read the payload (settings, per-run nonce, code, function name, inputs; `marshal`, from
   the trusted parent) from stdin, then close stdin. It is data: nothing in it runs yet.
2. Import the standard modules the code imports, if they are on the allowlist
   `IMPORTABLE`, while the interpreter's files are still readable (without the jail the
   sandbox user often cannot read them, e.g. under `/root`). Found by reading the code's
   `import` lines as text; other imports may fail later.
3. Isolate (see `isolate`): new PID and network namespaces, the run's own unprivileged
   uid, a user namespace in which that uid is `nobody` (65534), no capabilities, and a
   seccomp filter (no `exec`, no signals to other processes, no new namespaces); each
   where the kernel allows it, and reported as a layer only if it took.
4. Lower the resource limits: CPU seconds, address space, processes, file size, open
   files, no core dumps.
5. Install the audit hook (defence in depth; see `audit_hook`).
6. Run the code, call the function on each input, and report each outcome as one
   nonce-prefixed JSON line on the result pipe, then `os._exit(0)`.

The parent keeps the expected outputs: this process only reports what the function
returned, so whatever it writes, it cannot make a wrong answer count as right.

Startup time is most of a run's cost, so this imports only built-in and tiny modules
(`json`, `traceback` and `signal` would double it; the kernel calls go through `_ctypes`
directly, not the `ctypes` package): results are encoded by hand with `_json`'s string
escaper, and tracebacks are formatted by hand.
"""

import builtins
import itertools
import marshal
import os
import posix
import resource
import sys
from _json import encode_basestring_ascii as json_string

# Pure-computation standard modules a solution may import: imported before the privilege
# drop (when the code imports them), since without the jail the sandbox user may not be
# able to read the interpreter's files at all.
IMPORTABLE = frozenset(
    {
        "abc", "array", "bisect", "calendar", "cmath", "collections", "collections.abc",
        "contextlib", "copy", "dataclasses", "datetime", "decimal", "enum", "fractions",
        "functools", "graphlib", "heapq", "itertools", "json", "math", "numbers",
        "operator", "pprint", "random", "re", "statistics", "string", "struct",
        "textwrap", "types", "typing", "unicodedata",
    }
)  # fmt: skip
# Never importable from model code: each is a way around the audit hook or to the network.
# The hook keeps its own copies of these policy sets: rebinding these names (they are
# globals of `__main__`, which the code can import) changes nothing.
DENIED_IMPORTS = frozenset(
    {
        "ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing",
        "_multiprocessing", "socket", "_socket", "ssl", "_ssl", "pty", "_testcapi",
        "_testinternalcapi", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
    }
)  # fmt: skip
# Audit events that are refused outright (prefixes end with a dot or name a family).
# Tracing and profiling are refused because a tracer sees (and in 3.11 can rewrite) the
# locals of the hook's own frame while it runs.
DENIED_EVENTS = frozenset(
    {
        "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill",
        "os.symlink", "os.link", "subprocess.Popen", "sys._current_frames", "gc.get_objects",
        "gc.get_referrers", "gc.get_referents", "resource.setrlimit", "resource.prlimit",
        "os.setxattr", "os.removexattr", "os.mkfifo", "os.mknod", "pty.spawn",
        "sys.settrace", "sys.setprofile", "sys.monitoring.register_callback",
    }
)  # fmt: skip
DENIED_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.posix_spawn", "os.spawn", "_winapi.")
# Events whose string or bytes arguments are paths that must lie in the working directory.
WRITE_EVENTS = frozenset(
    {
        "os.mkdir", "os.remove", "os.rename", "os.rmdir", "os.truncate", "os.chmod",
        "os.chown", "os.utime", "os.chdir", "os.chflags", "os.lchflags", "shutil.copyfile",
        "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.move",
        "shutil.rmtree", "shutil.make_archive", "shutil.unpack_archive",
    }
)  # fmt: skip
# Events whose path arguments must lie in the working directory or the import path.
READ_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "glob.glob/2", "os.listxattr"})
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
MAX_WRITE_OPENS = 64  # with the file size limit, bounds the disk a run can fill
SANDBOX_ID = 65534  # the uid and gid the code sees inside its user namespace ("nobody")
INFINITY = float("inf")
MAX_TRACEBACK_CHARS = 2_000
MAX_VALUE_CHARS = 100_000
MAX_DEPTH = 50
SOLUTION_FILE = "solution.py"

# Kernel interface constants (linux/sched.h, linux/prctl.h, linux/seccomp.h, linux/filter.h,
# linux/audit.h, linux/capability.h): Python 3.11 has no bindings for them.
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS = 0x00020000, 0x02000000, 0x04000000
CLONE_NEWIPC, CLONE_NEWUSER = 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
NAMESPACE_FLAGS = (
    CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
    | CLONE_NEWPID | CLONE_NEWNET
)  # fmt: skip
PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 4, 22, 38
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x50000, 0x7FFF0000
EPERM, ENOSYS = 1, 38
CAPABILITY_VERSION_3 = 0x20080522
# Per machine: the audit arch, then syscall numbers. Refused (EPERM): running programs,
# signalling or tracing other processes, new namespaces or mounts (a user namespace would
# hand the code every capability inside it), and kernel interfaces that only widen the
# attack surface (io_uring, bpf, perf, userfaultfd, keyrings). clone3 answers ENOSYS, so
# that glibc falls back to clone, whose flags the filter can read.
SYSCALLS = {
    "x86_64": (0xC000003E, {
        "execve": 59, "execveat": 322, "kill": 62, "tkill": 200, "tgkill": 234,
        "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424,
        "pidfd_open": 434, "pidfd_getfd": 438, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "unshare": 272, "setns": 308, "mount": 165,
        "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428,
        "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "io_uring_setup": 425, "io_uring_enter": 426,
        "io_uring_register": 427, "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "keyctl": 250, "add_key": 248, "request_key": 249, "clone": 56, "clone3": 435,
    }),
    "aarch64": (0xC00000B7, {
        "execve": 221, "execveat": 281, "kill": 129, "tkill": 130, "tgkill": 131,
        "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424,
        "pidfd_open": 434, "pidfd_getfd": 438, "ptrace": 117, "process_vm_readv": 270,
        "process_vm_writev": 271, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "bpf": 280,
        "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219, "add_key": 217,
        "request_key": 218, "clone": 220, "clone3": 435,
    }),
}  # fmt: skip
X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: other numbers for the same calls


class Unreportable(Exception):
    """The function returned something that has no plain JSON form."""


def main() -> None:
    own_dir = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != own_dir]
    os.environ.pop("PWD", None)  # bwrap sets it; the environment is otherwise the parent's
    payload = marshal.loads(sys.stdin.buffer.read())
    os.close(0)
    sys.stdin = None  # input() now raises instead of blocking
    config = payload["config"]
    for name in imported_modules(payload["code"]) & IMPORTABLE | set(config["preload"]):
        __import__(name)
    layers = isolate(config)
    limit_resources(config["limits"])
    if config["work_dir"] is not None:  # in the jail: made here, so that the run's uid owns it
        os.mkdir(config["work_dir"], 0o700)
        os.chdir(config["work_dir"])
    reporter = Reporter(config["result_fd"], payload.pop("nonce"))
    if config["audit"]:
        sys.addaudithook(audit_hook(os.getcwd(), tuple(p for p in sys.path if p)))
        layers.append("audit")
    reporter.send("ready", layers=encode(layers, 0))
    run(payload["code"], payload["function"], payload["calls"], reporter)


def imported_modules(code: str) -> set[str]:
    r"""The modules named by `import` and `from ... import` statements, read as plain text.

    Example:
        >>> sorted(imported_modules("import math, re as r\nfrom collections import Counter"))
        ['collections', 'math', 're']
    """
    names = set()
    for statement in code.replace(";", "\n").splitlines():
        words = statement.split()
        if len(words) >= 2 and words[0] == "import":
            names.update(part.split()[0] for part in " ".join(words[1:]).split(",") if part.strip())
        elif len(words) >= 4 and words[0] == "from" and words[2] == "import":
            names.add(words[1])
    return names


# --- isolation -------------------------------------------------------------------


def isolate(config: dict) -> list[str]:
    """Enters namespaces, drops privileges and filters syscalls; returns the layers now active.

    `config["layers"]` are those the parent's jail already set up ("mountns", "pidns").
    As root, the child first enters what it can as root (a PID namespace where the jail
    gave none; a network namespace, owned by the host's user namespace, so that nothing
    inside can ever configure it), then drops to the run's uid (`config["uid"]`, one no
    other run uses where `config["own_uid"]`). Then, where `config["userns"]`, it enters a
    user namespace in which its uid is `nobody` (65534): what the code sees, whatever uid
    the host knows it by. Last it gives up every capability and installs the seccomp
    filter, which also stops any later namespace change.
    """
    layers = list(config["layers"])
    native = Native.load()
    if os.geteuid() == 0 and config["uid"] is not None:
        if "pidns" not in layers and native.unshare(CLONE_NEWPID):
            fork_into_pid_namespace(config["result_fd"])
            layers.append("pidns")
        if native.unshare(CLONE_NEWNET):
            layers.append("netns")
        drop_to(config["uid"], config["gid"])
        layers += ["uid", "uid-per-run"] if config["own_uid"] else ["uid"]
        native.prctl(PR_SET_DUMPABLE, 1)  # the uid change made /proc/self root's; the maps need it
    if config["userns"] and native.available:
        flags = CLONE_NEWUSER | (0 if "netns" in layers else CLONE_NEWNET)
        flags |= 0 if "pidns" in layers else CLONE_NEWPID
        uid, gid = os.geteuid(), os.getegid()
        if native.unshare(flags) and map_to_nobody(uid, gid):
            layers.append("userns")
            layers += [] if "netns" in layers else ["netns"]
            if "pidns" not in layers:
                fork_into_pid_namespace(config["result_fd"])
                layers.append("pidns")
    native.prctl(PR_SET_DUMPABLE, 0)
    native.drop_capabilities()
    if native.install_seccomp():
        layers.append("seccomp")
    native.forget()
    return layers


def drop_to(uid: int, gid: int) -> None:
    """Becomes `uid`/`gid` with no supplementary groups, for good (or exits)."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:  # paranoia: a drop that can be undone is no drop
        os.setuid(0)
    except PermissionError:
        return
    os._exit(70)


def map_to_nobody(uid: int, gid: int) -> bool:
    """In a fresh user namespace: makes the host's `uid`/`gid` appear as 65534 inside."""
    try:
        for name, text in (
            ("setgroups", "deny"),  # required before an unprivileged gid map
            ("uid_map", f"{SANDBOX_ID} {uid} 1"),
            ("gid_map", f"{SANDBOX_ID} {gid} 1"),
        ):
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    except OSError:
        return False
    return os.getuid() == SANDBOX_ID


def fork_into_pid_namespace(result_fd: int) -> None:
    """Forks the namespace's first process, which goes on; this one waits and mirrors it.

    When the first process of a PID namespace dies, the kernel kills every process left
    in it, so nothing the model's code forks can outlive the run.
    """
    pid = os.fork()
    if pid == 0:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # leave the pipes to the child, so the parent sees their EOF
        os.dup2(devnull, fd)
    os.close(result_fd)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):  # die the same way, so the parent sees how the run ended
        os.kill(os.getpid(), os.WTERMSIG(status))
        os._exit(128 + os.WTERMSIG(status))  # a signal this interpreter ignores
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


class Native:
    """The few libc calls the isolation needs, through `_ctypes` (removed again afterwards).

    Each call returns False (or does nothing) where the call or `_ctypes` itself is
    unavailable, so that a missing layer is reported missing instead of crashing the run.
    """

    def __init__(self, ctypes_module) -> None:
        self._c = ctypes_module
        self.available = ctypes_module is not None
        if not self.available:
            return
        c = ctypes_module

        class Long(c._SimpleCData):
            _type_ = "l"

        class Function(c.CFuncPtr):
            _flags_ = c.FUNCFLAG_CDECL | c.FUNCFLAG_USE_ERRNO
            _restype_ = Long

        class Libc:
            _handle = c.dlopen(None, getattr(os, "RTLD_NOW", 2))

        self._long, self._function, self._libc = Long, Function, Libc

    @classmethod
    def load(cls) -> "Native":
        try:
            import _ctypes  # only here, before any model code; removed from sys.modules below
        except ImportError:
            return cls(None)
        return cls(_ctypes)

    def _call(self, name: str, *args: int) -> bool:
        if not self.available:
            return False
        try:
            function = self._function((name, self._libc))
        except AttributeError:  # no such symbol in this libc
            return False
        return function(*(self._long(a) for a in args)) == 0

    def _buffer(self, data: bytes):
        """A C copy of `data`, alive as long as the returned object."""

        class Char(self._c._SimpleCData):
            _type_ = "c"

        class Array(self._c.Array):
            _type_ = Char
            _length_ = max(len(data), 1)

        return Array.from_buffer_copy(data.ljust(1, b"\0"))

    def unshare(self, flags: int) -> bool:
        if hasattr(os, "unshare"):  # Python 3.12+
            try:
                os.unshare(flags)
            except OSError:
                return False
            return True
        return self._call("unshare", flags)

    def prctl(self, option: int, value: int) -> bool:
        return self._call("prctl", option, value, 0, 0, 0)

    def drop_capabilities(self) -> bool:
        """Empties the effective, permitted and inheritable sets (capset with zeros)."""
        if not self.available:
            return False
        header = self._buffer(CAPABILITY_VERSION_3.to_bytes(4, "little") + bytes(4))
        data = self._buffer(bytes(24))  # two __user_cap_data_struct of three u32, all zero
        return self._call("capset", self._c.addressof(header), self._c.addressof(data))

    def install_seccomp(self) -> bool:
        """Installs `seccomp_filter()` on this process and every process it starts."""
        program = seccomp_filter(os.uname().machine)
        if program is None or not self.available:
            return False
        code = self._buffer(program)
        # struct sock_fprog: unsigned short len, 6 bytes of padding, struct sock_filter *
        fprog = self._buffer((len(program) // 8).to_bytes(2, "little") + bytes(6)
                             + self._c.addressof(code).to_bytes(8, "little"))  # fmt: skip
        return self.prctl(PR_SET_NO_NEW_PRIVS, 1) and self._call(
            "prctl", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._c.addressof(fprog), 0, 0
        )

    def forget(self) -> None:
        """Drops `_ctypes` from `sys.modules`: importing it again is an audited import."""
        self._c = self._long = self._function = self._libc = None
        self.available = False
        for name in [m for m in sys.modules if m.startswith(("ctypes", "_ctypes"))]:
            del sys.modules[name]


def seccomp_filter(machine: str) -> bytes | None:
    """The classic-BPF seccomp program (see `SYSCALLS`), or None on an unknown machine.

    Another architecture's calling convention (i386 through `int 0x80` on x86_64) kills
    the process: its syscall numbers mean other calls, which the filter does not know.
    """
    if machine not in SYSCALLS or sys.byteorder != "little":
        return None
    arch, numbers = SYSCALLS[machine]
    load, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|..., BPF_RET
    denied = [n for name, n in numbers.items() if name not in ("clone", "clone3")]
    # (code, jump-if-true label, jump-if-false label, k); labels resolve to offsets below
    program: list[tuple[int, str | None, str | None, int]] = [
        (load, None, None, 4),  # seccomp_data.arch
        (jeq, None, "kill", arch),
        (load, None, None, 0),  # seccomp_data.nr
    ]
    if machine == "x86_64":
        program.append((jge, "deny", None, X32_SYSCALL_BIT))
    program += [(jeq, "deny", None, n) for n in denied]
    program += [
        (jeq, "nosys", None, numbers["clone3"]),
        (jeq, None, "allow", numbers["clone"]),
        (load, None, None, 16),  # the low half of clone's first argument: its flags
        (jset, "deny", "allow", NAMESPACE_FLAGS),
    ]
    targets = {
        "allow": SECCOMP_RET_ALLOW,
        "deny": SECCOMP_RET_ERRNO | EPERM,
        "nosys": SECCOMP_RET_ERRNO | ENOSYS,
        "kill": SECCOMP_RET_KILL_PROCESS,
    }
    where = {label: len(program) + i for i, label in enumerate(targets)}
    out = bytearray()
    for index, (code, if_true, if_false, k) in enumerate(program):
        offsets = [0 if label is None else where[label] - index - 1 for label in (if_true, if_false)]
        out += code.to_bytes(2, "little") + bytes(offsets) + k.to_bytes(4, "little")
    for value in targets.values():
        out += ret.to_bytes(2, "little") + bytes(2) + value.to_bytes(4, "little")
    return bytes(out)


def limit_resources(limits: dict) -> None:
    """Sets hard limits the code cannot raise again."""
    cpu = limits["cpu_s"]
    for which, value in (
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit, SIGKILL after
        (resource.RLIMIT_AS, (limits["memory_bytes"],) * 2),
        (resource.RLIMIT_NPROC, (limits["max_processes"],) * 2),
        (resource.RLIMIT_FSIZE, (limits["max_file_bytes"],) * 2),
        (resource.RLIMIT_NOFILE, (limits["max_open_files"],) * 2),
        (resource.RLIMIT_CORE, (0, 0)),
    ):
        resource.setrlimit(which, value)
    # Python ignores SIGXFSZ from startup, so a too-big write fails instead of killing.


# --- the audit hook --------------------------------------------------------------


def audit_hook(work_dir: str, import_path: tuple[str, ...]):
    """A `sys.addaudithook` hook confining the code to `work_dir`, without network or processes.

    Writes (and directory changes) must stay inside `work_dir`, at most `MAX_WRITE_OPENS`
    of them; reads must stay inside it or the import path (the standard library). Paths
    must be `str` or `bytes`: an object with `__fspath__` could name one path to the hook
    and another to the call.

    The policy is frozen into the hook when it is made. Every set, limit, builtin and C
    function the hook uses is a default argument, held by the function object, which
    nothing hands to the code; none is a name looked up in a module's globals or in
    `builtins` when an event comes, so rebinding `__main__.DENIED_EVENTS`, `builtins.any`
    or `posixpath.realpath` changes nothing. Paths are resolved inline with `readlink`
    (`os.path.realpath` is Python code that looks its helpers up in module globals).
    The hook's frame, which a traceback of a refused call exposes, holds no mutable
    object but the count of write opens, an `itertools.count` that code can only
    advance. Arguments of any type but the exact built-in ones are refused, so that no
    code of the model's (a `__hash__`, a `__contains__`) runs while the hook does.
    """
    realpath = os.path.realpath  # trusted here: no model code has run yet
    work = realpath(work_dir)
    readable = tuple(root + "/" for root in (work, *(realpath(p) for p in import_path)))

    def hook(
        event, args, *, _type=type, _str=str, _bytes=bytes, _int=int, _bool=bool, _float=float,
        _tuple=tuple, _len=len, _next=next, _repr=repr, _list=list, _reversed=reversed,
        _startswith=str.startswith, _partition=str.partition, _split=str.split, _join=str.join,
        _decode=bytes.decode, _getcwd=posix.getcwd, _readlink=posix.readlink,
        _writes=itertools.count(), _max_writes=MAX_WRITE_OPENS, _write_flags=WRITE_FLAGS,
        _writable=(work + "/",), _readable=readable, _devnull=os.devnull,
        _denied_imports=DENIED_IMPORTS, _denied_events=DENIED_EVENTS,
        _denied_prefixes=DENIED_PREFIXES, _write_events=WRITE_EVENTS, _read_events=READ_EVENTS,
        _OSError=OSError, _PermissionError=PermissionError, _ImportError=ImportError,
        _RuntimeError=RuntimeError, _max_links=40,
    ) -> None:
        if _type(event) is not _str or _type(args) is not _tuple:
            return  # only sys.audit() called by the code itself passes other types
        writing = False
        if event == "open":
            if _len(args) != 3:
                raise _PermissionError("sandbox: an open the hook cannot read is not allowed")
            path, mode, flags = args
            if _type(path) is _int:  # an already open descriptor
                return
            if _type(mode) is _str:
                writing = "w" in mode or "a" in mode or "x" in mode or "+" in mode
            elif mode is None and _type(flags) is _int:
                writing = flags & _write_flags != 0
            else:
                raise _PermissionError("sandbox: an open the hook cannot read is not allowed")
            paths = (path,)
            roots = _writable if writing else _readable
        elif event in _write_events or event in _read_events:
            paths = []
            for arg in args:
                kind = _type(arg)
                if kind is _str or kind is _bytes:
                    paths.append(arg)
                elif not (arg is None or kind is _int or kind is _bool or kind is _float
                          or kind is _tuple):  # fmt: skip
                    raise _PermissionError(
                        "sandbox: " + event + " takes only str or bytes paths here"
                    )
            roots = _writable if event in _write_events else _readable
        elif event == "import":
            name = args[0] if args else None
            if _type(name) is not _str:
                raise _ImportError("sandbox: importing that module is not allowed")
            if _partition(name, ".")[0] in _denied_imports:
                raise _ImportError("sandbox: importing " + name + " is not allowed")
            return
        elif event in _denied_events or _startswith(event, _denied_prefixes):
            raise _PermissionError("sandbox: " + event + " is not allowed")
        elif event == "sys.addaudithook":
            raise _RuntimeError("sandbox: no more audit hooks")  # refused without a trace
        else:
            return
        for path in paths:
            # The path, absolute, with every symlink followed (as realpath does; a missing
            # part is kept as written); None for a non-path, a NUL or a symlink loop.
            target = path
            if _type(target) is _bytes:
                target = _decode(target, "utf-8", "surrogateescape")  # PYTHONUTF8=1
            if _type(target) is not _str or "\0" in target:
                target = None
            else:
                if not _startswith(target, "/"):
                    target = _getcwd() + "/" + target
                pending = _list(_reversed(_split(target, "/")))
                parts = []
                links = 0
                while pending:
                    name = pending.pop()
                    if name == "" or name == ".":
                        continue
                    if name == "..":
                        if parts:
                            parts.pop()
                        continue
                    parts.append(name)
                    try:
                        link = _readlink("/" + _join("/", parts))
                    except _OSError:  # not a symlink, or missing
                        continue
                    parts.pop()
                    links += 1
                    if links > _max_links:
                        pending = None
                        break
                    if _startswith(link, "/"):
                        parts.clear()
                    pending.extend(_reversed(_split(link, "/")))
                target = None if pending is None else "/" + _join("/", parts)
            if target is None or not (target == _devnull or _startswith(target + "/", roots)):
                shown = _repr(path) if _type(path) is _str or _type(path) is _bytes else "that path"
                if event != "open":
                    raise _PermissionError("sandbox: " + event + " on " + shown + " is not allowed")
                what = "writing " if writing else "reading "
                raise _PermissionError(
                    "sandbox: " + what + shown + " is not allowed outside the working directory"
                )
        if writing and _next(_writes) >= _max_writes:
            raise _PermissionError(
                "sandbox: at most " + _repr(_max_writes) + " files may be opened for writing"
            )

    return hook


# --- running the code ------------------------------------------------------------


class Reporter:
    """Writes nonce-prefixed JSON lines to the result pipe."""

    def __init__(self, fd: int, nonce: str) -> None:
        self._fd = fd
        self._prefix = nonce.encode() + b" "

    def send(self, kind: str, **fields: str) -> None:
        """Sends `{"kind": kind, **fields}`; each field value is JSON text already."""
        items = "".join(f", {json_string(k)}: {v}" for k, v in fields.items())
        data = self._prefix + f'{{"kind": {json_string(kind)}{items}}}\n'.encode()
        while data:
            data = data[os.write(self._fd, data) :]


def run(code: str, function: str, calls: list, reporter: Reporter) -> None:
    """Loads the code, calls `function` on each input, reports, and exits."""
    target = load(code, function, reporter)
    if target is not None:
        for index, arguments in enumerate(calls):
            reporter.send("call", index=str(index), **call(target, arguments, code))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # the code may have replaced or closed them
            pass
    reporter.send("done")
    os._exit(0)  # skips atexit handlers and finalizers the code registered


def load(code: str, function: str, reporter: Reporter):
    """Runs the code in a fresh module namespace; returns `function` or reports why not."""
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(code, SOLUTION_FILE, "exec"), namespace)
        target = namespace.get(function)
    except BaseException as error:  # SystemExit too: exiting early is the code's failure
        reporter.send("load", error=json_string(describe(error, code)))
        return None
    if not callable(target):
        message = f"the code does not define a function named {function!r}"
        reporter.send("load", error=json_string(message))
        return None
    return target


def call(target, arguments: bytes, code: str) -> dict:
    """`{"value": ...}` or `{"error": ...}` (JSON text) for one call on fresh arguments."""
    try:
        value = target(*marshal.loads(arguments))
    except BaseException as error:
        return {"error": json_string(describe(error, code))}
    try:
        text = encode(value, 0)
        if len(text) > MAX_VALUE_CHARS:
            raise Unreportable(f"a return value longer than {MAX_VALUE_CHARS} characters")
    except Unreportable as problem:
        return {"error": json_string(f"returned {problem}, not a plain value (int, float, str, "
                                     "bool, None, or a list/tuple/dict of them)")}  # fmt: skip
    except BaseException as error:  # e.g. MemoryError on a huge value
        return {"error": json_string(describe(error, code))}
    return {"value": text}


def encode(value, depth: int) -> str:
    """`value` as JSON text, by exact type: subclasses (which could override `__eq__`) fail."""
    kind = type(value)
    if depth > MAX_DEPTH:
        raise Unreportable(f"a value nested more than {MAX_DEPTH} levels deep")
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        if value.bit_length() > 3_000:
            raise Unreportable("an integer with more than 900 digits")
        return int.__repr__(value)
    if kind is float:  # JSON has no inf or nan: they become strings, which never match
        return float.__repr__(value) if -INFINITY < value < INFINITY else json_string(repr(value))
    if kind is str:
        return json_string(value)
    if kind in (list, tuple):
        return "[" + ", ".join([encode(item, depth + 1) for item in value]) + "]"
    if kind is dict and all(type(key) is str for key in value):
        items = [f"{json_string(k)}: {encode(v, depth + 1)}" for k, v in value.items()]
        return "{" + ", ".join(items) + "}"
    raise Unreportable(f"a value of type {kind.__name__}")


def describe(error: BaseException, code: str) -> str:
    """The error as a short traceback of the code's frames (none of this harness's)."""
    try:
        lines = code.splitlines()
        frames = []
        trace = error.__traceback__
        while trace is not None:
            where = trace.tb_frame.f_code
            if where.co_filename != __file__:
                frames.append(
                    f'  File "{where.co_filename}", line {trace.tb_lineno}, in {where.co_name}'
                )
                if where.co_filename == SOLUTION_FILE and 0 < trace.tb_lineno <= len(lines):
                    frames.append("    " + lines[trace.tb_lineno - 1].strip())
            trace = trace.tb_next
        text = "\n".join(
            ["Traceback (most recent call last):"] * bool(frames) + frames + [last_line(error)]
        )
    except BaseException:  # a hostile __str__ on the exception, say
        text = f"{type(error).__name__} (its message could not be shown)"
    return text if len(text) <= MAX_TRACEBACK_CHARS else "..." + text[-MAX_TRACEBACK_CHARS:]


def last_line(error: BaseException) -> str:
    """`ValueError: message`, with the offending line for a `SyntaxError`."""
    kind = type(error)
    module = kind.__module__
    name = (
        kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"
    )
    if isinstance(error, SyntaxError) and error.lineno is not None:
        head = f'  File "{error.filename}", line {error.lineno}'
        text = (error.text or "").rstrip("\n")
        if text.strip():
            indent = len(text) - len(text.lstrip())
            caret = " " * max((error.offset or 1) - 1 - indent, 0) + "^"
            head += f"\n    {text.strip()}\n    {caret}"
        return f"{head}\n{name}: {error.msg}"
    message = str(error)
    return f"{name}: {message}" if message else name


if __name__ == "__main__":
    main()
