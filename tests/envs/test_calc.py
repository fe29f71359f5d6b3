"""`looprl/Calc-v0`: the safe calculator, answers, turn limit, split and settings."""

from __future__ import annotations

import gymnasium
import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import looprl.envs  # noqa: F401 — registers looprl/Calc-v0
from looprl.envs import format_tool_call
from looprl.envs.calc import CalcEnv, calculate, format_number, split_of


def make(**kwargs) -> CalcEnv:
    return gymnasium.make("looprl/Calc-v0", **kwargs).unwrapped


def started(task_id="calc:7 + 12", **kwargs) -> CalcEnv:
    """A train-split env on task `7 + 12` (= 19)."""
    env = make(**kwargs)
    env.reset(options={"task": task_id})
    return env


def calculator(env: CalcEnv, expression: str) -> str:
    return env.step(format_tool_call("calculator", {"expression": expression}))[0]


# --- calculator ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("7 + 12 * 3", "43"),
        ("(7 + 12) * 3", "57"),
        ("-3 + 5", "2"),
        ("-(2 - 5) * -2", "-6"),
        ("10 / 4", "2.5"),
        ("6 / 3", "2"),
        ("1 / 3", "0.333333"),
        ("2 / 3", "0.666667"),
        ("1.5 * 2", "3"),
        ("  8 - 2 - 1 ", "5"),
        ("1e12", "1000000000000"),
    ],
)
def test_calculator_values(expression, value):
    assert calculator(started(), expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        (
            "2**99",
            "Error: ValueError: unsupported syntax (Pow); only numbers, + - * / and parentheses",
        ),
        ("__import__('os')", "Error: ValueError: unsupported syntax (Call)"),
        ("x + 1", "Error: ValueError: unsupported syntax (Name)"),
        ("7 // 2", "Error: ValueError: unsupported syntax (FloorDiv)"),
        ("True + 1", "Error: ValueError: unsupported syntax (Constant)"),
        ("1 / 0", "Error: ZeroDivisionError: division by zero"),
        ("10000000000000", "Error: ValueError: number too large: magnitudes must be at most 1e+12"),
        ("1000000 * 1000000 * 10", "Error: ValueError: number too large"),
        ("1e999", "Error: ValueError: number too large"),
        ("1 +", "Error: ValueError: not an arithmetic expression"),
        ("1\x00", "Error: ValueError: not an arithmetic expression"),
        ("1+" * 150 + "1", "Error: ValueError: expression has 301 characters, at most 200 allowed"),
    ],
)
def test_calculator_errors_come_back_as_text(expression, message):
    assert calculator(started(), expression).startswith(message)


def test_calculate_and_format_number_directly():
    assert calculate("7 + 12 * 3") == 43 and calculate("-(1 + 2) / 4") == -0.75
    assert [format_number(v) for v in (19, 19.0, 0.1 + 0.2, -2.5)] == ["19", "19", "0.3", "-2.5"]


# --- answer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reward"),
    [
        (19, 1.0),
        (19.0, 1.0),
        (19.0000001, 1.0),
        ("19", 1.0),
        (" 19 ", 1.0),
        (19.01, 0.0),
        (-19, 0.0),
        (10**400, 0.0),
    ],
)
def test_answer_rewards_a_correct_value_and_ends_the_episode(value, reward):
    env = started()
    obs, got, terminated, truncated, info = env.step(format_tool_call("answer", {"value": value}))
    assert (obs, got, terminated, truncated) == (
        "Correct." if reward else "Incorrect.",
        reward,
        True,
        False,
    )
    assert info["success"] is bool(reward)


def test_answer_with_a_bad_value_does_not_end_the_episode():
    env = started()
    obs, reward, terminated, _, _ = env.step(format_tool_call("answer", {"value": "nineteen"}))
    assert obs == 'Error: argument "value" of answer must be number, got string "nineteen".'
    assert (reward, terminated) == (0.0, False)
    obs, reward, terminated, _, _ = env.step(format_tool_call("answer", {"value": True}))
    assert obs.startswith("Error:") and not terminated


def test_calls_after_the_answer_in_the_same_turn_are_not_run():
    env = started()
    both = format_tool_call("answer", {"value": 19}) + format_tool_call(
        "calculator", {"expression": "1"}
    )
    obs, reward, terminated, _, info = env.step(both)
    assert obs == "Correct.\nError: not run: the episode ended at an earlier call this turn."
    assert (reward, terminated, info["errors"]) == (1.0, True, 1)


def test_step_after_the_end_returns_an_error_and_no_reward():
    env = started()
    env.step(format_tool_call("answer", {"value": 19}))
    obs, reward, terminated, truncated, _ = env.step(format_tool_call("answer", {"value": 19}))
    assert (obs, reward, terminated, truncated) == (
        "Error: the episode is over; call reset().",
        0.0,
        True,
        False,
    )


def test_parallel_calls_give_one_tool_message_each():
    env = started()
    obs, _, _, _, info = env.step(
        format_tool_call("calculator", {"expression": "7 + 12"})
        + format_tool_call("fly", {})
        + "<tool_call>{"
    )
    names = [m["name"] for m in info["messages"]]
    assert names == ["calculator", "error", "error"] and obs.split("\n")[0] == "19"
    assert (
        info["messages"][1]["content"]
        == 'Error: unknown tool "fly"; available tools: calculator, answer.'
    )
    assert "unclosed <tool_call>" in info["messages"][2]["content"]
    assert 'Call a tool as <tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>' in obs


def test_non_text_action_is_an_error_observation():
    obs, reward, terminated, _, _ = started().step(42)
    assert obs == "Error: the action must be text (a str), got int."
    assert (reward, terminated) == (0.0, False)


# --- turns, oracle ---------------------------------------------------------------------


def test_episode_truncates_after_max_turns():
    env = started(max_turns=2)
    assert env.step("hmm")[3] is False
    _, _, terminated, truncated, info = env.step("hmm")
    assert (terminated, truncated, info["turn"]) == (False, True, 2)


def test_oracle_follows_the_state_after_a_non_oracle_history():
    env = make()
    wrong = format_tool_call("calculator", {"expression": "1 + 1"})
    right = format_tool_call("calculator", {"expression": "7+12"})
    env.reset(options={"task": "calc:7 + 12", "history": [wrong]})
    assert env.oracle_action() == format_tool_call("calculator", {"expression": "7 + 12"})
    env.reset(options={"task": "calc:7 + 12", "history": [wrong, right]})
    assert (
        env.oracle_action()
        == '<tool_call>{"name": "answer", "arguments": {"value": 19}}</tool_call>'
    )


def test_oracle_answers_a_division_exactly():
    env = make(operators="/", split="test")
    for seed in range(50):
        env.reset(seed=seed)
        env.step(env.oracle_action())
        assert env.step(env.oracle_action())[1] == 1.0


# --- tasks and split -------------------------------------------------------------


def test_prompts_are_short():
    obs, info = make().reset(seed=0)
    assert obs == info["messages"][1]["content"] and obs.startswith("Compute ") and len(obs) < 30
    assert info["messages"][0] == {"role": "system", "content": "Use the calculator, then answer."}


def test_train_and_test_tasks_are_disjoint_and_non_empty():
    train, test = make(split="train"), make(split="test")
    train_ids = {train.reset(seed=s)[1]["task_id"] for s in range(2000)}
    test_ids = {test.reset(seed=s)[1]["task_id"] for s in range(2000)}
    assert len(train_ids) > 500 and len(test_ids) > 100 and not train_ids & test_ids
    assert all(split_of(t[len("calc:") :]) == "test" for t in test_ids)


def test_split_is_by_content():
    assert (split_of("3 + 2"), split_of("7 + 12")) == ("test", "train")
    assert make(split="test").reset(options={"task": "calc:3 + 2"})[1]["task_id"] == "calc:3 + 2"


def test_tasks_follow_the_settings():
    env = make(min_operand=3, max_operand=5, num_operands=3, operators="-")
    for seed in range(50):
        tokens = env.reset(seed=seed)[1]["task_id"][len("calc:") :].split(" ")
        assert all(3 <= int(t) <= 5 for t in tokens[0::2]) and set(tokens[1::2]) == {"-"}


def test_task_option_starts_that_task():
    obs, info = make().reset(options={"task": "calc:7 + 12"})
    assert (obs, info["task_id"]) == ("Compute 7 + 12.", "calc:7 + 12")


@pytest.mark.parametrize(
    ("task_id", "message"),
    [
        ("7 + 12", "is not a Calc task id; expected 'calc:<expression>'"),
        ("calc:7+12", "expected 2 operands separated by single spaces and operators"),
        ("calc:7 + 12 + 1", "expected 2 operands"),
        ("calc:7 + 99", r"operand 99 is outside \[1, 20\]"),
        ("calc:07 + 12", "operand '07' is not a plain non-negative integer"),
        ("calc:7 / 12", r"operator '/' is not one of '\+-\*'"),
        ("calc:3 + 2", "it belongs to the 'test' split, not 'train'"),
    ],
)
def test_task_option_rejects_what_the_env_cannot_pose(task_id, message):
    with pytest.raises(ValueError, match=message):
        make().reset(options={"task": task_id})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "dev"}, "Expect `split` to be 'train' or 'test', actually: 'dev'"),
        ({"min_operand": -1}, "Expect 0 <= `min_operand` <= `max_operand`, actually: -1 and 20"),
        ({"min_operand": 9, "max_operand": 3}, "actually: 9 and 3"),
        ({"max_operand": 2.5}, "Expect `max_operand` to be an int, actually: 2.5"),
        ({"num_operands": 1}, "Expect `num_operands` to be between 2 and 32, actually: 1"),
        ({"max_operand": 10**7}, r"Expect `max_operand \*\* num_operands` <= 1e12"),
        (
            {"operators": "+^"},
            "Expect `operators` to be distinct characters from '\\+-\\*/', actually: '\\+\\^'",
        ),
        ({"operators": ""}, "Expect `operators`"),
        ({"operators": "++"}, "Expect `operators`"),
        ({"max_turns": 0}, "Expect `max_turns` to be a positive int, actually: 0"),
    ],
)
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_a_split_with_no_tasks_fails_clearly():
    assert split_of("1 + 1") == "train"  # the only task these settings allow
    env = make(min_operand=1, max_operand=1, operators="+", split="test")
    with pytest.raises(RuntimeError, match=r"Found no 'test' task in 10000 draws"):
        env.reset(seed=0)


# --- schemas ---------------------------------------------------------------------------

QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0].content }}\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages[1:] %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
)


def test_tool_schemas_fit_apply_chat_template():
    _, info = make().reset(seed=0)
    for schema in info["tools"]:
        assert set(schema) == {"type", "function"} and schema["type"] == "function"
        assert set(schema["function"]) == {"name", "description", "parameters"}
        assert schema["function"]["parameters"]["type"] == "object"
    assert info["tools"][1]["function"]["parameters"]["properties"]["value"]["type"] == "number"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        chat_template=QWEN_LIKE_TEMPLATE,
    )
    text = tokenizer.apply_chat_template(info["messages"], tools=info["tools"], tokenize=False)
    assert '{"type": "function", "function": {"name": "calculator"' in text
    assert '"name": "answer"' in text and "Use the calculator, then answer." in text
