"""The child side of `looprl.envs.sandbox`: runs one untrusted program's function on inputs.

`looprl.envs.sandbox` starts this file as a script in a fresh interpreter
(`python -S -B [-P] sandbox_child.py PARENT_PID`, its own session, temporary directory
and a near-empty environment); looprl never imports it. Everything happens in this
order, so that no model-written code runs before the boundary is up:

1. Read the payload (settings, per-run nonce, code, function name, inputs; `marshal`, from
   the trusted parent) from stdin, then close stdin. It is data: nothing in it runs yet.
2. Import the standard modules the code imports, if they are on the allowlist
   `IMPORTABLE`, while the interpreter's files are still readable (the sandbox user
   often cannot read them, e.g. under `/root`). Found by reading the code's `import`
   lines as text; other imports may fail later.
3. If root: enter new network and PID namespaces where the kernel allows it (silently
   skipped where not), then drop to the sandbox user (no supplementary groups).
4. Lower the resource limits: CPU seconds, address space, processes, file size, open
   files, no core dumps.
5. Install the audit hook (defence in depth; see `looprl.envs.sandbox`).
6. Run the code, call the function on each input, and report each outcome as one
   nonce-prefixed JSON line on the result pipe, then `os._exit(0)`.

The parent keeps the expected outputs: this process only reports what the function
returned, so whatever it writes, it cannot make a wrong answer count as right.

Startup time is most of a run's cost, so this imports only built-in and tiny modules
(`json`, `traceback` and `signal` would double it): results are encoded by hand with
`_json`'s string escaper, and tracebacks are formatted by hand.
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
# drop (when the code imports them), since the sandbox user may not be able to read the
# interpreter's files at all.
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
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
MAX_WRITE_OPENS = 64  # with the file size limit, bounds the disk a run can fill
INFINITY = float("inf")
MAX_TRACEBACK_CHARS = 2_000
MAX_VALUE_CHARS = 100_000
MAX_DEPTH = 50
SOLUTION_FILE = "solution.py"


class Unreportable(Exception):
    """The function returned something that has no plain JSON form."""


def main() -> None:
    own_dir = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != own_dir]
    payload = marshal.loads(sys.stdin.buffer.read())
    os.close(0)
    sys.stdin = None  # input() now raises instead of blocking
    config = payload["config"]
    for name in imported_modules(payload["code"]) & IMPORTABLE | set(config["preload"]):
        __import__(name)
    layers = isolate(config["uid"], config["gid"], config["result_fd"])
    limit_resources(config["limits"])
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


def isolate(uid: int | None, gid: int | None, result_fd: int) -> list[str]:
    """Enters namespaces and drops privileges (as root); returns the layers now active."""
    if uid is None or os.geteuid() != 0:
        return []
    layers = unshare()
    if "pidns" in layers:
        fork_into_pid_namespace(result_fd)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    try:  # paranoia: a drop that can be undone is no drop
        os.setuid(0)
    except PermissionError:
        return [*layers, "uid"]
    os._exit(70)


def unshare() -> list[str]:
    """Enters new network and PID namespaces, each where the kernel allows it."""
    layers = []
    for flag, layer in ((CLONE_NEWNET, "netns"), (CLONE_NEWPID, "pidns")):
        try:
            call_unshare(flag)
        except OSError:
            continue
        layers.append(layer)
    return layers


def call_unshare(flag: int) -> None:
    """`unshare(2)`: `os.unshare` on Python 3.12+, else through ctypes (removed again)."""
    if hasattr(os, "unshare"):
        os.unshare(flag)
        return
    import ctypes  # only here, as root, before any model code; removed again below

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(flag) != 0:
            raise OSError(ctypes.get_errno(), "unshare failed")
    finally:
        for name in [m for m in sys.modules if m.startswith(("ctypes", "_ctypes"))]:
            del sys.modules[name]


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
