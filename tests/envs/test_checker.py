"""Gymnasium's env checker and the contract every registered `looprl/` env keeps."""

from __future__ import annotations

import string
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from looprl.envs import env_ids, format_tool_call, list_envs, make_env, run_oracle

ENV_IDS = env_ids()
# Code-v0 runs each solution in a sandbox with a wall-clock limit (2 s by default, the
# interpreter's start included): a busy machine must not fail the oracle, so it gets 60 s.
ORACLE_CASES = [(env_id, {"timeout_s": 60.0} if env_id == "looprl/Code-v0" else {}) for env_id in ENV_IDS] + [
    ("looprl/Calc-v0", {"split": "test"})]


def test_registry_holds_calc():
    assert "looprl/Calc-v0" in ENV_IDS


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_env_checker(env_id):
    env = gymnasium.make(env_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=True)
    # The checker reports problems as warnings too: there should be none.
    assert [str(w.message) for w in caught] == []


def rollout(env, seed, actions):
    """Every value `reset` and `step` return, for `actions` from a seeded reset."""
    results = [env.reset(seed=seed)]
    for action in actions:
        results.append(env.step(action))
    return results


def mixed_actions(env):
    """A non-oracle, non-trivial action sequence: junk, a bad call, then the oracle."""
    env.reset(seed=7)
    return ["no call here", format_tool_call("nope", {"x": 1}), env.unwrapped.oracle_action()]


def oracle_ends_at_once(env_id, seed):
    """Whether the oracle's first action ends the episode, as in a single-answer env.

    Such an env (looprl/Dataset-v0) has no unfinished state after that action to replay.
    """
    env = gymnasium.make(env_id).unwrapped
    env.reset(seed=seed)
    return env.step(env.oracle_action())[2]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_same_seed_and_actions_give_same_results(env_id):
    actions = mixed_actions(gymnasium.make(env_id))
    first = rollout(gymnasium.make(env_id).unwrapped, 7, actions)
    second = rollout(gymnasium.make(env_id).unwrapped, 7, actions)
    assert first == second


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_different_seeds_give_different_tasks(env_id):
    env = gymnasium.make(env_id).unwrapped
    task_ids = {env.reset(seed=seed)[1]["task_id"] for seed in range(20)}
    assert len(task_ids) > 1


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_reset_returns_the_task_and_the_contract_info(env_id):
    obs, info = gymnasium.make(env_id).unwrapped.reset(seed=0)
    assert set(info) == {"messages", "tools", "task_id", "turn", "replayed"}
    assert [m["role"] for m in info["messages"]] == ["system", "user"]
    assert info["messages"][1]["content"] == obs and (info["turn"], info["replayed"]) == (0, 0)
    assert all(schema["type"] == "function" for schema in info["tools"])


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("num_replayed", [1, 2, 3])
def test_replay_restores_the_state_reached_by_stepping(env_id, num_replayed):
    if num_replayed == 3 and oracle_ends_at_once(env_id, seed=7):
        pytest.skip("the oracle's first action ends the episode: nothing to replay after it")
    stepped = gymnasium.make(env_id).unwrapped
    history = mixed_actions(stepped)[:num_replayed]  # the 3rd action changes the task state
    _, reset_info = stepped.reset(seed=7)
    messages = list(reset_info["messages"])
    for action in history:
        obs, _, _, _, info = stepped.step(action)
        messages += [{"role": "assistant", "content": action}, *info["messages"]]

    replayed = gymnasium.make(env_id).unwrapped
    replay_obs, replay_info = replayed.reset(seed=7, options={"history": history})

    assert replay_obs == obs
    assert replay_info["messages"] == messages
    assert replay_info["replayed"] == len(history) and replay_info["turn"] == len(history)
    assert replay_info["task_id"] == reset_info["task_id"]
    while True:  # the oracle carries on identically from both states
        assert replayed.oracle_action() == stepped.oracle_action()
        a, b = replayed.step(replayed.oracle_action()), stepped.step(stepped.oracle_action())
        assert a == b
        if a[2] or a[3]:
            break
    assert a[1] == 1.0


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_replay_from_a_task_id_needs_no_seed(env_id):
    env = gymnasium.make(env_id).unwrapped
    _, info = env.reset(seed=3)
    # A single-answer env's first oracle action ends the episode; replay a junk turn there.
    first_action = "no call here" if oracle_ends_at_once(env_id, seed=3) else env.oracle_action()
    expected = env.step(first_action)[0]

    obs, replay_info = env.reset(options={"task": info["task_id"], "history": [first_action]})
    assert (obs, replay_info["task_id"]) == (expected, info["task_id"])


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_reset_options_are_checked(env_id):
    env = gymnasium.make(env_id).unwrapped
    with pytest.raises(
        ValueError, match=r"Unknown reset option 'histroy'; allowed options: history, task"
    ):
        env.reset(seed=0, options={"histroy": []})
    with pytest.raises(ValueError, match=r"options\['history'\] to be a list of str"):
        env.reset(seed=0, options={"history": "one action"})
    env.reset(seed=0)
    whole_episode = run_oracle(env_id, seed=0)
    with pytest.raises(ValueError, match="ends the episode after"):
        env.reset(seed=0, options={"history": whole_episode})


@pytest.mark.parametrize(("env_id", "kwargs"), ORACLE_CASES)
def test_oracle_solves_every_task(env_id, kwargs):
    env = gymnasium.make(env_id, **kwargs).unwrapped
    for seed in range(500):
        env.reset(seed=seed)
        total, terminated, truncated = 0.0, False, False
        while not (terminated or truncated):
            _, reward, terminated, truncated, info = env.step(env.oracle_action())
            total += reward
        assert terminated and info["success"] and total == 1.0, env.task.task_id


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_text_without_tool_calls_solves_nothing(env_id):
    env = gymnasium.make(env_id).unwrapped
    rng = np.random.default_rng(0)
    for seed in range(100):
        env.reset(seed=seed)
        total, terminated, truncated = 0.0, False, False
        while not (terminated or truncated):
            length = int(rng.integers(0, 60))
            action = "".join(rng.choice(list(string.printable), size=length)) if seed % 2 else ""
            _, reward, terminated, truncated, info = env.step(action)
            total += reward
        assert truncated and not terminated and total == 0.0 and not info["success"]


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_run_oracle_returns_a_winning_episode(env_id):
    actions = run_oracle(env_id, seed=1)
    env = gymnasium.make(env_id).unwrapped
    rewards = [r for _, r, *_ in rollout(env, 1, actions)[1:]]
    assert sum(rewards) == 1.0


def test_list_envs_describes_every_env():
    described = {d["id"]: d for d in list_envs()}
    assert sorted(described) == ENV_IDS
    assert described["looprl/Calc-v0"]["tools"] == [
        {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        },
        {"name": "answer", "description": "Submit the final answer. This ends the episode."},
    ]
    for entry in described.values():
        assert entry["description"] and entry["reward"] and "\n" not in entry["description"]


def test_make_env_names_an_unknown_id():
    with pytest.raises(
        ValueError, match=r"Unknown environment id 'looprl/Calk-v0'.*looprl/Calc-v0"
    ):
        make_env("looprl/Calk-v0")


def test_make_env_imports_the_module_of_a_module_colon_id(tmp_path, monkeypatch):
    """`module:EnvId` registers a user's environment wherever it is made (a Ray actor too)."""
    (tmp_path / "user_envs_for_looprl.py").write_text(
        "import gymnasium\n"
        "gymnasium.register(id='user/Calc2-v0', entry_point='looprl.envs.calc:CalcEnv', kwargs={'max_turns': 2})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "user/Calc2-v0" not in gymnasium.registry
    env = make_env("user_envs_for_looprl:user/Calc2-v0")
    assert env.unwrapped.max_turns == 2
    with pytest.raises(ValueError, match=r"Environment module 'no_such_module_xyz' .*cannot be imported"):
        make_env("no_such_module_xyz:user/Calc2-v0")
    with pytest.raises(ValueError, match=r"Unknown environment id 'user/Nope-v0'"):
        make_env("user_envs_for_looprl:user/Nope-v0")
    gymnasium.registry.pop("user/Calc2-v0")


def test_make_env_builds_a_registered_id():
    env = make_env("looprl/Calc-v0", max_turns=2)
    assert env.unwrapped.max_turns == 2


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_looprl_env_checker_passes(env_id):
    from looprl.envs.checker import check

    results = check(env_id, episodes=20, hostile=300)
    assert [r.name for r in results if not r.ok] == [], results


def test_looprl_env_checker_reports_a_broken_env(monkeypatch):
    from looprl.envs.calc import CalcEnv
    from looprl.envs.checker import check

    monkeypatch.setattr(CalcEnv, "oracle_action", lambda self: "I give up")
    failed = {r.name: r.detail for r in check("looprl/Calc-v0", episodes=10, hostile=10) if not r.ok}
    assert "oracle" in failed and "solved 0.0% of 10" in failed["oracle"]
