"""`looprl envs check ID`: the contract every looprl environment keeps, checked on one id.

Runs Gymnasium's own checker, then what looprl adds to the contract: determinism under
a seed, replay of a partial history restoring the same state, robustness to malformed
and hostile actions, and an oracle that solves the tasks.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
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
            actions.append(f'<tool_call>{{"name": {name}, "arguments": {json.dumps(values[int(rng.integers(len(values)))])}}}</tool_call>')
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
    ]
    results = []
    for name, run in checks:
        try:
            results.append(CheckResult(name, True, run()))
        except Exception as e:  # a check's failure is a finding to report, not a crash
            results.append(CheckResult(name, False, f"{type(e).__name__}: {e}"[:500]))
    return results
