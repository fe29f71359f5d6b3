"""`looprl/Hanoi-v0`: moves, illegal moves, rewards, window, split, oracle, long episodes."""

from __future__ import annotations

import copy
import json
import time
import tracemalloc

import gymnasium
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import looprl.envs  # noqa: F401 — registers looprl/Hanoi-v0
from looprl.envs import format_tool_call
from looprl.envs.hanoi import (
    HanoiEnv,
    format_pegs,
    next_optimal_move,
    optimal_distance,
    split_of,
)


def make(**kwargs) -> HanoiEnv:
    return gymnasium.make("looprl/Hanoi-v0", **kwargs).unwrapped


def started(task_id="hanoi:000:2", **kwargs) -> HanoiEnv:
    env = make(**kwargs)
    env.reset(options={"task": task_id})
    return env


def move(from_peg, to_peg) -> str:
    return format_tool_call("move", {"from_peg": from_peg, "to_peg": to_peg})


def play_oracle(env) -> tuple[int, float, dict]:
    """Plays the oracle to the end: (turns, total reward, last info)."""
    turns, total, done = 0, 0.0, False
    while not done:
        _, reward, terminated, truncated, info = env.step(env.oracle_action())
        turns, total, done = turns + 1, total + reward, terminated or truncated
    return turns, total, info


# --- moves ---------------------------------------------------------------------------


def test_prompt_shows_the_pegs_and_the_target():
    obs, info = make(start="standard").reset(seed=0)
    assert obs == (
        "Towers of Hanoi with 3 disks, numbered 1 (smallest) to 3, on pegs 0, 1 and 2.\n"
        "Pegs (bottom to top): 0:[3 2 1] 1:[] 2:[]\n"
        "Move every disk to peg 2, one at a time with move(from_peg, to_peg), which moves "
        "the top disk of from_peg; never put a disk on a smaller one."
    )
    assert info["task_id"] == "hanoi:000:2"
    assert info["tools"][0]["function"]["parameters"]["required"] == ["from_peg", "to_peg"]


def test_a_legal_move_reports_the_new_pegs():
    obs, reward, terminated, truncated, _ = started().step(move(0, 2))
    assert obs == "Moved disk 1 from peg 0 to peg 2. Pegs: 0:[3 2] 1:[] 2:[1]"
    assert (reward, terminated, truncated) == (0.0, False, False)


@pytest.mark.parametrize(
    ("moves", "message"),
    [
        ([(1, 2)], "Error: peg 1 is empty; there is no disk to move. Pegs: 0:[3 2 1] 1:[] 2:[]"),
        (
            [(0, 2), (0, 2)],
            "Error: disk 2 cannot go on disk 1, which is smaller; a disk goes only on a "
            "larger disk or an empty peg. Pegs: 0:[3 2] 1:[] 2:[1]",
        ),
        ([(0, 0)], "Error: from_peg and to_peg are both 0; move to another peg."),
        ([(3, 1)], "Error: pegs are numbered 0, 1 and 2; got from_peg=3."),
        ([(0, -1)], "Error: pegs are numbered 0, 1 and 2; got to_peg=-1."),
        ([(0, 10**30)], "Error: pegs are numbered 0, 1 and 2; got to_peg=100000000...."),
    ],
)
def test_illegal_moves_are_reported_and_change_nothing(moves, message):
    env = started()
    for from_peg, to_peg in moves[:-1]:
        env.step(move(from_peg, to_peg))
    before = copy.deepcopy(env._pegs)
    obs, reward, terminated, _, info = env.step(move(*moves[-1]))
    assert obs.startswith(message) and info["errors"] == 1
    assert (env._pegs, reward, terminated) == (before, 0.0, False)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"from_peg": "0", "to_peg": 2}, 'argument "from_peg" of move must be integer'),
        ({"from_peg": 0.0, "to_peg": 2}, 'argument "from_peg" of move must be integer'),
        ({"from_peg": True, "to_peg": 2}, 'argument "from_peg" of move must be integer'),
        ({"from_peg": 0}, 'move is missing required argument "to_peg"'),
        ({"from_peg": 0, "to_peg": 2, "disk": 1}, 'move got unknown argument "disk"'),
    ],
)
def test_bad_arguments_are_errors(arguments, message):
    env = started()
    obs = env.step(format_tool_call("move", arguments))[0]
    assert obs.startswith("Error: " + message) and env._pegs == [[3, 2, 1], [], []]


def test_several_moves_in_one_turn_run_in_order_each_reported():
    env = started(task_id="hanoi:00:2", num_disks=2)
    obs, reward, terminated, _, info = env.step(move(0, 1) + move(1, 1) + move(0, 2) + move(1, 2))
    assert [m["content"] for m in info["messages"]] == [
        "Moved disk 1 from peg 0 to peg 1. Pegs: 0:[2] 1:[1] 2:[]",
        "Error: from_peg and to_peg are both 1; move to another peg. Pegs: 0:[2] 1:[1] 2:[]",
        "Moved disk 2 from peg 0 to peg 2. Pegs: 0:[] 1:[1] 2:[2]",
        "Moved disk 1 from peg 1 to peg 2. Pegs: 0:[] 1:[] 2:[2 1]. Solved in 3 moves.",
    ]
    assert (reward, terminated, info["success"], info["turn"]) == (1.0, True, True, 1)


def test_moves_after_the_solve_in_the_same_turn_are_not_run():
    env = started(task_id="hanoi:1:2", num_disks=1)
    obs, reward, terminated, *_ = env.step(move(1, 2) + move(2, 0))
    assert obs.endswith("Error: not run: the episode ended at an earlier call this turn.")
    assert (reward, terminated, env._pegs) == (1.0, True, [[], [], [1]])


def test_episode_truncates_after_max_turns_and_default_is_twice_the_classic_length():
    assert make(num_disks=4).max_turns == 2 * 15 + 10 and make(max_turns=7).max_turns == 7
    env = started(max_turns=2)
    assert env.step(move(0, 1))[3] is False
    _, reward, terminated, truncated, info = env.step(move(1, 0))
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, True, False)


# --- rewards -------------------------------------------------------------------------


def test_sparse_reward_is_one_only_at_the_solve():
    rewards = []
    env = started()
    while not env._terminated:
        rewards.append(env.step(env.oracle_action())[1])
    assert rewards == [0.0] * 6 + [1.0]


def test_progress_reward_is_the_change_in_placed_disks_over_the_number_of_disks():
    env = started(reward_shaping="progress")
    rewards = []
    while not env._terminated:
        rewards.append(env.step(env.oracle_action())[1])
    # disk 3 lands on peg 2 at move 4, disk 2 at move 6, disk 1 at move 7
    assert rewards == [0.0, 0.0, 0.0, 1 / 3, 0.0, 1 / 3, 1 / 3]
    assert sum(rewards) == pytest.approx(1.0)


def test_progress_reward_takes_back_what_undoing_a_placement_earned():
    env = started(reward_shaping="progress")
    for _ in range(6):  # the oracle places disks 3 and 2 on peg 2
        env.step(env.oracle_action())
    assert env._pegs == [[1], [], [3, 2]]
    assert env.step(move(2, 1))[1] == -1 / 3  # disk 2 taken off
    assert env.step(move(0, 2))[1] == 0.0  # disk 1 onto disk 3: not its final place
    assert env.step(move(2, 0))[1] == 0.0
    assert env.step(move(1, 2))[1] == 1 / 3  # disk 2 back
    obs, reward, terminated, *_ = env.step(move(0, 2))
    assert (reward, terminated) == (1 / 3, True) and obs.endswith("Solved in 11 moves.")


@pytest.mark.parametrize("seed", range(20))
def test_progress_rewards_sum_to_one_from_any_random_start(seed):
    env = make(num_disks=5, reward_shaping="progress")
    env.reset(seed=seed)
    _, total, info = play_oracle(env)
    assert info["success"] and total == pytest.approx(1.0)


# --- oracle --------------------------------------------------------------------------


def test_next_optimal_move_and_distance():
    assert next_optimal_move([0, 0, 0], 2) == (0, 2) and next_optimal_move([2, 2, 2], 2) is None
    assert optimal_distance([0] * 10, 2) == 1023 and optimal_distance([1, 0, 0], 2) == 7
    assert optimal_distance([2, 0, 0], 2) == 6 and next_optimal_move([2, 0, 0], 2) == (0, 1)


@pytest.mark.parametrize("num_disks", [3, 6])
@pytest.mark.parametrize("split", ["train", "test"])
def test_oracle_solves_500_tasks_optimally_in_both_splits(split, num_disks):
    env = make(num_disks=num_disks, split=split)
    for seed in range(500):
        env.reset(seed=seed)
        shortest = optimal_distance(env.task.positions, env.task.target)
        turns, total, info = play_oracle(env)
        assert (turns, total, info["success"]) == (shortest, 1.0, True), env.task.task_id


def test_oracle_recovers_after_a_replayed_detour():
    env = make()
    detour = [move(0, 1), move(1, 0), move(0, 1), move(2, 2), "junk"]
    env.reset(options={"task": "hanoi:000:2", "history": detour})
    assert env._pegs == [[3, 2], [1], []]
    turns, total, info = play_oracle(env)
    assert (turns, total, info["success"]) == (optimal_distance([1, 0, 0], 2), 1.0, True)


@pytest.mark.parametrize("policy", ["empty", "random moves"])
def test_an_empty_or_random_policy_solves_next_to_nothing(policy):
    env = make(num_disks=4)
    rng = np.random.default_rng(0)
    solved = 0
    for seed in range(50):
        env.reset(seed=seed)
        done, info = False, {}
        while not done:
            pegs = rng.integers(0, 3, size=2)
            action = "" if policy == "empty" else move(int(pegs[0]), int(pegs[1]))
            _, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
        solved += info["success"]
    assert solved == 0  # measured for random moves: 0 of 200 episodes


# --- window --------------------------------------------------------------------------


def test_window_appends_recent_moves_and_the_pegs_to_each_observation():
    env = started(window=2)
    obs = env.step("thinking...")[0]
    assert obs.endswith(
        "Recent moves (last 0 of 0): none yet\nNow: 0:[3 2 1] 1:[] 2:[]; target peg 2."
    )
    env.step(move(0, 2))
    env.step(move(0, 2))  # illegal: disk 2 onto disk 1
    obs, *_, info = env.step(move(0, 1) + move(7, 1))
    assert obs.split("\n") == [
        "Moved disk 2 from peg 0 to peg 1. Pegs: 0:[3] 1:[2] 2:[1]",
        "Error: pegs are numbered 0, 1 and 2; got from_peg=7. Pegs: 0:[3] 1:[2] 2:[1]",
        "Recent moves (last 2 of 4): #3 0->1 | #4 ?->1 illegal: no such peg",
        "Now: 0:[3] 1:[2] 2:[1]; target peg 2.",
    ]
    assert len(info["messages"]) == 2  # still one tool message per call


def test_no_window_means_no_summary():
    assert "Recent moves" not in started().step(move(0, 2))[0]


# --- long episodes -------------------------------------------------------------------


def test_a_1023_move_episode_runs_fast_in_bounded_memory():
    env = make(num_disks=10, start="standard", window=20)
    env.reset(seed=0)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        for turn in range(1, 1024):
            _, reward, terminated, truncated, info = env.step(env.oracle_action())
            if turn == 100:
                after_warmup = tracemalloc.get_traced_memory()[0]
        elapsed = time.perf_counter() - start
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    assert info["turn"] == 1023
    assert elapsed < 20 and peak < 50e6
    # Nothing piles up per step (the base class keeps no message list while stepping).
    assert current - after_warmup < 50_000, current - after_warmup
    assert env._messages == []


def test_replay_of_a_long_history_restores_the_state():
    env = make(num_disks=8, start="standard")
    env.reset(seed=0)
    history = []
    for _ in range(200):
        history.append(env.oracle_action())
        env.step(history[-1])
    pegs = copy.deepcopy(env._pegs)
    replayed = make(num_disks=8, start="standard")
    obs, info = replayed.reset(options={"task": "hanoi:00000000:2", "history": history})
    assert replayed._pegs == pegs and info["turn"] == 200 and len(info["messages"]) == 402
    assert replayed._messages == []  # handed back in info, not kept
    assert play_oracle(replayed)[0] == 255 - 200


# --- tasks and split -------------------------------------------------------------------


def test_train_and_test_tasks_are_disjoint_and_never_the_classic_puzzle_in_test():
    train, test = make(num_disks=4), make(num_disks=4, split="test")
    train_ids = {train.reset(seed=s)[1]["task_id"] for s in range(1500)}
    test_ids = {test.reset(seed=s)[1]["task_id"] for s in range(1500)}
    assert len(train_ids) > 80 and len(test_ids) > 15 and not train_ids & test_ids
    for task_id in test_ids:
        _, positions, target = task_id.split(":")
        assert split_of(positions, int(target)) == "test"
    assert "hanoi:0000:2" not in test_ids and split_of("0000", 2) == "train"


def test_random_tasks_have_the_largest_disk_off_the_target():
    env = make(num_disks=5)
    for seed in range(100):
        env.reset(seed=seed)
        assert env.task.positions[-1] != env.task.target
        assert 16 <= optimal_distance(env.task.positions, env.task.target) <= 31


def test_standard_start_is_the_classic_puzzle():
    env = make(num_disks=4, start="standard")
    assert {env.reset(seed=s)[1]["task_id"] for s in range(5)} == {"hanoi:0000:2"}


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ("000:2", "is not a Hanoi task id; expected 'hanoi:<peg of each disk"),
        ("hanoi:00:2", "expected 3 peg digits"),
        ("hanoi:0a0:2", "expected 3 peg digits"),
        ("hanoi:000:3", "expected a target peg 0, 1 or 2"),
        ("hanoi:222:2", "disk 3, the largest, is already on the target peg"),
        ("hanoi:100:2", "it belongs to the 'test' split, not 'train'"),
    ],
)
def test_task_option_rejects_what_the_env_cannot_pose(task_id, message):
    assert split_of("100", 2) == "test"
    with pytest.raises(ValueError, match=message):
        make().reset(options={"task": task_id})


def test_standard_env_poses_only_the_classic_puzzle():
    with pytest.raises(ValueError, match="start='standard' poses only the classic puzzle"):
        make(start="standard").reset(options={"task": "hanoi:100:2"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_disks": 0}, "Expect `num_disks` to be between 1 and 20, actually: 0"),
        ({"num_disks": 21}, "Expect `num_disks` to be between 1 and 20, actually: 21"),
        ({"num_disks": 3.0}, "Expect `num_disks` to be an int, actually: 3.0"),
        ({"start": "classic"}, "Expect `start` to be 'random' or 'standard', actually: 'classic'"),
        ({"split": "dev"}, "Expect `split` to be 'train' or 'test', actually: 'dev'"),
        ({"start": "standard", "split": "test"}, "Expect split='train' with start='standard'"),
        ({"reward_shaping": "dense"}, "Expect `reward_shaping` to be None or 'progress'"),
        ({"window": 0}, "Expect `window` to be None or an int from 1 to 1000, actually: 0"),
        ({"window": True}, "Expect `window` to be None or an int from 1 to 1000, actually: True"),
        ({"max_turns": 0}, "Expect `max_turns` to be a positive int, actually: 0"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make(**kwargs)


def test_twenty_disks_build_and_move():
    env = make(num_disks=20, start="standard", window=5)
    obs, _ = env.reset(seed=0)
    assert "0:[20 19 18 17 16 15 14 13 12 11 10 9 8 7 6 5 4 3 2 1]" in obs
    assert env.max_turns == 2 * (2**20 - 1) + 10
    assert env.step(env.oracle_action())[0].startswith("Moved disk 1 from peg 0 to peg 1.")


def test_format_pegs():
    assert format_pegs([[3, 2], [], [1]]) == "0:[3 2] 1:[] 2:[1]"


# --- fuzz ------------------------------------------------------------------------------

HOSTILE = [
    "",
    "<tool_call>",
    "</tool_call>",
    "<tool_call>{}</tool_call>",
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "move"}</tool_call>',
    '<tool_call>{"name": "move", "arguments": "{\\"from_peg\\": 0}"}</tool_call>',
    '<tool_call>{"name": "move", "arguments": [0, 2]}</tool_call>',
    '<tool_call>{"name": "move", "arguments": {"from_peg": 1e400, "to_peg": 2}}</tool_call>',
    format_tool_call("move", {"from_peg": 0, "to_peg": 1}).replace("0", "9" * 5000),
    '<tool_call>{"name": "move", "arguments": {"from_peg": null, "to_peg": 2}}</tool_call>',
    '<tool_call>{"name": "MOVE", "arguments": {"from_peg": 0, "to_peg": 2}}</tool_call>',
    "<tool_call>" + "[" * 100_000 + "</tool_call>",
    "x" * 1_000_000,
    "\ud800\udfff\x00 ∑ 🚀 " * 1000,
    move(-(2**63), 2**63),
    move(1, 1),
    move(2, 0),
]

FUZZ_ENV = make(num_disks=3, window=3, reward_shaping="progress", max_turns=50)
FUZZ_ENV.reset(seed=0)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    action=st.one_of(
        st.sampled_from(HOSTILE),
        st.text(max_size=200),
        st.builds(
            lambda name, args: format_tool_call(name, args),
            st.sampled_from(["move", "mv", ""]),
            st.dictionaries(
                st.sampled_from(["from_peg", "to_peg", "disk"]),
                st.one_of(st.integers(), st.floats(), st.text(max_size=5), st.booleans()),
            ),
        ),
    )
)
def test_fuzz_hostile_actions_never_raise_and_no_ops_change_nothing(action):
    env = FUZZ_ENV
    if env._terminated or env._truncated:
        env.reset(seed=env._turn)
    before = (copy.deepcopy(env._pegs), env._moves)
    obs, reward, terminated, truncated, info = env.step(action)
    assert isinstance(obs, str) and len(obs) <= env.max_text_length
    json.dumps(info)  # plain data only
    if not any(m["content"].startswith("Moved") for m in info["messages"]):
        assert (copy.deepcopy(env._pegs), env._moves, reward) == (*before, 0.0)
    assert sorted(d for peg in env._pegs for d in peg) == list(range(1, 4))

