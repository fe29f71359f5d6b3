"""Adapters: `TextEnvAdapter` over a toy Text-space game, `DatasetEnv`, and the rewards."""

from __future__ import annotations

import doctest
import json
import string
import time
import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.spaces import Discrete, Text
from gymnasium.utils.env_checker import check_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import looprl.envs  # noqa: F401 — registers looprl/Dataset-v0
from looprl.envs import env_ids, format_tool_call, rewards
from looprl.envs.adapters import (
    DatasetEnv,
    TextEnvAdapter,
    builtin_rows,
    load_reward_fn,
    load_rows,
    register_text_env,
    split_of,
)
from looprl.envs.rewards import contains, exact_match, last_number, numeric_match

# --- a toy game with Text spaces ---------------------------------------------------------


class GuessWordEnv(gymnasium.Env):
    """Guess a random 5-letter word; the first observation gives its first two letters.

    Each guess is answered with the letters in the right place (`gr___`); the right word
    earns 1.0 and ends the game, and the game truncates after `max_guesses` guesses.
    """

    metadata = {"render_modes": []}

    def __init__(self, max_guesses: int = 6) -> None:
        self.max_guesses = max_guesses
        self.observation_space = Text(200, min_length=0, charset=string.printable)
        self.action_space = Text(5, min_length=1, charset=string.ascii_lowercase)
        self.secret = ""
        self.guesses = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.secret = "".join(self.np_random.choice(list(string.ascii_lowercase), size=5))
        self.guesses = 0
        return f"Guess the 5-letter word that starts with {self.secret[:2]!r}.", {}

    def step(self, action):
        self.guesses += 1
        if action == self.secret:
            return "Correct!", 1.0, True, False, {}
        shown = "".join(a if a == s else "_" for a, s in zip(action.ljust(5), self.secret))
        return shown, 0.0, False, self.guesses >= self.max_guesses, {}


class DiscreteEnv(gymnasium.Env):
    observation_space = Text(10)
    action_space = Discrete(3)


def guess_secret(inner) -> str:
    return inner.unwrapped.secret


# Outside the looprl/ namespace, so that test_checker's registry sweep does not see them.
gymnasium.register(id="looprl_test/GuessWord-v0", entry_point=GuessWordEnv)
register_text_env(
    id="looprl_test/GuessWordText-v0",
    env_id="looprl_test/GuessWord-v0",
    tool_name="guess",
    tool_description="Guess the word.",
    oracle_fn=guess_secret,
    max_turns=10,
)
TEXT_ID = "looprl_test/GuessWordText-v0"


def text_env(**kwargs) -> TextEnvAdapter:
    return gymnasium.make(TEXT_ID, **kwargs).unwrapped


def guess(word: object) -> str:
    return format_tool_call("guess", {"text": word})


# --- TextEnvAdapter -------------------------------------------------------------------------


def test_adapted_ids_stay_out_of_the_looprl_registry():
    assert TEXT_ID not in env_ids() and "looprl/Dataset-v0" in env_ids()


def test_the_action_is_one_tool_and_observations_are_its_results():
    env = text_env()
    obs, info = env.reset(seed=5)
    assert obs.startswith("Guess the 5-letter word that starts with")
    assert info["task_id"] == "seed:5" and info["turn"] == 0
    assert [m["role"] for m in info["messages"]] == ["system", "user"]
    assert info["messages"][0]["content"] == "Play by calling guess with your action."
    (schema,) = info["tools"]
    assert schema["function"]["name"] == "guess"
    assert schema["function"]["description"] == "Guess the word."
    assert schema["function"]["parameters"]["properties"]["text"]["type"] == "string"
    secret = env.inner.unwrapped.secret
    obs, reward, terminated, truncated, info = env.step(guess(secret[:2] + "zzz"))
    assert obs == secret[:2] + "".join(c if c == "z" else "_" for c in secret[2:])
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["messages"][0]["name"] == "guess"
    obs, reward, terminated, truncated, info = env.step(guess(secret))
    assert (obs, reward, terminated, truncated) == ("Correct!", 1.0, True, False)
    assert info["success"]


def test_reset_seed_passes_through_to_the_inner_env():
    plain = GuessWordEnv()
    for seed in (0, 7, 123):
        env = text_env()
        env.reset(seed=seed)
        assert env.inner.unwrapped.secret == (plain.reset(seed=seed), plain.secret)[1]


def test_inner_truncation_truncates_the_episode():
    env = text_env(env_kwargs={"max_guesses": 2})
    env.reset(seed=0)
    assert env.step(guess("aaaaa"))[3] is False
    obs, reward, terminated, truncated, info = env.step(guess("aaaaa") + guess("bbbbb"))
    assert (terminated, truncated, info["success"]) == (False, True, False)
    assert obs.endswith("Error: not run: the game ended at an earlier call this turn.")
    assert env.inner.unwrapped.guesses == 2


def test_max_turns_truncates_too():
    env = text_env(max_turns=1)
    env.reset(seed=0)
    assert env.step("no call")[3] is True


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("toolong", "Error: the text must have 1 to 5 characters, got 7."),
        ("", "Error: the text must have 1 to 5 characters, got 0."),
        ("ABCDE", "Error: the text holds 'A', which is not one of the characters this game"),
        ("ab\x00", "Error: the text holds '\\x00'"),
    ],
)
def test_text_outside_the_inner_action_space_is_an_error_and_no_step(text, message):
    env = text_env()
    env.reset(seed=0)
    obs, reward, terminated, *_ = env.step(guess(text))
    assert obs.startswith(message) and (reward, terminated) == (0.0, False)
    assert env.inner.unwrapped.guesses == 0


def test_replay_re_steps_the_inner_env_from_the_same_seed():
    env = text_env()
    env.reset(seed=3)
    history = [guess("aaaaa"), "junk", guess("bbbbb")]
    stepped = [env.step(a)[0] for a in history]
    replayed = text_env()
    obs, info = replayed.reset(options={"task": "seed:3", "history": history})
    assert obs == stepped[-1] and info["turn"] == 3 and len(info["messages"]) == 2 + 6
    assert replayed.inner.unwrapped.guesses == 2
    assert replayed.step(replayed.oracle_action())[1] == 1.0


def test_oracle_solves_500_tasks_in_each_split():
    for split in ("train", "test"):
        env = text_env(split=split)
        prompts = set()
        for seed in range(500):
            obs, _ = env.reset(seed=seed)
            prompts.add(obs)
            _, reward, terminated, _, info = env.step(env.oracle_action())
            assert (reward, terminated, info["success"]) == (1.0, True, True)
        assert all(split_of(p) == split for p in prompts) and len(prompts) > 50


def test_random_text_solves_nothing():
    env = text_env()
    rng = np.random.default_rng(0)
    for seed in range(50):
        env.reset(seed=seed)
        done, total = False, 0.0
        while not done:
            word = "".join(rng.choice(list(string.ascii_lowercase), size=5))
            _, reward, terminated, truncated, _ = env.step(guess(word) if seed % 2 else word)
            total, done = total + reward, terminated or truncated
        assert total == 0.0


def test_task_ids_are_checked():
    with pytest.raises(ValueError, match="is not a text-env task id; expected 'seed:<n>'"):
        text_env().reset(options={"task": "seed:-1"})
    game = GuessWordEnv()
    held_out = next(s for s in range(100) if split_of(game.reset(seed=s)[0]) == "test")
    with pytest.raises(ValueError, match="belongs to the 'test' split, not 'train'"):
        text_env(split="train").reset(options={"task": f"seed:{held_out}"})


def test_env_checker_passes_on_the_adapted_env():
    env = gymnasium.make(TEXT_ID)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=True)
    assert [str(w.message) for w in caught] == []


def test_same_seed_and_actions_give_same_results():
    actions = [guess("abcde"), "junk", guess("zz")]
    runs = []
    for _ in range(2):
        env = text_env()
        runs.append([env.reset(seed=11)] + [env.step(a) for a in actions])
    assert runs[0] == runs[1]


def test_no_oracle_fn_is_a_clear_error():
    env = TextEnvAdapter(GuessWordEnv())
    env.reset(seed=0)
    assert env.tools[0].name == "act"
    with pytest.raises(NotImplementedError, match="pass oracle_fn=\\(inner_env\\) -> action text"):
        env.oracle_action()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"env": DiscreteEnv()}, ValueError, "this one's action_space is Discrete\\(3\\)"),
        ({"env": "GuessWord-v0"}, ValueError, "Expect `env` to be a gymnasium.Env, actually: str"),
        ({"tool_name": "two words"}, ValueError, "Expect `tool_name` to be a letter or '_'"),
        ({"tool_description": " "}, ValueError, "Expect `tool_description` to be non-empty"),
        ({"split": "dev"}, ValueError, "Expect `split` to be 'all', 'train' or 'test'"),
        ({"oracle_fn": "solve"}, ValueError, "Expect `oracle_fn` to be callable or None"),
        ({"max_turns": 0}, ValueError, "Expect `max_turns` to be a positive int"),
    ],
)
def test_bad_adapter_arguments_are_rejected(kwargs, error, message):
    with pytest.raises(error, match=message):
        TextEnvAdapter(**{"env": GuessWordEnv(), **kwargs})


def test_adapter_closes_the_inner_env_and_tolerates_a_second_close():
    env = text_env()
    env.close()
    env.close()


# --- DatasetEnv: loading ---------------------------------------------------------------------


def write_jsonl(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines))
    return path


ROWS = [
    json.dumps({"id": "q1", "prompt": "Capital of France?", "answer": "Paris"}),
    "",
    json.dumps({"prompt": "2 + 2 = ?", "answer": 4, "source": "toy"}),
    json.dumps({"id": 7, "prompt": "Half of 3?", "answer": 1.5}),
]


def test_load_rows_reads_ids_answers_and_skips_blank_lines(tmp_path):
    rows = load_rows(write_jsonl(tmp_path, ROWS))
    assert [(r.task_id, r.prompt, r.answer, r.line) for r in rows] == [
        ("q1", "Capital of France?", "Paris", 1),
        (rows[1].task_id, "2 + 2 = ?", "4", 3),
        ("7", "Half of 3?", "1.5", 4),
    ]
    assert rows[1].task_id.startswith("prompt-") and len(rows[1].task_id) == len("prompt-") + 16


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", "line 2: invalid JSON: Expecting property name enclosed in double quotes"),
        ('["prompt", "answer"]', 'line 2: expected a JSON object with "prompt" and "answer"'),
        ('{"prompt": "p"}', "line 2: missing key 'answer'"),
        ('{"answer": "a"}', "line 2: missing key 'prompt'"),
        ('{"prompt": 5, "answer": "a"}', "line 2: 'prompt' must be a non-empty string, got int"),
        ('{"prompt": " ", "answer": "a"}', "line 2: 'prompt' must be a non-empty string, got an empty"),
        ('{"prompt": "p", "answer": null}', "line 2: 'answer' must be a non-empty string, got null"),
        ('{"prompt": "p", "answer": true}', "line 2: 'answer' must be a non-empty string, got a bool"),
        ('{"prompt": "p", "answer": "a", "id": [1]}', "line 2: 'id' must be a non-empty string or an"),
        ('{"prompt": "p", "answer": "a", "id": "q1"}', "line 2: duplicate id 'q1' \\(first on line 1\\)"),
        ('{"prompt": "p", "answer": ' + "1" * 5000 + "}", "line 2: invalid JSON: ValueError"),
        (b'{"prompt": "\xff", "answer": "a"}', "line 2: not valid UTF-8"),
    ],
)
def test_bad_rows_name_the_file_line_and_problem(tmp_path, line, problem):
    path = write_jsonl(tmp_path, [ROWS[0], line])
    with pytest.raises(ValueError, match=f"{tmp_path}/data.jsonl, {problem}"):
        load_rows(path)


def test_duplicate_prompts_without_ids_are_rejected(tmp_path):
    row = json.dumps({"prompt": "same", "answer": "a"})
    with pytest.raises(ValueError, match="line 2: duplicate id 'prompt-.*' \\(first on line 1\\); rows"):
        load_rows(write_jsonl(tmp_path, [row, row]))


def test_empty_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="empty.jsonl: no rows; expected one JSON object per line"):
        load_rows(write_jsonl(tmp_path, ["", "  "], name="empty.jsonl"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl' does not exist"):
        load_rows(tmp_path / "nope.jsonl")


def test_reward_fn_is_loaded_by_import_path_or_taken_as_given():
    assert load_reward_fn("looprl.envs.rewards:numeric_match") is numeric_match
    assert load_reward_fn(contains) is contains
    with pytest.raises(ValueError, match="Expect `reward_fn` to be a callable or an import path"):
        load_reward_fn("looprl.envs.rewards.exact_match")
    with pytest.raises(ValueError, match="reward_fn 'looprl.nope:f': ModuleNotFoundError"):
        load_reward_fn("looprl.nope:f")
    with pytest.raises(ValueError, match="reward_fn 'looprl.envs.rewards:nope': AttributeError"):
        load_reward_fn("looprl.envs.rewards:nope")
    with pytest.raises(ValueError, match="is not callable"):
        load_reward_fn("looprl.envs.adapters:MAX_DRAWS")


# --- DatasetEnv: episodes --------------------------------------------------------------------


def dataset_env(**kwargs) -> DatasetEnv:
    return gymnasium.make("looprl/Dataset-v0", **kwargs).unwrapped


def answer(text: object) -> str:
    return format_tool_call("answer", {"text": text})


def test_tool_mode_grades_the_answer_and_ends_the_episode(tmp_path):
    env = dataset_env(path=write_jsonl(tmp_path, ROWS), split="all")
    obs, info = env.reset(options={"task": "q1"})
    assert obs == "Capital of France?" and info["tools"][0]["function"]["name"] == "answer"
    assert info["messages"][0]["content"] == "Answer the question by calling the answer tool."
    obs, reward, terminated, truncated, info = env.step("Let me think. " + answer("  paris "))
    assert (obs, reward, terminated, truncated, info["success"]) == (
        "Answer recorded; reward 1.", 1.0, True, False, True
    )
    env.reset(options={"task": "q1"})
    obs, reward, terminated, *_ = env.step(answer("Lyon") + answer("Paris"))
    assert obs.split("\n") == [
        "Answer recorded; reward 0.",
        "Error: not run: the episode ended at an earlier call this turn.",
    ]
    assert (reward, terminated) == (0.0, True)


def test_tool_mode_without_an_answer_gets_errors_then_truncates():
    env = dataset_env(max_turns=2)
    env.reset(seed=0)
    obs, reward, terminated, truncated, _ = env.step("The answer is 12.")
    assert obs.startswith("Error: no tool call found.")
    assert (reward, terminated, truncated) == (0.0, False, False)
    _, reward, terminated, truncated, info = env.step(answer(12))
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, True, False)


def test_text_mode_grades_the_whole_completion_in_one_turn(tmp_path):
    env = dataset_env(
        path=write_jsonl(tmp_path, ROWS),
        split="all",
        answer_mode="text",
        reward_fn="looprl.envs.rewards:numeric_match",
    )
    obs, info = env.reset(options={"task": "7"})
    assert info["tools"] == [] and info["messages"][0]["content"] == "Answer the question."
    obs, reward, terminated, truncated, info = env.step("Half of 3 is 1.5")
    assert (obs, reward, terminated, truncated, info["messages"][0]["name"]) == (
        "Answer recorded; reward 1.", 1.0, True, False, "grader"
    )
    env.reset(options={"task": "7"})
    assert env.step("")[1:3] == (0.0, True)
    assert env.max_turns == 1
    with pytest.raises(ValueError, match="answer_mode='text' answers in one turn"):
        dataset_env(answer_mode="text", max_turns=3)


def test_the_reward_fn_gets_the_answer_and_the_prompt():
    calls = []

    def spy(completion, answer, **kw):
        calls.append((completion, answer, kw))
        return 0.25

    env = dataset_env(reward_fn=spy)
    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(answer("forty"))
    assert calls == [("forty", env.task.answer, {"prompt": env.task.prompt})]
    assert (reward, terminated, info["success"]) == (0.25, True, False)


def test_a_failing_reward_fn_raises_instead_of_hiding_in_a_message():
    def broken(completion, answer, **kw):
        raise KeyError("bug in the grader")

    env = dataset_env(reward_fn=broken)
    env.reset(seed=0)
    with pytest.raises(KeyError, match="bug in the grader"):
        env.step(answer("x"))
    env = dataset_env(reward_fn=lambda c, a, **kw: "1")
    env.reset(seed=0)
    with pytest.raises(TypeError, match="must return a finite float, returned '1'"):
        env.step(answer("x"))


def test_numpy_rewards_are_plain_floats():
    env = dataset_env(reward_fn=lambda completion, answer, **kw: np.float32(0.5))
    env.reset(seed=0)
    reward = env.step(answer("x"))[1]
    assert reward == 0.5 and type(reward) is float


@pytest.mark.parametrize("answer_mode", ["tool", "text"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_oracle_solves_500_tasks_in_both_splits(split, answer_mode):
    env = dataset_env(split=split, answer_mode=answer_mode)
    for seed in range(500):
        env.reset(seed=seed)
        _, reward, terminated, _, info = env.step(env.oracle_action())
        assert (reward, terminated, info["success"]) == (1.0, True, True)


def test_splits_are_disjoint_by_prompt_and_all_keeps_every_row():
    train, test, every = (dataset_env(split=s) for s in ("train", "test", "all"))
    assert len(every.rows) == len(builtin_rows()) == 242
    assert len(train.rows) + len(test.rows) == 242 and len(test.rows) > 20
    assert not {r.prompt for r in train.rows} & {r.prompt for r in test.rows}
    assert all(split_of(r.prompt) == "test" for r in test.rows)
    held_out = test.rows[0].task_id
    with pytest.raises(ValueError, match="is not the id of a row in split 'train'"):
        train.reset(options={"task": held_out})


def test_an_empty_split_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path, [ROWS[0]])
    assert split_of("Capital of France?") == "train"
    message = "No row of .*data.jsonl falls in split 'test' \\(1 rows in all\\); use split='all'"
    with pytest.raises(ValueError, match=message):
        dataset_env(path=path, split="test")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "Expect `split` to be 'train', 'test' or 'all', actually: 'dev'"),
        ({"answer_mode": "json"}, "Expect `answer_mode` to be 'tool' or 'text', actually: 'json'"),
        ({"reward_fn": 3}, "Expect `reward_fn` to be a callable or an import path"),
        ({"max_turns": 0}, "Expect `max_turns` to be a positive int"),
    ],
)
def test_bad_dataset_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataset_env(**kwargs)


def test_env_checker_passes_in_text_mode_on_a_file(tmp_path):
    path = write_jsonl(tmp_path, ROWS)
    env = gymnasium.make("looprl/Dataset-v0", path=path, split="all", answer_mode="text")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped, skip_render_check=True)
    assert [str(w.message) for w in caught] == []


# --- rewards ---------------------------------------------------------------------------------


def test_reward_doctests_pass():
    assert doctest.testmod(rewards).failed == 0


@pytest.mark.parametrize(
    ("fn", "completion", "answer", "reward"),
    [
        (exact_match, "PARIS\n", "paris", 1.0),
        (exact_match, "Paris.", "paris", 0.0),
        (contains, "it is 42", "42", 1.0),
        (numeric_match, "1,234,567 total", "1234567", 1.0),
        (numeric_match, "answer: -3.50", "-3.5", 1.0),
        (numeric_match, "between 3-5", "-5", 0.0),
        (numeric_match, "1e3", "1000", 0.0),  # no scientific notation: reads 3
        (numeric_match, "9" * 400, "1", 0.0),
    ],
)
def test_reward_values(fn, completion, answer, reward):
    assert fn(completion, answer) == reward


@pytest.mark.parametrize("fn", [exact_match, contains, numeric_match])
def test_rewards_are_fast_and_total_on_hostile_text(fn):
    # Linear time takes milliseconds here; catastrophic regex backtracking on a million
    # characters takes hours. The bound is far from both, so a loaded machine cannot fail it.
    for text in ("1" * 1_000_000, "1," * 500_000, "\ud800 ∑ 🚀" * 10_000, "-" * 1_000_000, ""):
        start = time.perf_counter()
        assert fn(text, "12") in (0.0, 1.0)
        assert time.perf_counter() - start < 60


def test_last_number_reads_the_last_one():
    assert last_number("1, 2, 3") == 3.0 and last_number("v2 of 10.25") == 10.25


# --- fuzz ------------------------------------------------------------------------------------

HOSTILE = [
    "",
    "<tool_call>",
    "<tool_call>{}</tool_call>",
    "<tool_call>not json</tool_call>",
    '<tool_call>{"name": "answer"}</tool_call>',
    '<tool_call>{"name": "guess", "arguments": {"text": 5}}</tool_call>',
    '<tool_call>{"name": "answer", "arguments": {"text": ["12"]}}</tool_call>',
    "<tool_call>" + "{" * 100_000 + "</tool_call>",
    "x" * 1_000_000,
    "\ud800\udfff\x00 ∑ 🚀 " * 1000,
    format_tool_call("guess", {"text": "a" * 1_000_000}),
    format_tool_call("guess", {"text": "\x00\x00"}),
]
ACTIONS = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=200),
    st.builds(
        format_tool_call,
        st.sampled_from(["guess", "answer", "act", ""]),
        st.dictionaries(
            st.sampled_from(["text", "value"]),
            st.one_of(st.text(max_size=20), st.integers(), st.none(), st.lists(st.integers())),
        ),
    ),
)
FUZZ_TEXT_ENV = text_env(max_turns=20)
FUZZ_TEXT_ENV.reset(seed=0)
FUZZ_DATASET_ENV = dataset_env(max_turns=20)
FUZZ_DATASET_ENV.reset(seed=0)


def fuzz_step(env, action, state):
    """Steps `env` (resetting an ended episode); an all-error turn must change nothing."""
    if env._terminated or env._truncated:
        env.reset(seed=env._turn)
    before = state(env)
    obs, reward, terminated, truncated, info = env.step(action)
    assert isinstance(obs, str) and len(obs) <= env.max_text_length
    json.dumps(info)
    if all(m["content"].startswith("Error:") for m in info["messages"]):
        assert (state(env), reward, terminated) == (before, 0.0, False)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=ACTIONS)
def test_fuzz_text_adapter(action):
    fuzz_step(FUZZ_TEXT_ENV, action, lambda env: env.inner.unwrapped.guesses)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=ACTIONS)
def test_fuzz_dataset_env(action):
    fuzz_step(FUZZ_DATASET_ENV, action, lambda env: (env.task.task_id, env._submitted))

