"""`looprl/Code-v0`: write a Python function from a description and examples.

A task is a problem from the bank in `looprl.envs.code_tasks` (a function family with
drawn parameters, e.g. "the sum of the 3 largest numbers") plus test inputs drawn from
a per-task seed: a few visible examples in the prompt and hidden tests for grading.
`run_tests(code)` runs the code on the visible examples, `submit(code)` on the hidden
tests; the reward is the fraction of hidden tests passed. All model code runs in
`looprl.envs.sandbox`; expected outputs never leave this process.

The train/test split is by problem, not by test inputs: a (family, parameters) pair is
held out iff `sha256("<family>:<parameters>") % 5 == 0`, so no held-out problem
statement is ever trained on, whatever its examples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from looprl.envs.base import Task, ToolEnv
from looprl.envs.code_tasks import FAMILIES, FAMILIES_BY_NAME, Family, Params
from looprl.envs.parsing import format_tool_call
from looprl.envs.sandbox import CallOutcome, SandboxLimits, SandboxResult, run_function
from looprl.envs.tools import Tool

SPLITS = ("train", "test")
LEVELS = (1, 2, 3)
MAX_CODE_CHARS = 20_000
MAX_SHOWN_CHARS = 300  # one call or value, as shown to the agent
MAX_SHOWN_OUTPUT = 1_000  # printed output, as shown to the agent
MAX_SEED = 2**31
PREFIX = "code:"

Example = tuple[tuple[Any, ...], Any]  # (arguments, expected return value)


def params_key(params: Params) -> str:
    """The canonical text of a parameter set, as it appears in task ids."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def split_of(family: str, key: str) -> str:
    """`"test"` for the held-out fifth of problems (by sha256 of family and parameters)."""
    held_out = int(hashlib.sha256(f"{family}:{key}".encode()).hexdigest(), 16) % 5 == 0
    return "test" if held_out else "train"


@dataclass(frozen=True)
class CodeTask(Task):
    """A Code task.

    Attributes:
        family: The function family (also the function's name).
        params: The problem's parameters, canonical JSON.
        solution: The reference solution (what the oracle submits).
        visible: The examples shown in the prompt.
        hidden: The tests that grade a submission.
    """

    family: str = ""
    params: str = ""
    solution: str = ""
    visible: tuple[Example, ...] = ()
    hidden: tuple[Example, ...] = ()


class CodeEnv(ToolEnv):
    """Implement a Python function; `run_tests` on the examples, then `submit` for grading.

    Args:
        split: `"train"` or `"test"` (the held-out fifth of problems).
        difficulty: 1, 2 or 3: use the families of at most this level.
        families: If given, only these families (each at most `difficulty`).
        num_visible: Examples shown in the prompt and run by `run_tests` (1-10).
        num_hidden: Hidden tests that grade a submission (1-100).
        max_turns: Turns before the episode is truncated.
        grade_unsubmitted: When the turns run out before a submission, grade the code last
            given to `run_tests` as if it had been submitted (as AppWorld and SWE-bench grade
            the state an agent leaves, submitted or not); False gives such episodes 0. With 0,
            an agent that tests first risks a zero that submitting untested code does not.
        timeout_s: Wall-clock seconds per sandbox run (interpreter start included).
        memory_mb: Address-space limit of the sandboxed process, in MiB.

    Raises:
        ValueError: Any argument out of range, naming it and what was expected.
    """

    description: ClassVar[str] = (
        "Python functions: implement one from a description and examples, test it, submit it."
    )
    reward_description: ClassVar[str] = (
        "The fraction of hidden tests the submitted code passes (0.0 to 1.0); submit ends "
        "the episode. If the turns run out first, the code last given to run_tests is graded "
        "(grade_unsubmitted=False: the reward is 0)."
    )
    system_prompt: ClassVar[str] = (
        "Write the Python function the user asks for (standard library only). Check it with "
        "run_tests, then submit it; submit ends the episode and is graded on hidden tests."
    )

    def __init__(
        self,
        split: str = "train",
        difficulty: int = 2,
        families: Sequence[str] | None = None,
        num_visible: int = 3,
        num_hidden: int = 10,
        max_turns: int = 6,
        grade_unsubmitted: bool = True,
        timeout_s: float = 2.0,
        memory_mb: int = 256,
    ) -> None:
        _check_settings(split, difficulty, num_visible, num_hidden, timeout_s)
        if not isinstance(grade_unsubmitted, bool):
            raise ValueError(f"Expect `grade_unsubmitted` to be a bool, actually: {grade_unsubmitted!r}")
        self.grade_unsubmitted = grade_unsubmitted
        self.split = split
        self.difficulty = difficulty
        self.num_visible = num_visible
        self.num_hidden = num_hidden
        self.limits = SandboxLimits(timeout_s=float(timeout_s), memory_mb=memory_mb)
        self._problems = _problems(_select_families(difficulty, families), split)
        self._visible_passed = False
        self._last_tested: str | None = None
        super().__init__(tools=[Tool(self.run_tests), Tool(self.submit)], max_turns=max_turns)

    # --- tools -------------------------------------------------------------------

    def run_tests(self, code: str) -> str:
        """Run your code on the visible examples and see which pass.

        Args:
            code: Python source that defines the requested function.
        """
        code, problem = _prepared(code, self.task.family)
        if problem is not None:
            return f"Error: {problem}"
        self._last_tested = code
        examples = self.task.visible
        result = self._run(code, examples)
        passed = _passed(result, examples)
        self._visible_passed = all(passed)
        return _report_visible(self.task.family, examples, result, passed)

    def submit(self, code: str) -> str:
        """Submit your code to be graded on hidden tests. This ends the episode.

        Args:
            code: Python source that defines the requested function.
        """
        code, problem = _prepared(code, self.task.family)
        if problem is not None:
            return f"Error: {problem} Nothing was submitted."
        passed, why = self._grade(code)
        self._end_episode(reward=passed / self.num_hidden, success=passed == self.num_hidden)
        return f"Submitted: {passed}/{self.num_hidden} hidden tests passed.{why}"

    def _grade(self, code: str) -> tuple[int, str]:
        """Hidden tests passed by `code`, and why not all of them ("" if all)."""
        examples = self.task.hidden
        result = self._run(code, examples)
        return sum(_passed(result, examples)), _why_not_all(result)

    # --- ToolEnv -----------------------------------------------------------------

    @property
    def task(self) -> CodeTask:
        return super().task  # type: ignore[return-value]

    def _generate_task(self, rng: np.random.Generator) -> CodeTask:
        names = sorted(self._problems)  # families first, so each is equally likely
        name = names[int(rng.integers(len(names)))]
        params = self._problems[name][int(rng.integers(len(self._problems[name])))]
        return self._make_task(FAMILIES_BY_NAME[name], params, int(rng.integers(MAX_SEED)))

    def _task_from_id(self, task_id: str) -> CodeTask:
        name, key, seed = _parse_id(task_id)
        problem = self._id_problem(name, key, seed)
        if problem is not None:
            raise ValueError(f"Task id {task_id!r} cannot be posed by this environment: {problem}")
        params = next(p for p in self._problems[name] if params_key(p) == key)
        return self._make_task(FAMILIES_BY_NAME[name], params, int(seed))

    def _id_problem(self, name: str, key: str, seed: str) -> str | None:
        """What stops this env from posing the task `code:<name>:<key>:<seed>`, or None."""
        if name not in FAMILIES_BY_NAME:
            return f"unknown family {name!r}"
        if not any(params_key(p) == key for p in FAMILIES_BY_NAME[name].all_params()):
            return f"{name!r} does not take the parameters {key}"
        if split_of(name, key) != self.split:
            return f"it belongs to the {split_of(name, key)!r} split, not {self.split!r}"
        if name not in self._problems:
            return f"family {name!r} is not among its families ({', '.join(self._problems)})"
        if not (seed.isascii() and seed.isdigit() and str(int(seed)) == seed):
            return f"the seed must be an integer in [0, {MAX_SEED}), got {seed!r}"
        if int(seed) >= MAX_SEED:
            return f"the seed must be an integer in [0, {MAX_SEED}), got {seed!r}"
        return None

    def _start_episode(self, task: Task) -> None:
        self._visible_passed = False
        self._last_tested = None

    def _out_of_turns(self) -> str | None:
        if not self.grade_unsubmitted:
            return None
        if self._last_tested is None:
            return "Out of turns: no code was tested, so nothing was graded."
        passed, why = self._grade(self._last_tested)
        self._add_reward(passed / self.num_hidden)
        self._success = passed == self.num_hidden
        return f"Out of turns: the code last tested was graded: {passed}/{self.num_hidden} hidden tests passed.{why}"

    def oracle_action(self) -> str:
        """Runs the reference solution on the examples, then submits it."""
        if self._terminated or self._truncated:
            raise RuntimeError("The episode is over: the oracle has no next action; call reset().")
        last_turn = self._turn >= self.max_turns - 1
        tool = "submit" if self._visible_passed or last_turn else "run_tests"
        return format_tool_call(tool, {"code": self.task.solution})

    # --- tasks and runs ----------------------------------------------------------

    def _make_task(self, family: Family, params: Params, seed: int) -> CodeTask:
        key = params_key(params)
        rng = random.Random(f"{family.name}:{key}:{seed}")
        reference = _reference(family.name, key)
        examples = [
            _example(family, params, rng, reference)
            for _ in range(self.num_visible + self.num_hidden)
        ]
        visible = tuple(examples[: self.num_visible])
        lines = "\n".join(
            f"{_call_text(family.name, args)} == {_show(value)}" for args, value in visible
        )
        prompt = (
            f"Write a Python function `{family.signature}`.\n{family.description(params)}\n"
            f"Examples:\n{lines}"
        )
        return CodeTask(
            task_id=f"{PREFIX}{family.name}:{key}:{seed}",
            prompt=prompt,
            family=family.name,
            params=key,
            solution=family.reference(params),
            visible=visible,
            hidden=tuple(examples[self.num_visible :]),
        )

    def _run(self, code: str, examples: Sequence[Example]) -> SandboxResult:
        return run_function(code, self.task.family, [args for args, _ in examples], self.limits)


# --- grading -----------------------------------------------------------------------


def same(got: Any, expected: Any) -> bool:
    """Equal JSON values of equal JSON types (so `True` is not `1` and `2.0` is not `2`).

    Example:
        >>> same([1, "a"], [1, "a"]), same(True, 1), same(2.0, 2)
        (True, False, False)
    """
    if type(got) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(got) == len(expected) and all(map(same, got, expected))
    if isinstance(expected, dict):
        return got.keys() == expected.keys() and all(same(got[k], expected[k]) for k in expected)
    return bool(got == expected)


def _passed(result: SandboxResult, examples: Sequence[Example]) -> list[bool]:
    return [
        outcome is not None and outcome.error is None and same(outcome.value, expected)
        for outcome, (_, expected) in zip(result.calls, examples, strict=True)
    ]


def _report_visible(
    function: str, examples: Sequence[Example], result: SandboxResult, passed: list[bool]
) -> str:
    """Per-test verdicts, the first failure in detail, why the run stopped, and the output."""
    total = len(examples)
    if result.load_error is not None:
        text = f"0/{total} visible tests passed: your code failed before any test ran."
        text += f"\n{result.load_error}"
    else:
        verdicts = [_verdict(outcome, ok) for outcome, ok in zip(result.calls, passed, strict=True)]
        listed = ", ".join(f"test {i} {verdict}" for i, verdict in enumerate(verdicts, start=1))
        text = f"{sum(passed)}/{total} visible tests passed: {listed}."
        failed = [
            i for i, verdict in enumerate(verdicts) if verdict in ("failed", "raised an error")
        ]
        if failed:
            first = failed[0]
            text += "\n" + _failure(function, first, examples[first], result.calls[first])
    if result.problem is not None:
        text += f"\n{result.problem}."
    if result.output:
        text += "\nOutput:\n" + _cut(result.output.rstrip("\n"), MAX_SHOWN_OUTPUT)
    return text


def _verdict(outcome: CallOutcome | None, ok: bool) -> str:
    if outcome is None:
        return "did not finish"
    if ok:
        return "passed"
    return "raised an error" if outcome.error is not None else "failed"


def _failure(function: str, index: int, example: Example, outcome: CallOutcome) -> str:
    args, expected = example
    head = f"Test {index + 1}: {_call_text(function, args)}"
    if outcome.error is not None:
        return f"{head}\nraised: {outcome.error}"
    return f"{head}\nexpected: {_show(expected)}\ngot: {_show(outcome.value)}"


def _why_not_all(result: SandboxResult) -> str:
    if result.load_error is not None:
        return f" Your code failed before any test ran: {result.load_error.splitlines()[-1]}"
    return f" {result.problem}." if result.problem is not None else ""


# --- helpers -----------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _reference(name: str, key: str) -> Callable[..., Any]:
    """The reference solution as a function, compiled here (it is trusted code)."""
    namespace: dict[str, Any] = {}
    exec(FAMILIES_BY_NAME[name].reference(json.loads(key)), namespace)  # noqa: S102
    return namespace[name]


def _example(
    family: Family, params: Params, rng: random.Random, reference: Callable[..., Any]
) -> Example:
    args = family.inputs(rng, params)
    expected = reference(*json.loads(json.dumps(args)))  # on a copy: the inputs stay intact
    return tuple(args), json.loads(json.dumps(expected))  # tuples become lists, as in a run


def _prepared(code: object, function: str) -> tuple[str, str | None]:
    """The code without a Markdown fence around it, or what is wrong with it."""
    if not isinstance(code, str):
        return "", f"code must be a string, got {type(code).__name__}."
    if len(code) > MAX_CODE_CHARS:
        return "", f"code has {len(code)} characters; at most {MAX_CODE_CHARS} are allowed."
    stripped = code.strip()
    if stripped.startswith("```") and stripped.endswith("```") and stripped.count("\n") >= 1:
        stripped = stripped[stripped.index("\n") + 1 : -3]
    if not stripped.strip():
        return "", f"code is empty: write Python source that defines `{function}`."
    return stripped, None


def _call_text(function: str, args: Sequence[Any]) -> str:
    return _cut(f"{function}({', '.join(repr(arg) for arg in args)})", MAX_SHOWN_CHARS)


def _show(value: Any) -> str:
    return _cut(repr(value), MAX_SHOWN_CHARS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_id(task_id: str) -> tuple[str, str, str]:
    """`(family, parameters, seed)` from `code:<family>:<parameters>:<seed>`."""
    if not task_id.startswith(PREFIX):
        raise ValueError(
            f"Task id {task_id!r} is not a Code task id; expected 'code:<family>:<params>:<seed>'"
        )
    name, _, rest = task_id[len(PREFIX) :].partition(":")
    key, _, seed = rest.rpartition(":")
    return name, key, seed


def _select_families(difficulty: int, families: Sequence[str] | None) -> list[Family]:
    if families is None:
        return [f for f in FAMILIES if f.level <= difficulty]
    if isinstance(families, str) or not all(isinstance(n, str) for n in families) or not families:
        raise ValueError(
            f"Expect `families` to be a non-empty list of family names, actually: {families!r}"
        )
    for name in families:
        if name not in FAMILIES_BY_NAME:
            raise ValueError(
                f"Unknown family {name!r}; known families: {', '.join(FAMILIES_BY_NAME)}"
            )
        if FAMILIES_BY_NAME[name].level > difficulty:
            raise ValueError(
                f"Family {name!r} is level {FAMILIES_BY_NAME[name].level}, above `difficulty` "
                f"{difficulty}; raise `difficulty` to use it"
            )
    return [FAMILIES_BY_NAME[name] for name in dict.fromkeys(families)]


def _problems(families: Sequence[Family], split: str) -> dict[str, list[Params]]:
    """Each family's parameter sets in `split` (families with none are left out)."""
    problems = {}
    for family in families:
        in_split = [p for p in family.all_params() if split_of(family.name, params_key(p)) == split]
        if in_split:
            problems[family.name] = in_split
    if not problems:
        names = ", ".join(f.name for f in families)
        raise ValueError(f"No {split!r} problems in the families {names}; choose more families")
    return problems


def _check_settings(
    split: Any, difficulty: Any, num_visible: Any, num_hidden: Any, timeout_s: Any
) -> None:
    if split not in SPLITS:
        raise ValueError(f"Expect `split` to be 'train' or 'test', actually: {split!r}")
    if not isinstance(difficulty, int) or isinstance(difficulty, bool) or difficulty not in LEVELS:
        raise ValueError(f"Expect `difficulty` to be 1, 2 or 3, actually: {difficulty!r}")
    for name, value, high in (("num_visible", num_visible, 10), ("num_hidden", num_hidden, 100)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
            raise ValueError(f"Expect `{name}` to be an int from 1 to {high}, actually: {value!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)):
        raise ValueError(f"Expect `timeout_s` to be a number of seconds, actually: {timeout_s!r}")
