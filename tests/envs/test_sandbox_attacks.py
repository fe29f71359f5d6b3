"""Attacks on `looprl/Code-v0`'s sandbox, made as a model makes them, and their containment.

Each attack goes through `env.step` as a `run_tests` tool call whose code performs it (the
function returns what it achieved), and, where the OS layers alone must hold, through
`run_function(..., audit_hook=False)`: the audit hook runs in the attacker's interpreter,
so the jail, namespaces, uid and seccomp filter are what has to stop code that gets
around it. Where this machine lacks a layer (`isolation().missing`: no bubblewrap, no user
namespaces, not root), the assertion that needs it is skipped with the layer's name and
why, after the containment the remaining layers must give has been asserted. Runs get
generous time limits and nothing here compares durations: a busy machine only slows it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gymnasium
import pytest

import looprl.envs  # noqa: F401 — registers looprl/Code-v0
from looprl.envs import format_tool_call
from looprl.envs.sandbox import CHILD_SCRIPT, NOBODY_ID, SandboxLimits, isolation, run_function

TASK = 'code:sum_largest:{"k":4}:5'
LIMITS = SandboxLimits(timeout_s=20.0, max_processes=4)  # generous: a busy machine is slow
ISOLATION = isolation()
REPO = Path(__file__).resolve().parents[2]


def skip_without(layer: str, what: str) -> None:
    """Skips the rest of a test, naming the layer it needs, where this machine lacks it."""
    if layer in ISOLATION.missing:
        pytest.skip(f"{layer} layer not exercised ({what}): {ISOLATION.missing[layer]}")


def attack(body: str, timeout_s: float = 20.0) -> str:
    """What the agent sees after a `run_tests` call whose code performs `body` once.

    The attack runs when the code is loaded and prints what it achieved (the agent sees
    up to 1,000 characters of output); the function it defines is never reached or
    returns 0.
    """
    env = gymnasium.make("looprl/Code-v0", timeout_s=timeout_s).unwrapped
    env.reset(options={"task": TASK})
    code = (
        "def attack():\n" + textwrap.indent(textwrap.dedent(body), "    ")
        + "\nprint('attack:', attack())\n\ndef sum_largest(nums):\n    return 0\n"
    )
    obs, reward, terminated, truncated, _ = env.step(format_tool_call("run_tests", {"code": code}))
    assert (reward, terminated, truncated) == (0.0, False, False)
    return obs


def bare(body: str, limits: SandboxLimits = LIMITS, **kwargs):
    """`run_function` of a function performing `body` without the audit hook: the OS layers."""
    code = "def f():\n" + textwrap.indent(textwrap.dedent(body), "    ")
    return run_function(code, "f", [[]], limits, audit_hook=False, **kwargs)


def value(result) -> object:
    """What the attacking function returned (its traceback, if it raised)."""
    outcome = result.calls[0]
    assert outcome is not None, (result.problem, result.load_error, result.output)
    return outcome.error if outcome.error is not None else outcome.value


def descendants() -> list[int]:
    """Live (not zombie) processes descending from this test process."""
    parents, states = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry.name)], states[int(entry.name)] = int(fields[1]), fields[0]
    found, frontier = [], [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += [pid for pid in children if states[pid] != "Z"]
        frontier += children
    return found


def sandbox_processes() -> list[int]:
    """Live sandbox processes of this test process: its descendants, and any process
    (a daemon that left its parents) still running this test's child script."""
    pids = set(descendants())
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if CHILD_SCRIPT.encode() in argv and str(os.getpid()).encode() in argv and state != "Z":
            pids.add(int(entry.name))
    return sorted(pids)


def wait_for_no_sandbox_processes(grace_s: float = 30.0) -> list[int]:
    # A killed run can be listed a moment after it returns while the kernel tears it down;
    # dying is not escaping, and on a loaded machine that moment can be long.
    deadline = time.monotonic() + grace_s
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    return sandbox_processes()


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    assert wait_for_no_sandbox_processes() == []


@pytest.fixture
def planted_secret():
    """A world-readable (0644) file in a world-readable directory of the host's /tmp."""
    directory = Path(tempfile.mkdtemp(prefix="looprl-attack-"))
    directory.chmod(0o755)
    secret = "s3cret-" + secrets.token_hex(8)
    path = directory / "secret.txt"
    path.write_text(secret)
    path.chmod(0o644)
    yield path, secret
    path.unlink()
    directory.rmdir()


# --- the audit hook's own policy -------------------------------------------------------

REBIND_POLICY = """
import __main__, builtins
__main__.any = lambda *args: True
__main__.DENIED_IMPORTS = __main__.DENIED_EVENTS = frozenset()
__main__.DENIED_PREFIXES = ()
__main__.MAX_WRITE_OPENS = 10 ** 9
builtins.any = lambda *args: True
import os.path, posixpath
posixpath.realpath = os.path.realpath = lambda path, *a, **k: os.getcwd()
"""


def test_rebinding_the_hooks_policy_loosens_nothing(planted_secret):
    path, secret = planted_secret
    obs = attack(REBIND_POLICY + f"""
results = []
for name, action in [
    ("import socket", lambda: __import__("socket")),
    ("read", lambda: open({str(path)!r}).read()),
    ("system", lambda: os.system("true")),
    ("fork", lambda: os.fork()),
    ("many writes", lambda: [open(f"w{{i}}", "w").close() for i in range(100)]),
]:
    try:
        action()
        results.append(name + ": ESCAPED")
    except BaseException as error:
        results.append(name + ": " + str(error))
return " | ".join(results)
""")
    assert "ESCAPED" not in obs and secret not in obs
    for refusal in ("importing socket is not allowed", "is not allowed outside",
                    "os.system is not allowed", "os.fork is not allowed",
                    "at most 64 files may be opened for writing"):  # fmt: skip
        assert refusal in obs, obs


def test_the_hooks_frame_in_a_traceback_gives_nothing_to_rewrite(planted_secret):
    path, secret = planted_secret
    # A refused call's traceback holds the hook's frame; its locals are the policy.
    obs = attack(f"""
try:
    open({str(path)!r})
except PermissionError as error:
    trace = error.__traceback__
    while trace.tb_next is not None:
        trace = trace.tb_next
    policy = trace.tb_frame.f_locals
names = sorted(policy)
for key, item in list(policy.items()):
    if isinstance(item, (list, set, dict)):
        item.clear()
    policy[key] = None
try:
    return "ESCAPED " + open({str(path)!r}).read()
except BaseException as error:
    return "blocked: " + str(error) + " " + " ".join(names)[:80]
""")
    assert "ESCAPED" not in obs and secret not in obs
    assert "blocked: sandbox: reading" in obs, obs


# --- host files ----------------------------------------------------------------------------


def test_world_readable_host_files_stay_unread(planted_secret):
    path, secret = planted_secret
    own_source = REPO / "looprl" / "envs" / "code.py"
    passwd = Path("/etc/passwd").read_text()
    targets = [str(path), "/etc/passwd", "/etc/os-release", str(own_source)]
    body = f"""
out = []
for target in {targets!r}:
    try:
        out.append(open(target).read())
    except OSError as error:
        out.append(type(error).__name__ + ": " + str(error))
return out
"""
    obs = attack(body)
    assert secret not in obs and "root:x:0:0" not in obs and "def split_of" not in obs
    assert obs.count("PermissionError: sandbox: reading") == len(targets), obs
    skip_without("mountns", "host files with the audit hook bypassed")
    read = value(bare(body))
    assert all(line.startswith("FileNotFoundError") for line in read), read
    assert secret not in str(read) and passwd not in str(read)


def test_the_jail_root_holds_the_interpreter_and_nothing_else():
    skip_without("mountns", "the jail's root")
    seen = value(bare(f"""
import os, sys
return [sorted(os.listdir("/")), os.path.exists("/etc"), os.path.exists("/bin/sh"),
        os.path.exists({CHILD_SCRIPT!r}), os.listdir({os.path.dirname(CHILD_SCRIPT)!r}),
        os.path.exists(sys.executable), sorted(os.listdir("/tmp"))]
"""))
    top, etc, shell, child, child_dir, interpreter, tmp = seen
    assert not etc and not shell and child and interpreter
    assert child_dir == [os.path.basename(CHILD_SCRIPT)]  # not the project's other files
    assert not {"etc", "home", "var", "srv", "boot", "mnt"} & set(top), top
    assert len(tmp) == 1 and tmp[0].startswith("looprl-sandbox-")  # only its working directory


# --- writes that would outlive the run ------------------------------------------------


@pytest.mark.parametrize("place", ["/tmp", "/dev/shm"])
def test_writes_to_shared_places_are_gone_afterwards(place):
    token = secrets.token_hex(8)
    names = [f"{place}/looprl-attack-{token}-{i}" for i in range(200)]
    body = f"""
written = 0
for name in {names!r}:
    try:
        with open(name, "w") as handle:
            handle.write("x" * 1000)
        written += 1
    except OSError as error:
        return f"wrote {{written}}, then: {{error}}"
return f"wrote {{written}}"
"""
    try:
        obs = attack(body)
        assert "attack: wrote 0, then: sandbox: writing" in obs, obs
        assert not any(os.path.exists(name) for name in names)
        if "mountns" in ISOLATION.missing:  # then the run's own uid is how they get removed
            skip_without("uid-per-run", f"writes to {place} with the audit hook bypassed, "
                         f"and without a jail: {ISOLATION.missing['mountns']}")  # fmt: skip
        result = value(bare(body))
        assert result == "wrote 200", result  # the writes happened, in the jail (or on the host)
        assert not any(os.path.exists(name) for name in names)
    finally:
        for name in names:  # where a layer is missing, leave the host as it was
            if os.path.exists(name):
                os.unlink(name)


# --- programs --------------------------------------------------------------------------


def test_no_program_can_be_run(tmp_path):
    marker = Path(tempfile.gettempdir()) / f"looprl-attack-{secrets.token_hex(8)}"
    shell = f"echo ran > {marker}"
    body = f"""
import os, sys
out = []
for name, action in [
    ("system", lambda: os.system({shell!r})),
    ("popen", lambda: os.popen({shell!r}).read()),
    ("subprocess", lambda: __import__("subprocess").run(["/bin/sh", "-c", {shell!r}])),
    ("spawn", lambda: os.posix_spawn("/bin/sh", ["sh", "-c", {shell!r}], {{}})),
    ("execv", lambda: os.execv(sys.executable, [sys.executable, "-c", "print('EXECUTED')"])),
]:
    try:
        out.append(name + ": " + repr(action()))
    except BaseException as error:
        out.append(name + ": " + type(error).__name__ + " " + str(error))
return out
"""
    try:
        obs = attack(body)
        assert "EXECUTED" not in obs and not marker.exists()
        assert "os.system is not allowed" in obs, obs
        result = bare(body)
        assert "EXECUTED" not in result.output and not marker.exists()
        skip_without("seccomp", "execve refused by the kernel")
        out = value(result)
        assert any(line.startswith("execv: PermissionError") for line in out), out
        assert "Operation not permitted" in " ".join(out)
    finally:
        if marker.exists():
            marker.unlink()


# --- the network -----------------------------------------------------------------------


def test_no_connection_reaches_the_hosts_loopback():
    name = f"\0looprl-attack-{secrets.token_hex(8)}"  # an abstract unix socket
    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp, \
            socket.socket(socket.AF_UNIX) as unix:  # fmt: skip
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        tcp.setblocking(False)
        udp.bind(("127.0.0.1", 0))
        udp.setblocking(False)
        unix.bind(name)
        unix.listen()
        unix.setblocking(False)
        body = f"""
import socket
out = []
for family, kind, address in [
    (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", {tcp.getsockname()[1]})),
    (socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", {udp.getsockname()[1]})),
    (socket.AF_UNIX, socket.SOCK_STREAM, {name!r}),
]:
    try:
        with socket.socket(family, kind) as client:
            client.settimeout(2)
            client.connect(address)
            client.sendall(b"hi")
        out.append("ESCAPED")
    except OSError as error:
        out.append(str(error))
return out
"""
        obs = attack(body)
        assert "ESCAPED" not in obs and "importing socket is not allowed" in obs, obs
        result = bare(body, preload=("socket",))
        for listener in (tcp, unix):
            with pytest.raises(BlockingIOError):  # nothing connected to the host's loopback
                listener.accept()
        with pytest.raises(BlockingIOError):  # nothing arrived
            udp.recvfrom(16)
        skip_without("netns", "a network namespace")
        out = value(result)
        assert "ESCAPED" not in out and "Network is unreachable" in out[0], out


# --- resources -------------------------------------------------------------------------


def test_a_fork_bomb_is_contained():
    obs = attack("import os\nwhile True:\n    os.fork()\n")
    assert "os.fork is not allowed" in obs
    result = bare("import os\nwhile True:\n    os.fork()\n")
    assert result.calls[0] is not None and "Resource temporarily unavailable" in result.calls[0].error
    # The autouse fixture checks that no forked process is left.


def test_allocating_10_gb_is_contained():
    obs = attack("data = bytearray(10 * 2**30)\nreturn len(data)\n")
    assert "MemoryError" in obs
    assert value(bare("data = bytearray(10 * 2**30)\nreturn len(data)\n")).endswith("MemoryError")


def test_an_endless_loop_is_stopped():
    obs = attack("while True:\n    pass\n", timeout_s=1.0)
    assert "did not finish" in obs and "Timed out after 1 s" in obs
    result = bare("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert result.problem == "Timed out after 1 s" and result.calls == (None,)


def test_a_flood_of_output_is_cut():
    obs = attack("while True:\n    print('x' * 10_000)\n")
    assert "Output limit exceeded" in obs and len(obs) < 2_000
    result = bare("while True:\n    print('x' * 10_000)\n")
    assert result.problem.startswith("Output limit exceeded") and len(result.output) < 5_000


DAEMON = """
import os, time
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() == 0:  # the daemon: no parent, own session, tries to outlive the run
        while True:
            time.sleep(0.1)
    os._exit(0)
os.waitpid(first, 0)
return "daemon started"
"""


def test_a_double_forked_daemon_dies_with_the_run():
    assert "os.fork is not allowed" in attack(DAEMON)
    started = value(bare(DAEMON))
    if "uid-per-run" in ISOLATION.missing and "Resource temporarily unavailable" in started:
        pytest.skip("uid-per-run layer missing: other runs' processes, all under one uid, "
                    "used up RLIMIT_NPROC before the daemon could fork")  # fmt: skip
    assert started == "daemon started", started
    if "pidns" in ISOLATION.missing:  # the daemon left the run's session: end it here
        for pid in wait_for_no_sandbox_processes(grace_s=1.0):
            os.kill(pid, signal.SIGKILL)
    skip_without("pidns", "a daemon outliving the run")
    assert wait_for_no_sandbox_processes() == []


# --- the host's processes ------------------------------------------------------------------


def test_the_hosts_proc_is_not_visible():
    host = Path("/proc/1/cmdline").read_bytes().decode(errors="replace")
    body = """
import os
return [open("/proc/1/cmdline").read(), sorted(p for p in os.listdir("/proc") if p.isdigit())]
"""
    obs = attack(body)
    assert "sandbox: reading '/proc/1/cmdline'" in obs and host not in obs, obs
    skip_without("mountns", "a /proc of the run's own")
    cmdline, pids = value(bare(body))
    assert cmdline != host and str(os.getpid()) not in pids and len(pids) <= 4, (cmdline, pids)


def test_signals_to_the_trainer_do_not_arrive():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        targets = [os.getpid(), os.getppid(), bystander.pid]
        body = f"""
import os
out = []
for target in {targets!r} + [os.getppid(), -1]:
    try:
        os.kill(target, 9)  # SIGKILL (without a jail, `signal` may not be importable)
        out.append(f"{{target}}: sent")
    except OSError as error:
        out.append(f"{{target}}: {{error}}")
return out
"""
        obs = attack(body)
        assert "os.kill is not allowed" in obs and bystander.poll() is None
        if not {"seccomp", "pidns", "uid"} - set(ISOLATION.missing):
            pytest.skip("seccomp, pidns and uid layers all missing: only the audit hook "
                        "keeps the code from killing this test's processes")  # fmt: skip
        out = value(bare(body))
        assert bystander.poll() is None, out  # and this test is still running
        skip_without("seccomp", "kill refused by the kernel")
        assert all(line.endswith("Operation not permitted") for line in out), out
    finally:
        bystander.kill()
        bystander.wait()


# --- users -----------------------------------------------------------------------------


def test_concurrent_runs_have_uids_of_their_own():
    body = "import os, time\ntime.sleep(3)\nreturn [os.getuid(), os.getgid(), os.getgroups()]\n"
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(bare, body) for _ in range(2)]
        host_uids: set[int] = set()
        while not all(run.done() for run in runs) and len(host_uids) < 2:
            for pid in sandbox_processes():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                uid = int(status.split("\nUid:")[1].split()[0])
                if CHILD_SCRIPT.encode() in argv and uid not in (0, os.getuid()):
                    host_uids.add(uid)
            time.sleep(0.05)
        seen = [value(run.result()) for run in runs]
    skip_without("uid", "a uid other than the caller's")
    skip_without("userns", "the code sees nobody inside its user namespace")
    assert seen == [[NOBODY_ID, NOBODY_ID, []]] * 2
    skip_without("uid-per-run", "a uid no other run shares")
    assert len(host_uids) == 2 and NOBODY_ID not in host_uids, host_uids
