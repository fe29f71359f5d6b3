"""`looprl/Calc-v0`: arithmetic tasks solved by calling `calculator`, then `answer`.

Tasks are drawn from the env's seeded RNG: `num_operands` integers in
`[min_operand, max_operand]` joined by operators from `operators`, e.g.
`Compute 7 + 12 * 3.` The train/test split is by content: an expression is held out
iff `int(sha256(expression).hexdigest(), 16) % 5 == 0`, so no test task is ever
trained on.
"""

from __future__ import annotations

import ast
import hashlib
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from looprl.envs.base import Task, ToolEnv
from looprl.envs.parsing import format_tool_call
from looprl.envs.tools import Tool

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e12
MAX_DRAWS = 10_000
OPERATORS = "+-*/"
SPLITS = ("train", "test")

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculate(expression: str) -> int | float:
    """Evaluates `+ - * /`, parentheses and unary minus on numbers, without `eval`.

    Args:
        expression: At most 200 characters; every number and intermediate result
            must be at most 1e12 in magnitude.

    Returns:
        The value (an int unless a division or a float literal made it a float).

    Raises:
        ValueError: The expression is too long, not arithmetic, uses anything but
            numbers, `+ - * /` and parentheses, or a number is too large.
        ZeroDivisionError: It divides by zero.

    Example:
        >>> calculate("7 + 12 * 3"), calculate("-(1 + 2) / 4")
        (43, -0.75)
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(
            f"expression has {len(expression)} characters, at most {MAX_EXPRESSION_CHARS} allowed"
        )
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):  # ValueError: null bytes
        raise ValueError(
            "not an arithmetic expression; use numbers, + - * / and parentheses"
        ) from None
    return _evaluate(tree.body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _bounded(_BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    what = (
        type(node.op).__name__
        if isinstance(node, (ast.BinOp, ast.UnaryOp))
        else type(node).__name__
    )
    raise ValueError(
        f"unsupported syntax ({what}); only numbers, + - * / and parentheses are allowed"
    )


def _bounded(value: int | float) -> int | float:
    if not abs(value) <= MAX_MAGNITUDE:  # also catches nan and inf
        raise ValueError(f"number too large: magnitudes must be at most {MAX_MAGNITUDE:.0e}")
    return value


def format_number(value: int | float) -> str:
    """`"19"` for integral values, else the value rounded to 6 decimals (`"0.333333"`)."""
    rounded = round(value, 6)
    if float(rounded).is_integer():
        return str(int(rounded))
    return f"{rounded:.15g}"


def split_of(expression: str) -> str:
    """`"test"` for the held-out fifth of expressions (by sha256), else `"train"`."""
    held_out = int(hashlib.sha256(expression.encode()).hexdigest(), 16) % 5 == 0
    return "test" if held_out else "train"


@dataclass(frozen=True)
class CalcTask(Task):
    """A Calc task.

    Attributes:
        expression: The expression, e.g. `"7 + 12 * 3"`.
        truth: Its exact value.
    """

    expression: str = ""
    truth: int | float = 0


class CalcEnv(ToolEnv):
    """Compute an arithmetic expression with the `calculator` tool, then `answer` it.

    Args:
        split: `"train"` or `"test"` (the held-out fifth of expressions).
        min_operand: Smallest operand (>= 0).
        max_operand: Largest operand; `max_operand ** num_operands` must be <= 1e12.
        num_operands: Operands per expression, 2 to 32.
        operators: Distinct characters from `"+-*/"` to draw operators from.
        max_turns: Turns before the episode is truncated.

    Raises:
        ValueError: Any argument out of range, naming it and what was expected.
    """

    description: ClassVar[str] = (
        "Arithmetic: call the calculator on an expression, then answer its value."
    )
    reward_description: ClassVar[str] = (
        "1.0 for a correct answer (within 1e-6), else 0.0; the first answer ends the episode."
    )
    system_prompt: ClassVar[str] = "Use the calculator, then answer."

    def __init__(
        self,
        split: str = "train",
        min_operand: int = 1,
        max_operand: int = 20,
        num_operands: int = 2,
        operators: str = "+-*",
        max_turns: int = 4,
    ) -> None:
        _check_settings(split, min_operand, max_operand, num_operands, operators)
        self.split = split
        self.min_operand = min_operand
        self.max_operand = max_operand
        self.num_operands = num_operands
        self.operators = operators
        self._calculated = False
        tools = [Tool(self.calculator), Tool(self.answer, numeric_strings=True)]
        super().__init__(tools=tools, max_turns=max_turns)

    # --- tools -------------------------------------------------------------------

    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression with + - * / and parentheses.

        Args:
            expression: The expression, e.g. "7 + 12 * 3".
        """
        result = format_number(calculate(expression))
        if _normalize(expression) == _normalize(self.task.expression):
            self._calculated = True
        return result

    def answer(self, value: float) -> str:
        """Submit the final answer. This ends the episode.

        Args:
            value: The value of the expression.
        """
        correct = _is_close(value, self.task.truth)
        self._end_episode(reward=1.0 if correct else 0.0, success=correct)
        return "Correct." if correct else "Incorrect."

    # --- ToolEnv -----------------------------------------------------------------

    @property
    def task(self) -> CalcTask:
        return super().task  # type: ignore[return-value]

    def _generate_task(self, rng: np.random.Generator) -> CalcTask:
        for _ in range(MAX_DRAWS):
            task = self._task_or_none(self._draw_expression(rng))
            if task is not None:
                return task
        raise RuntimeError(
            f"Found no {self.split!r} task in {MAX_DRAWS} draws with operands in "
            f"[{self.min_operand}, {self.max_operand}] and operators {self.operators!r}; "
            "widen the operand range"
        )

    def _task_from_id(self, task_id: str) -> CalcTask:
        if not task_id.startswith("calc:"):
            raise ValueError(
                f"Task id {task_id!r} is not a Calc task id; expected 'calc:<expression>'"
            )
        expression = task_id[len("calc:") :]
        problem = self._expression_problem(expression)
        if problem is not None:
            raise ValueError(f"Task id {task_id!r} cannot be posed by this environment: {problem}")
        return self._make_task(expression)

    def _start_episode(self, task: Task) -> None:
        self._calculated = False

    def oracle_action(self) -> str:
        if self._terminated or self._truncated:
            raise RuntimeError("The episode is over: the oracle has no next action; call reset().")
        if self._calculated:
            return format_tool_call("answer", {"value": _json_number(self.task.truth)})
        return format_tool_call("calculator", {"expression": self.task.expression})

    # --- tasks -------------------------------------------------------------------

    def _draw_expression(self, rng: np.random.Generator) -> str:
        operands = rng.integers(self.min_operand, self.max_operand + 1, size=self.num_operands)
        picks = rng.integers(0, len(self.operators), size=self.num_operands - 1)
        tokens = [str(int(operands[0]))]
        for pick, operand in zip(picks, operands[1:], strict=True):
            tokens += [self.operators[int(pick)], str(int(operand))]
        return " ".join(tokens)

    def _task_or_none(self, expression: str) -> CalcTask | None:
        if split_of(expression) != self.split:
            return None
        try:
            return self._make_task(expression)
        except (ValueError, ZeroDivisionError):
            return None

    def _make_task(self, expression: str) -> CalcTask:
        return CalcTask(
            task_id=f"calc:{expression}",
            prompt=f"Compute {expression}.",
            expression=expression,
            truth=calculate(expression),
        )

    def _expression_problem(self, expression: str) -> str | None:
        """What stops this env from posing `expression`, or None."""
        tokens = expression.split(" ")
        if len(tokens) != 2 * self.num_operands - 1:
            return f"expected {self.num_operands} operands separated by single spaces and operators"
        for operand in tokens[0::2]:
            if not (operand.isascii() and operand.isdigit()) or str(int(operand)) != operand:
                return f"operand {operand!r} is not a plain non-negative integer"
            if not self.min_operand <= int(operand) <= self.max_operand:
                return f"operand {operand} is outside [{self.min_operand}, {self.max_operand}]"
        for symbol in tokens[1::2]:
            if len(symbol) != 1 or symbol not in self.operators:
                return f"operator {symbol!r} is not one of {self.operators!r}"
        if split_of(expression) != self.split:
            return f"it belongs to the {split_of(expression)!r} split, not {self.split!r}"
        try:
            calculate(expression)
        except (ValueError, ZeroDivisionError) as e:
            return f"it cannot be evaluated ({e})"
        return None


def _check_settings(
    split: Any, min_operand: Any, max_operand: Any, num_operands: Any, operators: Any
) -> None:
    if split not in SPLITS:
        raise ValueError(f"Expect `split` to be 'train' or 'test', actually: {split!r}")
    for name, value in (
        ("min_operand", min_operand),
        ("max_operand", max_operand),
        ("num_operands", num_operands),
    ):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"Expect `{name}` to be an int, actually: {value!r}")
    if not 0 <= min_operand <= max_operand:
        raise ValueError(
            f"Expect 0 <= `min_operand` <= `max_operand`, actually: {min_operand} and {max_operand}"
        )
    if not 2 <= num_operands <= 32:
        raise ValueError(f"Expect `num_operands` to be between 2 and 32, actually: {num_operands}")
    if max_operand**num_operands > MAX_MAGNITUDE:
        raise ValueError(
            f"Expect `max_operand ** num_operands` <= 1e12 so every result fits the calculator, "
            f"actually: {max_operand} ** {num_operands}"
        )
    if (
        not isinstance(operators, str)
        or not operators
        or len(set(operators)) != len(operators)
        or not set(operators) <= set(OPERATORS)
    ):
        raise ValueError(
            f"Expect `operators` to be distinct characters from {OPERATORS!r}, "
            f"actually: {operators!r}"
        )


def _normalize(expression: str) -> str:
    return "".join(expression.split())


def _is_close(value: float, truth: int | float) -> bool:
    """|value - truth| < 1e-6, with a 1e-9 relative slack where floats are coarser than that."""
    try:
        return abs(float(value) - truth) < max(1e-6, 1e-9 * abs(truth))
    except OverflowError:  # an int too large for a float is not close to any truth
        return False


def _json_number(value: int | float) -> int | float:
    return int(value) if float(value).is_integer() else value
