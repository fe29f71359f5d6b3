"""`looprl/Code-v0`: tasks, tools, grading, split, settings, oracle and hostile actions.

The shared checker (`test_checker.py`) already runs 500 whole oracle episodes on the
default train split; here the oracle also solves 500 held-out tasks and train tasks of
every level, with `max_turns=1` so that each episode is one sandbox run (a submit).
"""

from __future__ import annotations

import json
import random
import string

import gymnasium
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import looprl.envs  # noqa: F401 — registers looprl/Code-v0
from looprl.envs import format_tool_call
from looprl.envs.code import CodeEnv, params_key, same, split_of
from looprl.envs.code_tasks import FAMILIES, FAMILIES_BY_NAME

TASK = 'code:sum_largest:{"k":4}:5'
SUM_LARGEST = "def sum_largest(nums):\n    return sum(sorted(nums, reverse=True)[:4])\n"


def make(**kwargs) -> CodeEnv:
    return gymnasium.make("looprl/Code-v0", **kwargs).unwrapped


def started(task_id: str = TASK, **kwargs) -> CodeEnv:
    env = make(**kwargs)
    env.reset(options={"task": task_id})
    return env


def call(env: CodeEnv, tool: str, code: object):
    return env.step(format_tool_call(tool, {"code": code}))


# --- the task ------------------------------------------------------------------------


def test_the_prompt_states_the_function_and_its_examples():
    env = make()
    obs, info = env.reset(options={"task": TASK})
    assert obs == (
        "Write a Python function `def sum_largest(nums: list[int]) -> int`.\n"
        "Return the sum of the 4 largest numbers in `nums` (the sum of all of them if it has "
        "fewer than 4).\nExamples:\n"
        + "\n".join(f"sum_largest({args[0]!r}) == {value!r}" for args, value in env.task.visible)
    )
    assert [t["function"]["name"] for t in info["tools"]] == ["run_tests", "submit"]
    assert len(env.task.visible) == 3 and len(env.task.hidden) == 10
    assert env.task.visible != env.task.hidden[:3]


def test_a_task_id_gives_the_same_task_as_its_seed():
    env = make()
    _, info = env.reset(seed=11)
    task = env.task
    env.reset(options={"task": info["task_id"]})
    assert env.task == task


# --- run_tests -----------------------------------------------------------------------


def test_run_tests_passes_a_correct_solution():
    env = started()
    obs, reward, terminated, truncated, _ = call(env, "run_tests", SUM_LARGEST)
    assert obs == "3/3 visible tests passed: test 1 passed, test 2 passed, test 3 passed."
    assert (reward, terminated, truncated) == (0.0, False, False)


def test_run_tests_shows_the_first_failure_and_the_output():
    env = started()
    code = "def sum_largest(nums):\n    print('nums', nums)\n    return sum(nums)\n"
    obs = call(env, "run_tests", code)[0]
    lines = obs.split("\n")
    failures = [i for i, (args, value) in enumerate(env.task.visible) if sum(args[0]) != value]
    first = failures[0]
    args, value = env.task.visible[first]
    assert lines[0].startswith(f"{3 - len(failures)}/3 visible tests passed: test 1 ")
    assert lines[1:4] == [
        f"Test {first + 1}: sum_largest({args[0]!r})",
        f"expected: {value!r}",
        f"got: {sum(args[0])!r}",
    ]
    assert lines[4] == "Output:" and lines[5] == f"nums {env.task.visible[0][0][0]!r}"


def test_run_tests_reports_errors_load_errors_and_timeouts():
    env = started(timeout_s=0.5)
    raising = call(env, "run_tests", "def sum_largest(nums):\n    raise ValueError('no')\n")[0]
    assert raising.startswith("0/3 visible tests passed: test 1 raised an error, test 2 raised")
    assert raising.endswith("line 2, in sum_largest\n    raise ValueError('no')\nValueError: no")
    broken = call(env, "run_tests", "def sum_largest(nums)\n    return 1\n")[0]
    assert broken.startswith("0/3 visible tests passed: your code failed before any test ran.\n")
    assert broken.endswith("SyntaxError: expected ':'")
    missing = call(env, "run_tests", "def total(nums):\n    return 1\n")[0]
    assert missing.endswith("the code does not define a function named 'sum_largest'")
    looping = call(env, "run_tests", "def sum_largest(nums):\n    while True:\n        pass\n")[0]
    assert looping == (
        "0/3 visible tests passed: test 1 did not finish, test 2 did not finish, "
        "test 3 did not finish.\nTimed out after 0.5 s."
    )


def test_code_in_a_markdown_fence_is_accepted():
    obs = call(started(), "run_tests", f"```python\n{SUM_LARGEST}```")[0]
    assert obs.startswith("3/3 visible tests passed")


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("", "Error: code is empty: write Python source that defines `sum_largest`."),
        ("```\n```", "Error: code is empty"),
        ("x" * 20_001, "Error: code has 20001 characters; at most 20000 are allowed."),
        (3, 'Error: argument "code" of run_tests must be string, got integer 3.'),
    ],
)
def test_bad_code_arguments_are_errors_that_change_nothing(code, message):
    env = started()
    obs, reward, terminated, _, _ = call(env, "run_tests", code)
    assert obs.startswith(message) and (reward, terminated) == (0.0, False)


# --- submit --------------------------------------------------------------------------


def test_submit_rewards_the_fraction_of_hidden_tests_passed():
    env = started()
    obs, reward, terminated, truncated, info = call(env, "submit", SUM_LARGEST)
    assert obs == "Submitted: 10/10 hidden tests passed."
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)

    env = started()
    partly = "def sum_largest(nums):\n    return sum(nums)\n"  # right for short lists only
    expected = sum(sum(args[0]) == value for args, value in env.task.hidden)
    obs, reward, terminated, _, info = call(env, "submit", partly)
    assert 0 < expected < 10 and reward == expected / 10 and terminated and not info["success"]
    assert obs == f"Submitted: {expected}/10 hidden tests passed."


def test_submit_says_why_nothing_passed():
    env = started(timeout_s=0.5)
    obs = call(env, "submit", "def sum_largest(nums):\n    while True:\n        pass\n")[0]
    assert obs == "Submitted: 0/10 hidden tests passed. Timed out after 0.5 s."
    env = started()
    obs = call(env, "submit", "import nothing_here\n")[0]
    assert obs.startswith(
        "Submitted: 0/10 hidden tests passed. Your code failed before any test ran:"
    )


def test_a_bad_submit_does_not_end_the_episode():
    env = started()
    obs, _, terminated, _, _ = call(env, "submit", "")
    assert obs.endswith("Nothing was submitted.") and not terminated
    assert call(env, "submit", SUM_LARGEST)[1] == 1.0


def test_out_of_turns_grades_the_code_last_tested():
    partly = "def sum_largest(nums):\n    return sum(nums)\n"  # right for short lists only
    env = started(max_turns=3)
    call(env, "run_tests", SUM_LARGEST)
    call(env, "submit", "")  # not a submission: the code stays untested
    obs, reward, terminated, truncated, info = call(env, "run_tests", partly)
    expected = sum(sum(args[0]) == value for args, value in env.task.hidden)
    assert 0 < expected < 10
    assert (reward, terminated, truncated, info["success"]) == (expected / 10, False, True, False)
    assert obs.endswith(f"Out of turns: the code last tested was graded: {expected}/10 hidden tests passed.")
    assert info["messages"][-1]["name"] == "out_of_turns"

    env = started(max_turns=2)
    call(env, "run_tests", partly)
    _, reward, _, truncated, info = call(env, "run_tests", SUM_LARGEST)
    assert (reward, truncated, info["success"]) == (1.0, True, True)


def test_out_of_turns_without_tested_code_or_grading_earns_nothing():
    env = started(max_turns=1)
    obs, reward, _, truncated, info = env.step("no tool call")
    assert (reward, truncated, info["success"]) == (0.0, True, False)
    assert obs.endswith("Out of turns: no code was tested, so nothing was graded.")

    env = started(max_turns=1, grade_unsubmitted=False)
    obs, reward, _, truncated, info = call(env, "run_tests", SUM_LARGEST)
    assert (reward, truncated, info["success"]) == (0.0, True, False)
    assert "Out of turns" not in obs and len(info["messages"]) == 1
    with pytest.raises(ValueError, match="`grade_unsubmitted` to be a bool"):
        make(grade_unsubmitted="yes")


@pytest.mark.parametrize(
    "code",
    [
        # prints what a naive harness might take for results
        'print(\'{"kind": "call", "index": 0, "value": 1}\')\n'
        "def sum_largest(nums):\n    return -1\n",
        # an answer equal to everything
        "class Yes:\n    def __eq__(self, other):\n        return True\n\n"
        "def sum_largest(nums):\n    return Yes()\n",
        # exits before the tests run
        "import os\nos._exit(0)\n",
        "import sys\nsys.exit(0)\n",
        # True == 1 in Python, not in the grading
        "def sum_largest(nums):\n    return True\n",
    ],
)
def test_forged_results_earn_nothing(code):
    env = started()
    assert call(env, "submit", code)[1] == 0.0


def test_same_compares_json_values_and_types():
    assert same([1, ["a", None]], [1, ["a", None]]) and same({"a": 1}, {"a": 1})
    assert (
        not same(True, 1)
        and not same(1, 1.0)
        and not same([1], [1, 2])
        and not same({"a": 1}, {"b": 1})
    )


# --- split, ids and settings --------------------------------------------------------------


def test_the_split_is_by_problem_and_held_out_problems_are_never_posed_in_train():
    for split in ("train", "test"):
        env = make(split=split, difficulty=3)
        for seed in range(200):
            env.reset(seed=seed)
            assert split_of(env.task.family, env.task.params) == split
    problems = [(f.name, params_key(p)) for f in FAMILIES for p in f.all_params()]
    held_out = sum(split_of(*problem) == "test" for problem in problems) / len(problems)
    assert 0.12 < held_out < 0.28 and len(problems) > 300


def test_level_1_has_too_many_problems_to_memorise():
    """Wide parameter ranges: a small model must copy the description's values, not recall answers."""
    level_1 = [(f.name, p) for f in FAMILIES if f.level == 1 for p in f.all_params()]
    assert len(level_1) > 1000
    assert sum(split_of(name, params_key(p)) == "test" for name, p in level_1) > 200


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_no_problem_is_solved_by_a_constant(family):
    """Each reference solution gives at least two different outputs on its family's inputs
    (a parameter outside what the inputs can reach would make `return []` a full score)."""
    constant = []
    for params in family.all_params():
        namespace: dict = {}
        exec(family.reference(params), namespace)  # trusted: our own reference solutions
        solve, rng = namespace[family.name], random.Random(0)
        outputs = {repr(solve(*family.inputs(rng, params))) for _ in range(60)}
        if len(outputs) < 2:
            constant.append(params)
    assert not constant, f"{family.name}: every input gives the same output for {constant}"


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ("calc:1 + 2", "is not a Code task id"),
        ('code:nope:{"k":3}:7', "unknown family 'nope'"),
        ('code:sum_largest:{"k":30}:7', "'sum_largest' does not take the parameters {\"k\":30}"),
        ('code:sum_largest:{"k": 4}:7', "does not take the parameters"),  # not canonical
        ('code:sum_largest:{"k":4}:-1', "the seed must be an integer in [0, 2147483648)"),
        ('code:sum_largest:{"k":4}:07', "the seed must be an integer"),
        ('code:sum_largest:{"k":4}:2147483648', "the seed must be an integer"),
        ('code:min_coins:{"coins":[1,3,4]}:7', "family 'min_coins' is not among its families"),
    ],
)
def test_unposable_task_ids_are_rejected(task_id, message):
    with pytest.raises(ValueError) as error:
        make().reset(options={"task": task_id})
    assert message in str(error.value)


def test_a_held_out_task_id_is_rejected_in_train():
    held_out = next(
        (f.name, params_key(p))
        for f in FAMILIES
        for p in f.all_params()
        if f.level == 1 and split_of(f.name, params_key(p)) == "test"
    )
    task_id = f"code:{held_out[0]}:{held_out[1]}:5"
    with pytest.raises(ValueError, match="it belongs to the 'test' split, not 'train'"):
        make().reset(options={"task": task_id})
    assert make(split="test").reset(options={"task": task_id})[1]["task_id"] == task_id


def test_difficulty_and_families_choose_the_families():
    levels = {FAMILIES_BY_NAME[n].level for n in make(difficulty=1, split="test")._problems}
    assert levels == {1}
    env = make(families=["caesar", "fib_mod"])
    assert {env.reset(seed=s)[1]["task_id"].split(":")[1] for s in range(30)} == {
        "caesar",
        "fib_mod",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "`split` to be 'train' or 'test', actually: 'dev'"),
        ({"difficulty": 4}, "`difficulty` to be 1, 2 or 3, actually: 4"),
        ({"difficulty": True}, "`difficulty` to be 1, 2 or 3"),
        ({"num_visible": 0}, "`num_visible` to be an int from 1 to 10, actually: 0"),
        ({"num_hidden": 101}, "`num_hidden` to be an int from 1 to 100"),
        ({"timeout_s": "2"}, "`timeout_s` to be a number of seconds"),
        ({"timeout_s": 0}, "`timeout_s` in (0, 600]"),
        ({"memory_mb": 8}, "`memory_mb` >= 64"),
        ({"max_turns": 0}, "`max_turns` to be a positive int"),
        ({"families": "caesar"}, "`families` to be a non-empty list of family names"),
        ({"families": ["cesar"]}, "Unknown family 'cesar'; known families: sum_largest"),
        ({"families": ["min_coins"]}, "Family 'min_coins' is level 3, above `difficulty` 2"),
    ],
)
def test_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError) as error:
        CodeEnv(**kwargs)
    assert message in str(error.value)


# --- oracle and weak policies ----------------------------------------------------------


def solved(env: CodeEnv, seeds) -> tuple[int, list[str]]:
    wins, failures = 0, []
    for seed in seeds:
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, info = env.step(env.oracle_action())
            done = terminated or truncated
        wins += info["success"]
        if not info["success"]:
            failures.append(env.task.task_id)
    return wins, failures


def test_the_oracle_solves_500_held_out_tasks():
    # A generous wall-clock limit: a busy machine must not fail the oracle (the default 2 s is for agents).
    wins, failures = solved(make(split="test", difficulty=3, max_turns=1, timeout_s=60.0), range(500))
    assert wins == 500, failures


def test_the_oracle_solves_train_tasks_of_every_level():
    env = make(difficulty=3, max_turns=1)
    wins, failures = solved(env, range(200))
    assert wins == 200, failures
    assert {
        FAMILIES_BY_NAME[env.reset(seed=s)[1]["task_id"].split(":")[1]].level for s in range(200)
    } == {1, 2, 3}


def test_the_oracle_tests_then_submits():
    env = started()
    first = env.oracle_action()
    assert json.loads(first[len("<tool_call>") : -len("</tool_call>")])["name"] == "run_tests"
    env.step(first)
    assert '"name": "submit"' in env.oracle_action()
    assert env.step(env.oracle_action())[1] == 1.0
    with pytest.raises(RuntimeError, match="episode is over"):
        env.oracle_action()


def test_random_or_constant_code_solves_almost_nothing():
    env = make(difficulty=3, max_turns=1)
    rng = np.random.default_rng(0)
    wins = 0
    for seed in range(60):
        env.reset(seed=seed)
        if seed % 2:
            code = "".join(rng.choice(list(string.printable), size=int(rng.integers(1, 80))))
        else:
            constant = ["0", "None", "[]", "''"][seed % 8 // 2]
            code = f"def {env.task.family}(*args):\n    return {constant}\n"
        wins += call(env, "submit", code)[4]["success"]
    assert wins <= 1


# --- hostile actions ----------------------------------------------------------------------

HOSTILE_CODE = [
    "import os\nwhile True:\n    os.fork()\n",
    "def f(*a):\n    return open('/etc/shadow').read()\n",
    "import socket\n",
    "x = bytearray(10 * 2**30)\n",
    "while True:\n    print('x' * 10000)\n",
    "import os\nos._exit(3)\n",
    "import sys\nsys.setrecursionlimit(10**6)\ndef f(n):\n    return f(n + 1)\nf(0)\n",
    "raise KeyboardInterrupt\n",
    "\x00\ud800",
    "def \u00e9(\n",
]


MALFORMED = [
    format_tool_call("run", {"code": "x"}),
    "<tool_call>{'name': 'submit'}</tool_call>",
    '<tool_call>{"name": "submit", "arguments": "[1]"}</tool_call>',
    '<tool_call>{"name": "submit", "arguments": ' + "[" * 5000 + "]" * 5000 + "}</tool_call>",
    "<tool_call>" * 20_000,
    "",
    "x" * 1_000_000,
]


def hostile_actions(env: CodeEnv, n: int, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """`(action, is_noop)`: malformed calls (no-ops) and calls with hostile code."""
    junk = ["<tool_call>", "</tool_call>", "{", "}", '"name": "run_tests"', '"arguments":',
            "null", "\\", "\x00", "\ud800", "é漢🙂", "1e999", "[", '"code"']  # fmt: skip
    values = [
        None,
        3,
        2**70,
        1e308,
        True,
        [],
        {},
        ["def f(): pass"],
        {"code": "x"},
        "x" * 1_000_000,
    ]
    actions = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            actions.append(
                ("".join(rng.choice(junk) for _ in range(int(rng.integers(1, 10)))), True)
            )
        elif kind == 1:  # a real tool with an argument of the wrong type, name or size
            value = values[int(rng.integers(len(values)))]
            key = str(rng.choice(["code", "source", "x"]))
            tool = str(rng.choice(["run_tests", "submit"]))
            noop = key != "code" or not isinstance(value, str) or len(value) > 20_000
            actions.append((format_tool_call(tool, {key: value}), noop))
        elif kind == 2:  # unknown tools, bad JSON, bad argument shapes
            actions.append((MALFORMED[int(rng.integers(len(MALFORMED)))], True))
        elif kind == 3 and i % 25 == 3:  # hostile code in the sandbox, sparingly (each run costs)
            code = HOSTILE_CODE[int(rng.integers(len(HOSTILE_CODE)))]
            actions.append(
                (format_tool_call(str(rng.choice(["run_tests", "submit"])), {"code": code}), False)
            )
        else:
            actions.append(
                (str(rng.choice(["", " ", "I give up.", "\ud800" * 1000, "🙂" * 100_000])), True)
            )
    return actions


def snapshot(env: CodeEnv):
    return (env.task, env._visible_passed, env._terminated, env._success, env._truncated)


def test_a_thousand_hostile_actions_never_raise_or_change_what_they_should_not():
    env = make(max_turns=100_000, timeout_s=0.5)
    env.reset(seed=0)
    runs = 0
    for i, (action, noop) in enumerate(hostile_actions(env, 1000, np.random.default_rng(1))):
        before = snapshot(env)
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, str) and env.observation_space.contains(obs)
        if noop:
            assert snapshot(env) == before and reward == 0.0 and info["errors"] >= 1, action[:200]
        else:
            runs += 1
            assert reward == 0.0
        if terminated or truncated:
            env.reset(seed=i)
    assert runs >= 30


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_safe_action(text):
    env = started()
    before = snapshot(env)
    obs, reward, *_ = env.step(text)
    assert isinstance(obs, str) and reward == 0.0
    if "<tool_call>" not in text:
        assert snapshot(env) == before
