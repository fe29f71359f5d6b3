"""`looprl envs check ID`: the contract every looprl environment keeps, checked on one id.

Runs Gymnasium's own checker, then what looprl adds to the contract: determinism under
a seed, replay of a partial history restoring the same state, robustness to malformed
and hostile actions, and an oracle that solves the tasks. An env with a `run_tests` tool
that takes `code` (looprl/Code-v0) also gets attacks on its sandbox, made as a model
makes them, each checked on the host: the attack must achieve nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gymnasium
import numpy as np
from gymnasium.utils.env_checker import check_env

from looprl.envs.parsing import format_tool_call


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str


def hostile_actions(rng: np.random.Generator, tool_names: list[str], n: int) -> list[str]:
    """Malformed or hostile actions: bad JSON, unknown tools, wrong types, huge strings."""
    fragments = ["<tool_call>", "</tool_call>", '{"name": ', '"arguments": ', "{", "}", "[", "null",
                 '"', "\\", "\x00", "\ud800", "é漢🙂", "1e999", "-1", "NaN", "' OR 1=1; DROP TABLE x; --"]
    names = tool_names + ["nope", "", "__import__", "a" * 300]
    values: list[Any] = [None, True, -1, 2**70, 1e308, "x" * 10_000, [], {}, {"a": [1, {"b": None}]}, "../../etc/passwd"]
    actions = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # fragments glued at random
            actions.append("".join(rng.choice(fragments) for _ in range(int(rng.integers(1, 12)))))
        elif kind == 1:  # a well-formed call with hostile values
            args = {str(rng.choice(["expression", "value", "x", "sql", "code", "text"])): values[int(rng.integers(len(values)))]}
            actions.append(format_tool_call(str(rng.choice(names)), args))
        elif kind == 2:  # arguments of the wrong shape
            name = json.dumps(str(rng.choice(names)))
            arguments = json.dumps(values[int(rng.integers(len(values)))])
            actions.append(f'<tool_call>{{"name": {name}, "arguments": {arguments}}}</tool_call>')
        else:  # huge or empty text
            actions.append("" if rng.random() < 0.3 else "<tool_call>" * int(rng.integers(1, 50_000)))
    return actions


def _episode(env, seed: int, actions: list[str]) -> list:
    results: list = [env.reset(seed=seed)]
    for action in actions:
        results.append(env.step(action))
        if results[-1][2] or results[-1][3]:
            break
    return results


def _check_gymnasium(make: Callable[[], gymnasium.Env]) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(make().unwrapped, skip_render_check=True)
    if caught:
        raise AssertionError("; ".join(str(w.message) for w in caught))
    return "no warnings"


def _check_determinism(make: Callable[[], gymnasium.Env]) -> str:
    env = make().unwrapped
    env.reset(seed=11)
    actions = ["no call", format_tool_call("nope", {}), env.oracle_action()]
    if _episode(make().unwrapped, 11, actions) != _episode(make().unwrapped, 11, actions):
        raise AssertionError("same seed and actions gave different results")
    return "same seed + actions -> same results"


def _check_replay(make: Callable[[], gymnasium.Env]) -> str:
    probe = make().unwrapped  # find a history that leaves the episode running
    probe.reset(seed=5)
    history = ["junk"]
    probe.step("junk")
    for _ in range(2):
        action = probe.oracle_action()
        if any(probe.step(action)[2:4]):
            break
        history.append(action)
    stepped, replayed = make().unwrapped, make().unwrapped
    stepped.reset(seed=5)
    last = [stepped.step(action) for action in history][-1]
    obs, _ = replayed.reset(seed=5, options={"history": history})
    if obs != last[0] or replayed.oracle_action() != stepped.oracle_action():
        raise AssertionError(f"replaying {len(history)} actions did not restore the stepped state")
    return f"{len(history)}-action history restores the state"


def _check_hostile(make: Callable[[], gymnasium.Env], n: int) -> str:
    env = make().unwrapped
    env.reset(seed=0)
    actions = hostile_actions(np.random.default_rng(0), [t.name for t in env.tools], n)
    for i, action in enumerate(actions):
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset(seed=i)
    return f"{n} malformed/hostile actions, none raised"


def _wins(make: Callable[[], gymnasium.Env], episodes: int, policy: Callable[[Any], str]) -> int:
    """How many of `episodes` seeded tasks `policy(env)` solves."""
    env = make().unwrapped
    wins = 0
    for seed in range(episodes):
        env.reset(seed=seed)
        done, info = False, {}
        while not done:
            _, _, terminated, truncated, info = env.step(policy(env))
            done = terminated or truncated
        wins += bool(info.get("success"))
    return wins


def _check_oracle(make: Callable[[], gymnasium.Env], episodes: int) -> str:
    rate = _wins(make, episodes, lambda env: env.oracle_action()) / episodes
    if rate < 0.99:
        raise AssertionError(f"oracle solved {rate:.1%} of {episodes} tasks (expected >= 99%)")
    return f"oracle solved {rate:.1%} of {episodes} tasks"


def _check_empty_policy(make: Callable[[], gymnasium.Env], episodes: int) -> str:
    wins = _wins(make, episodes, lambda env: "")
    if wins:
        raise AssertionError(f"an empty policy solved {wins} of {episodes} tasks")
    return f"an empty policy solved 0 of {episodes} tasks"


def _run_tests(make: Callable[[], gymnasium.Env], code: str) -> str:
    """What the agent sees after `run_tests(code)` in a fresh episode."""
    env = make().unwrapped
    env.reset(seed=0)
    return str(env.step(format_tool_call("run_tests", {"code": code}))[0])


def _attack(*body: str) -> str:
    """Code that runs `body` once, on load, then each step, printing how each ended.

    `body` (its parts dedented one by one) defines `steps`, (name, callable) pairs; a
    step that returns is marked ESCAPED.
    """
    return "".join(textwrap.dedent(part) for part in body) + textwrap.dedent("""
        for name, step in steps:
            try:
                step()
                print(name, "ESCAPED")
            except BaseException as error:
                print(name, "blocked:", type(error).__name__, str(error)[:60])
        """)


# Rebinds every name the audit hook of old looked up at call time.
_REBIND_POLICY = """
    import __main__, builtins, os, posixpath
    __main__.any = builtins.any = lambda *args: True
    __main__.DENIED_IMPORTS = __main__.DENIED_EVENTS = frozenset()
    __main__.DENIED_PREFIXES = ()
    __main__.MAX_WRITE_OPENS = 10 ** 9
    posixpath.realpath = os.path.realpath = lambda path, *a, **k: os.getcwd()
"""


def _contained(obs: str, steps: int, *leaks: str) -> str:
    if "ESCAPED" in obs or any(leak in obs for leak in leaks):
        raise AssertionError(f"an attack got through: {obs[-400:]}")
    if obs.count("blocked:") < steps:  # the attack did not run as written: no evidence
        raise AssertionError(f"the attack did not run: {obs[-400:]}")
    return f"{steps} of {steps} attempts blocked"


def _check_hook_policy(make: Callable[[], gymnasium.Env]) -> str:
    code = _attack(_REBIND_POLICY, """
        steps = [("import socket", lambda: __import__("socket")),
                 ("read /etc/passwd", lambda: open("/etc/passwd").read()),
                 ("os.system", lambda: os.system("true")),
                 ("os.fork", lambda: os.fork())]
        """)  # fmt: skip
    return "after rebinding the hook's policy: " + _contained(_run_tests(make, code), 4, "root:x:0:0")


def _check_host_files(make: Callable[[], gymnasium.Env]) -> str:
    with tempfile.TemporaryDirectory(prefix="looprl-check-") as directory:
        os.chmod(directory, 0o755)  # world-readable, as the host's files often are
        secret = "s3cret-" + secrets.token_hex(8)
        planted = Path(directory, "secret.txt")
        planted.write_text(secret)
        planted.chmod(0o644)
        own_source = Path(__file__).resolve()
        paths = [str(planted), "/etc/passwd", str(own_source), "/proc/1/cmdline"]
        code = _attack(f"steps = [(p, lambda p=p: open(p).read()) for p in {paths!r}]")
        obs = _run_tests(make, code)
        host_cmdline = Path("/proc/1/cmdline").read_text(errors="replace")[:40] or "\0"
        return _contained(obs, len(paths), secret, "root:x:0:0", "_check_host_files", host_cmdline)


def _check_host_writes(make: Callable[[], gymnasium.Env]) -> str:
    names = [f"{place}/looprl-check-{secrets.token_hex(8)}" for place in ("/tmp", "/dev/shm")]
    code = _attack(f"steps = [(n, lambda n=n: open(n, 'w').write('x')) for n in {names!r}]")
    try:
        detail = _contained(_run_tests(make, code), len(names))
        left = [name for name in names if os.path.exists(name)]
        if left:
            raise AssertionError(f"the sandbox wrote {left} on the host")
        return detail + ", nothing left in /tmp or /dev/shm"
    finally:
        for name in names:
            if os.path.exists(name):
                os.unlink(name)


def _check_programs(make: Callable[[], gymnasium.Env]) -> str:
    marker = Path(tempfile.gettempdir(), f"looprl-check-{secrets.token_hex(8)}")
    shell = f"echo ran > {marker}"
    code = _attack(f"""
        import os, sys
        steps = [("os.system", lambda: os.system({shell!r})),
                 ("subprocess", lambda: __import__("subprocess").run(["sh", "-c", {shell!r}])),
                 ("os.execv", lambda: os.execv(sys.executable, [sys.executable, "-c", "1"]))]
        """)  # fmt: skip
    try:
        detail = _contained(_run_tests(make, code), 3)
        if marker.exists():
            raise AssertionError("a program the sandbox started wrote on the host")
        return detail
    finally:
        if marker.exists():
            marker.unlink()


def _check_network(make: Callable[[], gymnasium.Env]) -> str:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        connect = f"__import__('socket').create_connection(('127.0.0.1', {port}), 2)"
        code = _attack(f"steps = [('connect', lambda: {connect})]")
        detail = _contained(_run_tests(make, code), 1)
        try:
            listener.accept()
        except BlockingIOError:
            return detail + ", nothing reached a loopback listener"
        raise AssertionError("the sandbox connected to a loopback listener on the host")


def _check_signals(make: Callable[[], gymnasium.Env]) -> str:
    code = _attack(f"""
        import os
        steps = [(str(pid), lambda pid=pid: os.kill(pid, 9))  # SIGKILL
                 for pid in ({os.getpid()}, os.getppid(), -1)]
        """)  # fmt: skip
    return _contained(_run_tests(make, code), 3) + " (this process is still alive)"


def _check_sandbox_layers() -> str:
    from looprl.envs.sandbox import isolation

    found = isolation()
    text = "layers: " + ", ".join(sorted(found.layers))
    if found.missing:
        text += "; missing: " + "; ".join(f"{k} ({why})" for k, why in found.missing.items())
    return text


def _sandbox_checks(make: Callable[[], gymnasium.Env]) -> list[tuple[str, Callable[[], str]]]:
    """The sandbox attacks, for an env whose `run_tests` tool takes `code`; else none."""
    schemas = make().unwrapped.reset(seed=0)[1]["tools"]
    if not any(s["function"]["name"] == "run_tests"
               and "code" in s["function"]["parameters"].get("properties", {})
               for s in schemas):  # fmt: skip
        return []
    return [
        ("sandbox layers", _check_sandbox_layers),
        ("sandbox: hook policy", lambda: _check_hook_policy(make)),
        ("sandbox: host files", lambda: _check_host_files(make)),
        ("sandbox: host writes", lambda: _check_host_writes(make)),
        ("sandbox: programs", lambda: _check_programs(make)),
        ("sandbox: network", lambda: _check_network(make)),
        ("sandbox: signals", lambda: _check_signals(make)),
    ]


def check(env_id: str, *, episodes: int = 100, hostile: int = 1000, **kwargs: Any) -> list[CheckResult]:
    """Run every check on `env_id` (built with `kwargs`); a failing check does not stop the others."""
    from looprl.envs import make_env

    make_env(env_id, **kwargs).close()  # an unknown id or bad kwargs is an error, not a failed check

    def make() -> gymnasium.Env:
        return gymnasium.make(env_id, disable_env_checker=True, **kwargs)

    checks: list[tuple[str, Callable[[], str]]] = [
        ("gymnasium checker", lambda: _check_gymnasium(make)),
        ("determinism", lambda: _check_determinism(make)),
        ("replay", lambda: _check_replay(make)),
        ("hostile actions", lambda: _check_hostile(make, hostile)),
        ("oracle", lambda: _check_oracle(make, episodes)),
        ("empty policy", lambda: _check_empty_policy(make, min(episodes, 50))),
        *_sandbox_checks(make),
    ]
    results = []
    for name, run in checks:
        try:
            results.append(CheckResult(name, True, run()))
        except Exception as e:  # a check's failure is a finding to report, not a crash
            results.append(CheckResult(name, False, f"{type(e).__name__}: {e}"[:500]))
    return results
