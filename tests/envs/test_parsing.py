"""`parse_action`: well-formed calls, one error message per malformed thing, and fuzzing."""

from __future__ import annotations

import json

import gymnasium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import looprl.envs  # noqa: F401 — registers looprl/Calc-v0
from looprl.envs import ParsedAction, ToolCall, format_tool_call, parse_action

CALC = format_tool_call("calculator", {"expression": "7 + 12 * 3"})
ANSWER = format_tool_call("answer", {"value": 43})


def test_single_call_and_surrounding_text():
    parsed = parse_action(f"Let me compute.\n{CALC}\n")
    assert parsed == ParsedAction(
        content="Let me compute.",
        tool_calls=(ToolCall("calculator", {"expression": "7 + 12 * 3"}),),
        errors=(),
    )


def test_parallel_calls_keep_their_order():
    parsed = parse_action(f"{CALC} and {ANSWER}")
    assert [c.name for c in parsed.tool_calls] == ["calculator", "answer"]
    assert parsed.content == "and" and parsed.errors == ()


def test_whitespace_inside_the_block_and_missing_arguments():
    parsed = parse_action('<tool_call>\n{"name": "f"}\n</tool_call>')
    assert parsed.tool_calls == (ToolCall("f", {}),) and parsed.errors == ()


def test_arguments_given_as_a_json_string_are_decoded():
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    assert parse_action(text).tool_calls == (ToolCall("f", {"x": 1}),)


def test_plain_text_has_no_calls_and_no_errors():
    assert parse_action("The answer is 43.") == ParsedAction("The answer is 43.", (), ())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('<tool_call>{"name": "f"}', "unclosed <tool_call> at character 0: expected </tool_call>"),
        (
            "<tool_call>{name: f}</tool_call>",
            "tool call 1 is not valid JSON: Expecting property name "
            "enclosed in double quotes at line 1 column 2 (char 1)",
        ),
        ("<tool_call>[1, 2]</tool_call>", "tool call 1 must be a JSON object"),
        ('<tool_call>"f"</tool_call>', "tool call 1 must be a JSON object"),
        (
            '<tool_call>{"arguments": {}}</tool_call>',
            'needs "name": a non-empty string naming the tool, got no name',
        ),
        (
            '<tool_call>{"name": 3}</tool_call>',
            'needs "name": a non-empty string naming the tool, got number',
        ),
        ('<tool_call>{"name": ""}</tool_call>', "got an empty string"),
        (
            '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
            '"arguments" must be a JSON object, got array',
        ),
        (
            '<tool_call>{"name": "f", "arguments": "[1]"}</tool_call>',
            '"arguments" must be a JSON object, got array',
        ),
        (
            '<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>',
            'the "arguments" string is not valid JSON',
        ),
        ("<tool_call>  </tool_call>", "tool call 1 is empty: expected a JSON object"),
        ("done</tool_call>", "found 1 </tool_call> without a matching <tool_call>"),
        (f"<tool_call>{CALC}</tool_call>", "tool call 1 contains a nested <tool_call>"),
        (CALC * 9, "too many tool calls: 9, at most 8 per turn; only the first 8 were read"),
        (
            "<tool_call>" + "[" * 100_000 + "</tool_call>",
            "tool call 1 is not valid JSON: RecursionError",
        ),
        ("<tool_call>" + "1" * 5000 + "</tool_call>", "tool call 1 is not valid JSON: ValueError"),
    ],
)
def test_each_malformed_case_gets_a_message(text, message):
    errors = parse_action(text).errors
    assert any(message in error for error in errors), errors


def test_max_calls_keeps_the_first_calls():
    parsed = parse_action(CALC + ANSWER + ANSWER, max_calls=2)
    assert [c.name for c in parsed.tool_calls] == ["calculator", "answer"]
    assert parsed.errors == (
        "too many tool calls: 3, at most 2 per turn; only the first 2 were read",
    )


def test_good_calls_survive_next_to_bad_ones():
    parsed = parse_action(f"{CALC}<tool_call>oops</tool_call>{ANSWER}")
    assert [c.name for c in parsed.tool_calls] == ["calculator", "answer"]
    assert len(parsed.errors) == 1 and parsed.errors[0].startswith("tool call 2 is not valid JSON")


def test_huge_input_is_parsed():
    parsed = parse_action("x" * 2_000_000 + CALC)
    assert len(parsed.tool_calls) == 1 and len(parsed.content) == 2_000_000


# --- fuzzing -------------------------------------------------------------------

FRAGMENTS = [
    "<tool_call>",
    "</tool_call>",
    "<tool_call",
    "tool_call>",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    '"',
    '{"name":',
    '"name"',
    '"calculator"',
    '"answer"',
    '"arguments"',
    '"arguments": {',
    '"expression"',
    '"value"',
    '"7 + 12 * 3"',
    '"1/0"',
    '"2**99"',
    "null",
    "true",
    "1e999",
    "NaN",
    " ",
    "\n",
    "\\",
    '"{\\"value\\": 3}"',
]
any_text = st.text(alphabet=st.characters(), max_size=20)
lone_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
pieces = st.one_of(
    st.sampled_from(FRAGMENTS),
    any_text,
    lone_surrogate,
    st.integers(-(10**20), 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([CALC, ANSWER]),
)
near_calls = st.lists(pieces, max_size=40).map("".join)
texts = st.one_of(near_calls, st.text(max_size=300))


@settings(max_examples=300, deadline=None)
@given(texts, st.integers(0, 10))
def test_parse_action_never_raises(text, max_calls):
    parsed = parse_action(text, max_calls=max_calls)
    assert len(parsed.tool_calls) <= max_calls
    assert all(isinstance(e, str) and e for e in parsed.errors)


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, min_size=1, max_size=5), st.integers(0, 2**32 - 1))
def test_calc_step_never_raises(actions, seed):
    env = gymnasium.make("looprl/Calc-v0").unwrapped
    env.reset(seed=seed)
    for action in actions:
        obs, reward, _, _, info = env.step(action)
        assert obs in env.observation_space and obs.encode("utf-8")  # valid text for a tokenizer
        assert reward in (0.0, 1.0) and len(info["messages"]) >= 1
        json.dumps(info["messages"])
