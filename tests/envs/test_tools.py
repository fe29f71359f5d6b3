"""`Tool`: schema from the docstring, argument checks, errors as strings."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import (
    DocstringParsingException,
    TypeHintParsingException,
)

from looprl.envs import Tool, tool


@tool
def scale(values: list[int], factor: float, label: str | None = None, loud: bool = False) -> str:
    """Multiply values.

    Args:
        values: The integers.
        factor: The multiplier.
        label: An optional label.
        loud: Shout the result.
    """
    result = f"{label or 'result'}: {[v * factor for v in values]}"
    return result.upper() if loud else result


@tool
def explode(message: str) -> str:
    """Always fails.

    Args:
        message: The error message.
    """
    raise RuntimeError(message)


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def bump(self, by: int) -> int:
        """Add to the counter.

        Args:
            by: The increment.
        """
        self.count += by
        return self.count


def test_schema_comes_from_the_docstring():
    assert scale.name == "scale" and scale.description == "Multiply values."
    assert scale.schema == {
        "type": "function",
        "function": {
            "name": "scale",
            "description": "Multiply values.",
            "parameters": {
                "type": "object",
                "properties": {
                    "values": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "description": "The integers.",
                    },
                    "factor": {"type": "number", "description": "The multiplier."},
                    "label": {
                        "type": "string",
                        "nullable": True,
                        "description": "An optional label.",
                    },
                    "loud": {"type": "boolean", "description": "Shout the result."},
                },
                "required": ["values", "factor"],
            },
        },
    }


def test_schema_is_a_fresh_copy():
    scale.schema["function"]["name"] = "changed"
    assert scale.name == "scale" and scale.schema is not scale.schema


def test_bound_method_schema_leaves_out_self_and_state_changes():
    counter = Counter()
    bump = Tool(counter.bump)
    assert list(bump.schema["function"]["parameters"]["properties"]) == ["by"]
    assert bump.call({"by": 2}) == "2" and bump.call({"by": 3}) == "5" and counter.count == 5


def test_good_call_returns_the_result_as_text():
    assert scale.call({"values": [1, 2], "factor": 2}) == "result: [2, 4]"
    assert (
        scale.call({"values": [1], "factor": 0.5, "label": None, "loud": True}) == "RESULT: [0.5]"
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([1, 2], "Error: arguments of scale must be a JSON object, got array."),
        ("x", "Error: arguments of scale must be a JSON object, got string."),
        (
            {"values": [1], "factor": 2, "size": 3},
            'Error: scale got unknown argument "size"; expected arguments: '
            "values (array of integer), factor (number), label (string), loud (boolean).",
        ),
        (
            {"values": [1]},
            'Error: scale is missing required argument "factor"; expected arguments:',
        ),
        (
            {"values": [1], "factor": "2"},
            'Error: argument "factor" of scale must be number, got string "2".',
        ),
        (
            {"values": [1], "factor": True},
            'Error: argument "factor" of scale must be number, got boolean true.',
        ),
        (
            {"values": [True], "factor": 1},
            'Error: argument "values[0]" of scale must be integer, got boolean true.',
        ),
        (
            {"values": [1.5], "factor": 1},
            'Error: argument "values[0]" of scale must be integer, got number 1.5.',
        ),
        (
            {"values": 1, "factor": 1},
            'Error: argument "values" of scale must be array of integer, got integer 1.',
        ),
        (
            {"values": [1], "factor": 1, "loud": 1},
            'Error: argument "loud" of scale must be boolean, got integer 1.',
        ),
    ],
)
def test_bad_arguments_become_error_text(arguments, message):
    assert scale.call(arguments).startswith(message)


def test_exceptions_become_error_text_truncated():
    assert explode.call({"message": "boom"}) == "Error: RuntimeError: boom"
    long = explode.call({"message": "x" * 1000})
    assert long.startswith("Error: RuntimeError: xxx") and len(long) <= 200


def test_numeric_strings_are_converted_only_when_asked():
    lenient = Tool(Counter().bump, numeric_strings=True)
    assert lenient.call({"by": "4"}) == "4"
    assert lenient.call({"by": "four"}).startswith(
        'Error: argument "by" of bump must be integer, got string'
    )
    assert Tool(Counter().bump).call({"by": "4"}).startswith("Error: argument")


def test_tool_can_still_be_called_directly():
    assert scale([3], 2.0) == "result: [6.0]"


def test_undocumented_or_untyped_functions_are_rejected():
    def untyped(x):
        """Untyped.

        Args:
            x: a value
        """

    def undocumented(x: int) -> int:
        """No args section."""

    with pytest.raises(TypeHintParsingException):
        Tool(untyped)
    with pytest.raises(DocstringParsingException):
        Tool(undocumented)
