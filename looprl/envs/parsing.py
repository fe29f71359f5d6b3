"""Reading tool calls out of the assistant's text, in the Hermes/Qwen format.

A turn may hold several calls (parallel function calling), each as
`<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 2"}}</tool_call>`.
`parse_action` never raises: anything malformed becomes a short message in
`ParsedAction.errors` that the environment shows to the agent.

Example:
    >>> parse_action('Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    ParsedAction(content='Sure.', tool_calls=(ToolCall(name='f', arguments={'x': 1}),), errors=())
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    """One call the agent asked for.

    Attributes:
        name: The tool's name.
        arguments: The parsed JSON arguments (not yet checked against the tool's schema).
    """

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ParsedAction:
    """An assistant turn split into prose, well-formed tool calls and errors.

    Attributes:
        content: The text outside the `<tool_call>` blocks, stripped.
        tool_calls: The well-formed calls, in the order they appear.
        errors: One short message per malformed thing, for the agent to read.
    """

    content: str
    tool_calls: tuple[ToolCall, ...]
    errors: tuple[str, ...]


def parse_action(text: str, max_calls: int = 8) -> ParsedAction:
    """Parses the Hermes/Qwen tool calls in one assistant turn.

    Only the first `max_calls` blocks are read. An `"arguments"` value given as a JSON
    string holding an object (as some models emit) is accepted; a missing one means no
    arguments (`{}`).

    Args:
        text: The assistant's raw text for the turn.
        max_calls: The most tool calls read from one turn.

    Returns:
        The parsed turn. Never raises, whatever `text` holds.
    """
    if not isinstance(text, str):
        return ParsedAction("", (), (f"the action must be text, got {type(text).__name__}",))
    blocks, outside, errors = _split_blocks(text)
    calls: list[ToolCall] = []
    for number, body in enumerate(blocks[:max_calls], start=1):
        call = _parse_call(body, number)
        if isinstance(call, ToolCall):
            calls.append(call)
        else:
            errors.append(call)
    if len(blocks) > max_calls:
        errors.append(
            f"too many tool calls: {len(blocks)}, at most {max_calls} per turn; "
            f"only the first {max_calls} were read"
        )
    return ParsedAction("".join(outside).strip(), tuple(calls), tuple(errors))


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One call in the Hermes/Qwen format, with `json.dumps`'s default separators.

    Example:
        >>> format_tool_call("answer", {"value": 43})
        '<tool_call>{"name": "answer", "arguments": {"value": 43}}</tool_call>'
    """
    return f"{OPEN_TAG}{json.dumps({'name': name, 'arguments': arguments})}{CLOSE_TAG}"


def _split_blocks(text: str) -> tuple[list[str], list[str], list[str]]:
    """Splits `text` into tool-call bodies, the text outside them, and tag errors."""
    blocks: list[str] = []
    outside: list[str] = []
    errors: list[str] = []
    position = 0
    while True:
        start = text.find(OPEN_TAG, position)
        if start == -1:
            outside.append(text[position:])
            break
        outside.append(text[position:start])
        end = text.find(CLOSE_TAG, start + len(OPEN_TAG))
        if end == -1:
            errors.append(
                f"unclosed {OPEN_TAG} at character {start}: expected {CLOSE_TAG} after the JSON"
            )
            break
        blocks.append(text[start + len(OPEN_TAG) : end])
        position = end + len(CLOSE_TAG)
    stray = sum(part.count(CLOSE_TAG) for part in outside)
    if stray:
        errors.append(f"found {stray} {CLOSE_TAG} without a matching {OPEN_TAG} before it")
    return blocks, outside, errors


def _parse_call(body: str, number: int) -> ToolCall | str:
    """Parses one block's body into a `ToolCall`, or returns the error message."""
    where = f"tool call {number}"
    if OPEN_TAG in body:
        return f"{where} contains a nested {OPEN_TAG}; put one JSON object in each block"
    call, error = _load_json(body.strip(), where)
    if error is not None:
        return error
    if not isinstance(call, dict):
        return (
            f'{where} must be a JSON object like {{"name": ..., "arguments": {{...}}}}, '
            f"got {_json_type(call)}"
        )
    name = call.get("name")
    if not isinstance(name, str) or not name:
        got = "no name" if "name" not in call else _json_type(name) if name else "an empty string"
        return f'{where} needs "name": a non-empty string naming the tool, got {got}'
    arguments, error = _read_arguments(call.get("arguments", {}), where)
    if error is not None:
        return error
    return ToolCall(name, arguments)


def _read_arguments(arguments: Any, where: str) -> tuple[dict[str, Any], str | None]:
    """The arguments as a dict (decoding a JSON string holding an object), or an error."""
    if isinstance(arguments, str):
        arguments, error = _load_json(arguments, f'{where}: the "arguments" string')
        if error is not None:
            return {}, error
    if not isinstance(arguments, dict):
        return {}, f'{where}: "arguments" must be a JSON object, got {_json_type(arguments)}'
    return arguments, None


def _load_json(text: str, where: str) -> tuple[Any, str | None]:
    """`(json.loads(text), None)`, or `(None, error message)`."""
    if not text.strip():
        return None, f"{where} is empty: expected a JSON object"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, (
            f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})"
        )
    except (ValueError, RecursionError) as e:  # a number with too many digits; nested too deep
        return None, f"{where} is not valid JSON: {type(e).__name__}: {str(e)[:80]}"


def _json_type(value: Any) -> str:
    names = {
        type(None): "null",
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }
    return names.get(type(value), type(value).__name__)
