"""Tools: typed Python functions whose Google-style docstrings become their schema.

A `Tool` wraps a function (or a bound method of an environment, so it can read and
change per-episode state). `Tool.schema` is the JSON schema that
`tokenizer.apply_chat_template(tools=...)` takes, made by transformers'
`get_json_schema`. `Tool.call` checks the model's arguments against that schema and
runs the function; whatever goes wrong comes back as an `"Error: ..."` string for the
agent to read, never as an exception.

Example:
    >>> @tool
    ... def add(a: int, b: int) -> int:
    ...     '''Add two integers.
    ...
    ...     Args:
    ...         a: The first integer.
    ...         b: The second integer.
    ...     '''
    ...     return a + b
    >>> add.call({"a": 2, "b": 3})
    '5'
    >>> add.call({"a": 2, "b": True})
    'Error: argument "b" of add must be integer, got boolean true.'
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

MAX_ERROR_CHARS = 200
_JSON_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")


class Tool:
    """A function the agent can call by name with JSON arguments.

    Args:
        fn: A function or bound method with type hints on every argument and a
            Google-style docstring with an `Args:` section. For a bound method the
            schema leaves out `self`.
        numeric_strings: Also accept a string holding a JSON number (`"19"`) where the
            schema asks for a number or an integer, converting it. Off by default;
            meant for answer tools, where models often quote numbers.

    Raises:
        transformers.utils.chat_template_utils.TypeHintParsingException: An argument
            has no type hint.
        transformers.utils.chat_template_utils.DocstringParsingException: An argument
            is missing from the docstring's `Args:` section.
    """

    def __init__(self, fn: Callable[..., object], *, numeric_strings: bool = False) -> None:
        # Imported here, not at module level: transformers takes ~0.5 s to import and
        # `import looprl.envs` should stay cheap.
        from transformers.utils import get_json_schema

        schema = get_json_schema(fn)
        schema["function"].pop("return", None)  # not part of the chat-template format
        self.fn = fn
        self.numeric_strings = numeric_strings
        self._schema = schema
        self._params: dict[str, Any] = schema["function"]["parameters"].get("properties", {})
        self._required: list[str] = schema["function"]["parameters"].get("required", [])

    @property
    def name(self) -> str:
        """The name the agent calls the tool by (the function's name)."""
        return self._schema["function"]["name"]

    @property
    def description(self) -> str:
        """The first line of the tool's description."""
        return self._schema["function"]["description"].split("\n", 1)[0]

    @property
    def schema(self) -> dict[str, Any]:
        """A fresh copy of `{"type": "function", "function": {name, description, parameters}}`."""
        return copy.deepcopy(self._schema)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the wrapped function directly, without checks (for Python callers)."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Tool({self.name!r})"

    def call(self, arguments: object) -> str:
        """Checks `arguments` against the schema, runs the function and returns its result.

        Args:
            arguments: The parsed JSON arguments the agent gave (should be a dict).

        Returns:
            `str(result)`, or `"Error: ..."` naming what was wrong: arguments that are
            not an object, an unknown or missing argument, a value of the wrong JSON
            type, or `"Error: <ExceptionType>: <message>"` when the function raised.
            Never raises (except `BaseException`s such as `KeyboardInterrupt`).
        """
        try:
            if self.numeric_strings and isinstance(arguments, dict):
                arguments = self._convert_numeric_strings(arguments)
            error = self._argument_error(arguments)
            if error is not None:
                return f"Error: {error}."
            return str(self.fn(**arguments))
        except Exception as e:  # a failing tool answers the agent; it never raises
            return _truncate(f"Error: {type(e).__name__}: {e}", MAX_ERROR_CHARS)

    def _argument_error(self, arguments: object) -> str | None:
        if not isinstance(arguments, dict):
            return f"arguments of {self.name} must be a JSON object, got {_json_type(arguments)}"
        for key in arguments:
            if key not in self._params:
                return f"{self.name} got unknown argument {_quote(key)}; {self._expected()}"
        for key in self._required:
            if key not in arguments:
                return f"{self.name} is missing required argument {_quote(key)}; {self._expected()}"
        for key, value in arguments.items():
            error = _type_error(value, self._params[key], key)
            if error is not None:
                path, problem = error
                return f"argument {_quote(path)} of {self.name} {problem}"
        return None

    def _expected(self) -> str:
        if not self._params:
            return "it takes no arguments"
        listed = ", ".join(f"{k} ({_describe_type(s)})" for k, s in self._params.items())
        return f"expected arguments: {listed}"

    def _convert_numeric_strings(self, arguments: dict[str, Any]) -> dict[str, Any]:
        converted = dict(arguments)
        for key, value in arguments.items():
            wants_number = _types(self._params.get(key, {})) & {"number", "integer"}
            if wants_number and isinstance(value, str) and _JSON_NUMBER.fullmatch(value.strip()):
                converted[key] = json.loads(value.strip())
        return converted


def tool(fn: Callable[..., object] | None = None, *, numeric_strings: bool = False) -> Any:
    """Decorator turning a typed, documented function into a `Tool`.

    Use as `@tool` or `@tool(numeric_strings=True)`; see `Tool` for the arguments.
    """
    if fn is None:
        return lambda f: Tool(f, numeric_strings=numeric_strings)
    return Tool(fn, numeric_strings=numeric_strings)


def _types(schema: dict[str, Any]) -> set[str]:
    declared = schema.get("type", [])
    return {declared} if isinstance(declared, str) else set(declared)


def _type_error(value: Any, schema: dict[str, Any], path: str) -> tuple[str, str] | None:
    """`(path, problem)` where `value` breaks `schema` (the subset get_json_schema emits)."""
    if value is None and schema.get("nullable"):
        return None
    if "enum" in schema and not any(
        value == option and _json_type(value) == _json_type(option) for option in schema["enum"]
    ):
        options = ", ".join(json.dumps(option) for option in schema["enum"])
        return path, f"must be one of {options}, got {_show(value)}"
    types = _types(schema)
    if types and not any(_is_json_type(value, t) for t in types):
        return path, f"must be {_describe_type(schema)}, got {_show(value)}"
    if isinstance(value, list):
        return _items_error(value, schema, path)
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            error = _type_error(item, schema["additionalProperties"], f"{path}[{json.dumps(key)}]")
            if error is not None:
                return error
    return None


def _items_error(value: list[Any], schema: dict[str, Any], path: str) -> tuple[str, str] | None:
    if "prefixItems" in schema:
        prefix = schema["prefixItems"]
        if len(value) != len(prefix):
            return path, f"must have {len(prefix)} items, got {len(value)}"
        pairs = zip(value, prefix, strict=True)
    elif "items" in schema:
        pairs = ((item, schema["items"]) for item in value)
    else:
        return None
    for index, (item, item_schema) in enumerate(pairs):
        error = _type_error(item, item_schema, f"{path}[{index}]")
        if error is not None:
            return error
    return None


def _is_json_type(value: Any, json_type: str) -> bool:
    checks: dict[str, Callable[[Any], bool]] = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
        "null": lambda v: v is None,
    }
    return checks.get(json_type, lambda v: True)(value)


def _json_type(value: Any) -> str:
    """The JSON type name of a parsed JSON value ("integer", "array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    for python_type, name in (
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, python_type):
            return name
    return type(value).__name__


def _describe_type(schema: dict[str, Any]) -> str:
    types = sorted(_types(schema)) or ["any value"]
    described = " or ".join(types)
    if "array" in types and isinstance(schema.get("items"), dict):
        described += f" of {_describe_type(schema['items'])}"
    return described


def _show(value: Any) -> str:
    """`integer 5`, `boolean true`, `string "5"`: the type and a short JSON rendering."""
    try:
        rendered = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        rendered = repr(value)
    return f"{_json_type(value)} {_truncate(rendered, 40)}"


def _quote(text: object, limit: int = 40) -> str:
    """A short JSON-quoted rendering of model-written text, safe to show back to it."""
    return json.dumps(_truncate(str(text), limit))


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
