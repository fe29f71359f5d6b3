"""Adapters that turn other environments and datasets into looprl `ToolEnv`s.

`TextEnvAdapter` wraps any Gymnasium environment whose observation and action spaces
are `gymnasium.spaces.Text`: its action becomes one tool (`act(text)`), its
observations come back as tool results, and its reward, `terminated` and `truncated`
pass through. `register_text_env` registers an adapted id for `gymnasium.make`.

`DatasetEnv` (`looprl/Dataset-v0`) poses single-turn verifiable tasks from a JSONL
file of `{"prompt": ..., "answer": ...}` rows, graded by a reward function from
`looprl.envs.rewards` or your own.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gymnasium
import numpy as np

from looprl.envs.base import Task, ToolEnv
from looprl.envs.parsing import format_tool_call
from looprl.envs.tools import Tool

MAX_DRAWS = 10_000
TEXT_SPLITS = ("all", "train", "test")
ANSWER_MODES = ("tool", "text")
DEFAULT_TOOL_DESCRIPTION = "Take your next action in the game, written as text."
DEFAULT_REWARD_FN = "looprl.envs.rewards:exact_match"
_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
_PENDING = "\x00graded after the turn\x00"  # an answer's result until `_grade` replaces it


def split_of(content: str) -> str:
    """`"test"` for the held-out fifth of contents (by sha256), else `"train"`."""
    held_out = int(hashlib.sha256(content.encode("utf-8", "backslashreplace")).hexdigest(), 16)
    return "test" if held_out % 5 == 0 else "train"


# --- Text environments --------------------------------------------------------------


@dataclass(frozen=True)
class SeedTask(Task):
    """A task of a wrapped environment: the seed its `reset` is called with.

    Attributes:
        seed: The inner environment's reset seed.
    """

    seed: int = 0


class TextEnvAdapter(ToolEnv):
    """A Gymnasium environment with `Text` spaces, played through one tool.

    Each call of the tool (`act(text)` by default) steps the inner environment with
    `text` and returns its observation; a turn may hold several calls, run in order.
    A task is an inner reset seed (task id `"seed:<n>"`): `reset(seed=n)` resets the
    inner environment with seed `n` itself (with `split="all"`), and a history is
    replayed by stepping the inner environment again from that seed, so the inner
    environment must be deterministic given its seed and actions.

    Args:
        env: The environment to wrap (its observation and action spaces are `Text`).
        tool_name: The tool's name: a letter or `_`, then letters, digits, `_` or `-`.
        tool_description: The tool's description, shown to the agent.
        oracle_fn: `(inner_env) -> action text`, the expert that `oracle_action` calls
            with the inner environment; None if there is none.
        split: `"all"`, or `"train"`/`"test"` to keep only the seeds whose first
            observation falls in that split (by sha256 of its text, a fifth held out).
        max_turns: Turns before the episode is truncated (the inner environment may
            truncate earlier).
        system_prompt: The system message; None gives a one-line default naming the tool.

    Raises:
        ValueError: The spaces are not `Text`, or an argument is out of range.
    """

    reward_description: ClassVar[str] = "The wrapped environment's reward, passed through."

    def __init__(
        self,
        env: gymnasium.Env,
        tool_name: str = "act",
        tool_description: str = DEFAULT_TOOL_DESCRIPTION,
        oracle_fn: Callable[[gymnasium.Env], str] | None = None,
        split: str = "all",
        max_turns: int = 100,
        system_prompt: str | None = None,
    ) -> None:
        _check_text_spaces(env)
        _check_tool(tool_name, tool_description)
        if split not in TEXT_SPLITS:
            raise ValueError(f"Expect `split` to be 'all', 'train' or 'test', actually: {split!r}")
        if oracle_fn is not None and not callable(oracle_fn):
            raise ValueError(f"Expect `oracle_fn` to be callable or None, actually: {oracle_fn!r}")
        self.inner = env
        self.tool_name = tool_name
        self.oracle_fn = oracle_fn
        self.split = split
        name = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
        self.description = f"{name} (a text game): each action is a {tool_name}(text) call."
        self.system_prompt = system_prompt or f"Play by calling {tool_name} with your action."
        self._reset_seed: int | None = None
        self._inner_truncated = False
        self._inner_reward = 0.0
        tool = _text_tool(self._act, tool_name, tool_description)
        super().__init__(tools=[tool], max_turns=max_turns)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """`ToolEnv.reset`; with `split="all"` a given seed is the inner reset seed."""
        self._reset_seed = seed
        try:
            return super().reset(seed=seed, options=options)
        finally:
            self._reset_seed = None

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """`ToolEnv.step`, truncating the episode too when the inner environment truncates."""
        obs, reward, terminated, truncated, info = super().step(action)
        if self._inner_truncated and not (terminated or truncated):
            self._truncated = truncated = True
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        self.inner.close()
        super().close()

    # --- the tool ----------------------------------------------------------------

    def _act(self, text: str) -> str:
        if self._inner_truncated:
            return "Error: not run: the game ended at an earlier call this turn."
        if not self.inner.action_space.contains(text):
            return f"Error: {_text_problem(text, self.inner.action_space)}."
        obs, reward, terminated, truncated, info = self.inner.step(text)
        self._inner_reward += float(reward)
        self._add_reward(float(reward))
        if terminated:
            # Success is the inner env's own `info["success"]`, else a positive return.
            self._end_episode(0.0, success=bool(info.get("success", self._inner_reward > 0)))
        elif truncated:
            self._inner_truncated = True
        return obs

    # --- ToolEnv -----------------------------------------------------------------

    @property
    def task(self) -> SeedTask:
        return super().task  # type: ignore[return-value]

    def _generate_task(self, rng: np.random.Generator) -> SeedTask:
        if self.split == "all":
            seed = self._reset_seed
            return self._make_task(int(rng.integers(2**31)) if seed is None else seed)
        for _ in range(MAX_DRAWS):
            task = self._make_task(int(rng.integers(2**31)))
            if split_of(task.prompt) == self.split:
                return task
        raise RuntimeError(
            f"Found no {self.split!r} task in {MAX_DRAWS} seeds: the first observations fall "
            "in one split; use split='all'"
        )

    def _task_from_id(self, task_id: str) -> SeedTask:
        seed = task_id.removeprefix("seed:")
        if not task_id.startswith("seed:") or not (seed.isascii() and seed.isdigit()):
            raise ValueError(
                f"Task id {task_id!r:.100} is not a text-env task id; expected 'seed:<n>'"
            )
        task = self._make_task(int(seed))
        if self.split != "all" and split_of(task.prompt) != self.split:
            raise ValueError(
                f"Task id {task_id!r} cannot be posed by this environment: its first "
                f"observation belongs to the {split_of(task.prompt)!r} split, not {self.split!r}"
            )
        return task

    def _start_episode(self, task: Task) -> None:
        assert isinstance(task, SeedTask)
        self.inner.reset(seed=task.seed)
        self._inner_truncated = False
        self._inner_reward = 0.0

    def oracle_action(self) -> str:
        if self.oracle_fn is None:
            raise NotImplementedError(
                "This TextEnvAdapter has no oracle: pass oracle_fn=(inner_env) -> action text"
            )
        if self._terminated or self._truncated:
            raise RuntimeError("The episode is over: the oracle has no next action; call reset().")
        return format_tool_call(self.tool_name, {"text": self.oracle_fn(self.inner)})

    def _make_task(self, seed: int) -> SeedTask:
        obs, _ = self.inner.reset(seed=seed)
        return SeedTask(task_id=f"seed:{seed}", prompt=obs, seed=seed)


def make_text_env(
    env_id: str, env_kwargs: dict[str, Any] | None = None, **adapter_kwargs: Any
) -> TextEnvAdapter:
    """`TextEnvAdapter(gymnasium.make(env_id, **env_kwargs), **adapter_kwargs)`.

    The entry point that `register_text_env` registers, so `gymnasium.make` can build
    an adapted id with its own kwargs.
    """
    return TextEnvAdapter(gymnasium.make(env_id, **(env_kwargs or {})), **adapter_kwargs)


def register_text_env(
    id: str, env_id: str, env_kwargs: dict[str, Any] | None = None, **adapter_kwargs: Any
) -> None:
    """Registers `id` as the text environment `env_id` wrapped in a `TextEnvAdapter`.

    Example:
        `register_text_env("looprl/Wordle-v0", "my_games/Wordle-v0", oracle_fn=solve)`,
        then `gymnasium.make("looprl/Wordle-v0", max_turns=12)`.

    Args:
        id: The new id.
        env_id: The registered id of the environment to wrap.
        env_kwargs: Its constructor arguments.
        **adapter_kwargs: `TextEnvAdapter` arguments (`tool_name`, `oracle_fn`, ...).
    """
    gymnasium.register(
        id=id,
        entry_point="looprl.envs.adapters:make_text_env",
        kwargs={"env_id": env_id, "env_kwargs": env_kwargs, **adapter_kwargs},
    )


def _text_tool(act: Callable[[str], str], name: str, description: str) -> Tool:
    """A one-argument tool named `name` that calls `act(text)`."""

    def tool_fn(text: str) -> str:
        return act(text)

    tool_fn.__name__ = tool_fn.__qualname__ = name
    tool_fn.__doc__ = f"{description}\n\nArgs:\n    text: Your action, as text."
    return Tool(tool_fn)


def _check_text_spaces(env: Any) -> None:
    if not isinstance(env, gymnasium.Env):
        raise ValueError(f"Expect `env` to be a gymnasium.Env, actually: {type(env).__name__}")
    spaces = {"observation_space": env.observation_space, "action_space": env.action_space}
    for name, space in spaces.items():
        if not isinstance(space, gymnasium.spaces.Text):
            raise ValueError(
                f"TextEnvAdapter wraps environments whose observation and action spaces are "
                f"gymnasium.spaces.Text; this one's {name} is {space}"
            )


def _check_tool(name: Any, description: Any) -> None:
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise ValueError(
            "Expect `tool_name` to be a letter or '_' then up to 63 letters, digits, '_' "
            f"or '-', actually: {name!r:.80}"
        )
    if not isinstance(description, str) or not description.strip():
        raise ValueError(
            f"Expect `tool_description` to be non-empty text, actually: {description!r:.80}"
        )


def _text_problem(text: str, space: gymnasium.spaces.Text) -> str:
    """Why `text` is not in `space`."""
    if not space.min_length <= len(text) <= space.max_length:
        return (
            f"the text must have {space.min_length} to {space.max_length} characters, "
            f"got {len(text)}"
        )
    bad = next(c for c in text if c not in space.character_set)
    return f"the text holds {bad!r}, which is not one of the characters this game accepts"


# --- Datasets -----------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetTask(Task):
    """One dataset row.

    Attributes:
        answer: The reference answer the reward function compares with.
        line: Where the row is in its file (0 for built-in rows).
    """

    answer: str = ""
    line: int = 0


def builtin_rows() -> list[DatasetTask]:
    """The rows used when no `path` is given: 242 small sums and products."""
    rows = []
    for a in range(2, 13):
        for b in range(2, 13):
            for word, value in (("plus", a + b), ("times", a * b)):
                prompt = f"What is {a} {word} {b}? Answer with the number."
                rows.append(DatasetTask(_default_id(prompt), prompt, str(value)))
    return rows


def load_rows(path: str | os.PathLike[str]) -> list[DatasetTask]:
    """Reads and checks a JSONL file of `{"prompt": str, "answer": str, "id": ...}` rows.

    Blank lines are skipped. An answer may be a JSON number (it is read as its text);
    `id` (a string or an integer) is optional, by default derived from the prompt.
    Other keys are ignored.

    Raises:
        FileNotFoundError: No file at `path`.
        ValueError: A bad row, naming the file, the line number and the problem: a line
            that is not valid UTF-8 or JSON, not an object, a missing `prompt` or
            `answer`, one that is not a non-empty string, or a duplicate id. Also a
            file with no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset file {str(path)!r} does not exist (or is not a file)")
    rows: list[DatasetTask] = []
    first_line_of: dict[str, int] = {}
    for number, line in _lines(path):
        row = _parse_row(line, path, number)
        if row.task_id in first_line_of:
            raise ValueError(
                f"{path}, line {number}: duplicate id {row.task_id!r} (first on line "
                f"{first_line_of[row.task_id]}); rows without an id are named by their prompt"
            )
        first_line_of[row.task_id] = number
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows; expected one JSON object per line")
    return rows


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid UTF-8 ({e.reason})") from None
            if line.strip():
                yield number, line


def _parse_row(line: str, path: Path, number: int) -> DatasetTask:
    where = f"{path}, line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
    except (ValueError, RecursionError) as e:  # a number with too many digits; nesting
        raise ValueError(f"{where}: invalid JSON: {type(e).__name__}") from None
    if not isinstance(row, dict):
        raise ValueError(f'{where}: expected a JSON object with "prompt" and "answer"')
    for key in ("prompt", "answer"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}; expected \"prompt\" and \"answer\"")
    answer = row["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = json.dumps(answer)  # `42` -> "42", as written
    for key, value in (("prompt", row["prompt"]), ("answer", answer)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{where}: {key!r} must be a non-empty string, got {_json_kind(value)}"
            )
    return DatasetTask(_row_id(row, where), row["prompt"], answer, number)


def _row_id(row: dict[str, Any], where: str) -> str:
    if "id" not in row:
        return _default_id(row["prompt"])
    row_id = row["id"]
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        return str(row_id)
    if isinstance(row_id, str) and row_id.strip():
        return row_id
    raise ValueError(
        f"{where}: 'id' must be a non-empty string or an integer, got {_json_kind(row_id)}"
    )


def _default_id(prompt: str) -> str:
    return "prompt-" + hashlib.sha256(prompt.encode("utf-8", "backslashreplace")).hexdigest()[:16]


def _json_kind(value: Any) -> str:
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    names = {type(None): "null", bool: "a boolean", list: "an array", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def load_reward_fn(reward_fn: str | Callable[..., float]) -> Callable[..., float]:
    """The reward function named by `"module.path:function"`, or `reward_fn` if callable.

    Raises:
        ValueError: Not a callable, not of the form `module:name`, or nothing callable there.
    """
    if callable(reward_fn):
        return reward_fn
    if not isinstance(reward_fn, str) or reward_fn.count(":") != 1:
        raise ValueError(
            "Expect `reward_fn` to be a callable or an import path 'module.path:function' "
            f"(e.g. {DEFAULT_REWARD_FN!r}), actually: {reward_fn!r:.100}"
        )
    module_name, name = reward_fn.split(":")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"Cannot load reward_fn {reward_fn!r}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward_fn {reward_fn!r} is not callable: {fn!r:.100}")
    return fn


class DatasetEnv(ToolEnv):
    """Single-turn verifiable tasks from a JSONL file, graded by a reward function.

    With `answer_mode="tool"` the agent answers by calling `answer(text)`, which ends
    the episode; a turn without that call gets an error message and another turn,
    up to `max_turns`. With `answer_mode="text"` the whole text of the agent's one
    turn is the answer (single-turn RLVR data); the episode always ends after it.
    Either way the reward is `reward_fn(completion, answer, prompt=prompt)` for the
    answer text, and `info["success"]` is whether it is at least 1.0.

    Args:
        path: A JSONL file (see `load_rows`); None uses `builtin_rows()`.
        reward_fn: A callable `(completion, answer, **kw) -> float`, or its import
            path, e.g. `"looprl.envs.rewards:numeric_match"`.
        split: `"train"`, `"test"` (the fifth of rows held out by sha256 of the
            prompt) or `"all"` (for a file that is already one split).
        answer_mode: `"tool"` or `"text"`.
        max_turns: Turns before truncation; None gives 3 for `"tool"`, and `"text"`
            allows only 1.
        system_prompt: The system message; None gives a one-line default.

    Raises:
        ValueError: A bad argument, a bad row (see `load_rows`), or an empty split.
        FileNotFoundError: No file at `path`.
    """

    description: ClassVar[str] = "Verifiable single-turn questions from a JSONL dataset."
    reward_description: ClassVar[str] = (
        "reward_fn(answer text, reference answer): by default 1.0 for an exact match "
        "(ignoring case and whitespace), else 0.0; the episode ends at the first answer."
    )

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        reward_fn: str | Callable[..., float] = DEFAULT_REWARD_FN,
        split: str = "train",
        answer_mode: str = "tool",
        max_turns: int | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if split not in TEXT_SPLITS:
            raise ValueError(f"Expect `split` to be 'train', 'test' or 'all', actually: {split!r}")
        if answer_mode not in ANSWER_MODES:
            raise ValueError(
                f"Expect `answer_mode` to be 'tool' or 'text', actually: {answer_mode!r}"
            )
        if answer_mode == "text" and max_turns not in (None, 1):
            raise ValueError(
                "answer_mode='text' answers in one turn: expect `max_turns` None or 1, "
                f"actually: {max_turns!r}"
            )
        self.reward_fn = load_reward_fn(reward_fn)
        named = reward_fn if isinstance(reward_fn, str) else getattr(reward_fn, "__qualname__", "")
        self.reward_description = (
            f"{named or repr(reward_fn)}(answer text, reference answer); "
            "the episode ends at the first answer."
        )
        self.answer_mode = answer_mode
        self.split = split
        source = "the built-in rows" if path is None else str(path)
        rows = builtin_rows() if path is None else load_rows(path)
        self.rows = [r for r in rows if split == "all" or split_of(r.prompt) == split]
        if not self.rows:
            raise ValueError(
                f"No row of {source} falls in split {split!r} ({len(rows)} rows in all); "
                "use split='all' for a file that is already one split"
            )
        self._rows_by_id = {r.task_id: r for r in self.rows}
        self._submitted: str | None = None
        self.system_prompt = system_prompt or (
            "Answer the question by calling the answer tool."
            if answer_mode == "tool"
            else "Answer the question."
        )
        tools = [Tool(self.answer)] if answer_mode == "tool" else []
        default_turns = 3 if answer_mode == "tool" else 1
        super().__init__(tools=tools, max_turns=default_turns if max_turns is None else max_turns)

    # --- the tool ----------------------------------------------------------------

    def answer(self, text: str) -> str:
        """Submit your final answer. This ends the episode.

        Args:
            text: Your answer.
        """
        # Graded in `_run_turn`, outside `Tool.call`, so that a failing reward function
        # raises (as in TRL or verl) instead of becoming a message to the agent.
        self._submitted = text
        self._end_episode(0.0, success=False)
        return _PENDING

    # --- ToolEnv -----------------------------------------------------------------

    @property
    def task(self) -> DatasetTask:
        return super().task  # type: ignore[return-value]

    def task_ids(self) -> list[str]:
        """The ids of the split's rows, in file order."""
        return [r.task_id for r in self.rows]

    def _generate_task(self, rng: np.random.Generator) -> DatasetTask:
        return self.rows[int(rng.integers(len(self.rows)))]

    def _task_from_id(self, task_id: str) -> DatasetTask:
        if task_id not in self._rows_by_id:
            raise ValueError(
                f"Task id {task_id!r:.100} is not the id of a row in split {self.split!r}"
            )
        return self._rows_by_id[task_id]

    def _start_episode(self, task: Task) -> None:
        self._submitted = None

    def _run_turn(self, action: object) -> list[tuple[str, str]]:
        if self.answer_mode == "text" and isinstance(action, str):
            return [("grader", self._grade(action))]
        results = super()._run_turn(action)
        if self._submitted is None:
            return results
        return [(n, self._grade(self._submitted) if c == _PENDING else c) for n, c in results]

    def _grade(self, completion: str) -> str:
        task = self.task
        reward = self.reward_fn(completion, task.answer, prompt=task.prompt)
        number = isinstance(reward, numbers.Real) and not isinstance(reward, bool)
        if not number or not math.isfinite(reward):
            raise TypeError(
                f"reward_fn {self.reward_fn!r:.80} must return a finite float, "
                f"returned {reward!r:.80}"
            )
        self._end_episode(float(reward), success=reward >= 1.0)
        return f"Answer recorded; reward {float(reward):g}."

    def oracle_action(self) -> str:
        if self._terminated or self._truncated:
            raise RuntimeError("The episode is over: the oracle has no next action; call reset().")
        if self.answer_mode == "text":
            return self.task.answer
        return format_tool_call("answer", {"text": self.task.answer})

