"""`ToolEnv`: the environment contract of docs/architecture.md ("Contracts"), text in and text out.

The action is the assistant's raw text for one turn; the environment parses the
Hermes/Qwen tool calls in it, runs them, and returns their results as the next
observation (and as `role: tool` chat messages in `info["messages"]`). A subclass
supplies the task generator, the tools, and a scripted expert (`oracle_action`).
"""

from __future__ import annotations

import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium
import numpy as np

from looprl.envs.parsing import parse_action
from looprl.envs.tools import Tool, _quote

RESET_OPTIONS = ("history", "task")


class UnicodeText(gymnasium.spaces.Text):
    """A `Text` space holding any string of at most `max_length` characters.

    Model text and tool output may hold any Unicode character, so `contains` accepts
    every `str`; `sample` draws from printable ASCII, which is all a random-text probe
    (such as Gymnasium's env checker) needs.

    Args:
        max_length: The longest string in the space.
    """

    def __init__(self, max_length: int) -> None:
        super().__init__(max_length=max_length, min_length=0, charset=string.printable)

    def contains(self, x: Any) -> bool:
        return isinstance(x, str) and len(x) <= self.max_length

    def __repr__(self) -> str:
        return f"UnicodeText({self.max_length})"


@dataclass(frozen=True)
class Task:
    """One task: what the agent is asked, under a stable id.

    Attributes:
        task_id: Identifies the task across runs (`reset(options={"task": task_id})`).
        prompt: The user message, also the first observation.
    """

    task_id: str
    prompt: str


class ToolEnv(gymnasium.Env[str, str], ABC):
    """A multi-turn tool-use environment whose actions and observations are text.

    Subclasses set the class attributes, pass their tools to `__init__`, and implement
    `_generate_task`, `_task_from_id`, `_start_episode` and `oracle_action`. Tools are
    usually bound methods so that they can read and change per-episode state; a tool
    that ends the episode calls `_end_episode`.

    The environment counts turns itself (so that a replayed history counts too) and
    truncates after `max_turns`; it needs no `TimeLimit` wrapper.

    Args:
        tools: The tools the agent may call.
        max_turns: Turns (assistant actions) before the episode is truncated.

    Raises:
        ValueError: `max_turns` is not a positive int.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}
    description: ClassVar[str] = ""
    reward_description: ClassVar[str] = ""
    system_prompt: ClassVar[str] = ""
    max_text_length: ClassVar[int] = 100_000

    def __init__(self, tools: Sequence[Tool], max_turns: int) -> None:
        if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
            raise ValueError(f"Expect `max_turns` to be a positive int, actually: {max_turns!r}")
        self.max_turns = max_turns
        self.tools = list(tools)
        self._tools_by_name = {t.name: t for t in self.tools}
        self.action_space = UnicodeText(self.max_text_length)
        self.observation_space = UnicodeText(self.max_text_length)
        self._task: Task | None = None
        # The conversation so far, kept only while `reset` replays a history (the one
        # place that returns it), so that an episode of any length holds O(1) messages.
        self._messages: list[dict[str, str]] = []
        self._recording = False
        self._turn = 0
        self._reward = 0.0
        self._success = False
        self._terminated = False
        self._truncated = False

    # --- what a subclass provides ------------------------------------------------

    @abstractmethod
    def _generate_task(self, rng: np.random.Generator) -> Task:
        """Draws a task with `rng` (the env's seeded `np_random`)."""

    @abstractmethod
    def _task_from_id(self, task_id: str) -> Task:
        """The task with id `task_id`; raises `ValueError` if this env cannot pose it."""

    @abstractmethod
    def _start_episode(self, task: Task) -> None:
        """Resets the per-episode state the tools use, for `task`."""

    @abstractmethod
    def oracle_action(self) -> str:
        """The scripted expert's next action for the current state (also after a replay)."""

    def task_ids(self) -> list[str] | None:
        """Every task this environment poses, in order, when its tasks are a finite
        dataset (`looprl eval` then plays each once, by id); None when tasks are
        generated from seeds, as by default."""
        return None

    def _end_episode(self, reward: float, success: bool) -> None:
        """Called by a tool to end the episode (terminated) with `reward` for this turn."""
        self._reward += reward
        self._success = success
        self._terminated = True

    def _out_of_turns(self) -> str | None:
        """Called once when the episode runs out of turns without ending. A subclass that
        grades unfinished work sets this turn's reward and success here (`_add_reward`,
        `_success`) and returns the text the agent is told; the default grades nothing."""
        return None

    def _add_reward(self, reward: float) -> None:
        """Called by a tool to add `reward` to this turn's reward without ending the episode.

        For shaped, per-step rewards: a turn's reward is the sum of what its tool calls
        added (and what `_end_episode` added), starting from 0.0 each turn.
        """
        self._reward += reward

    # --- Gymnasium API -----------------------------------------------------------

    @property
    def task(self) -> Task:
        """The current task (after `reset`)."""
        if self._task is None:
            raise RuntimeError("No task yet: call reset() first.")
        return self._task

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Starts an episode on a sampled task, or a given one, optionally replaying turns.

        Args:
            seed: Seeds `np_random`, from which the task is drawn.
            options: `"task"`: a task id to start instead of sampling one.
                `"history"`: assistant actions to replay after the task is set, which
                restores any unfinished episode deterministically.

        Returns:
            `(obs, info)`. Without history, `obs` is the task prompt and
            `info["messages"]` is `[system, user]`. With a history of n actions, `obs`
            is the observation of the last replayed step and `info["messages"]` is the
            FULL conversation so far, assistant and tool messages included.
            `info` also holds `"tools"` (JSON schemas), `"task_id"`, `"turn"` and
            `"replayed"` (n).

        Raises:
            ValueError: An unknown option key, a history that is not a list of str or
                that ends the episode, or a task id this environment cannot pose.
        """
        super().reset(seed=seed)
        history, task_id = _read_options(options)
        task = (
            self._generate_task(self.np_random) if task_id is None else self._task_from_id(task_id)
        )
        self._begin(task)
        obs = task.prompt
        self._recording = True
        try:
            for action in history:
                obs = self.step(action)[0]
        finally:
            self._recording = False
        if self._terminated or self._truncated:
            raise ValueError(
                f"options['history'] ends the episode after {self._turn} of {len(history)} "
                "actions; replay restores only unfinished episodes"
            )
        info = {
            "messages": [dict(m) for m in self._messages],
            "tools": [t.schema for t in self.tools],
            "task_id": task.task_id,
            "turn": self._turn,
            "replayed": len(history),
        }
        self._messages = []  # returned above; stepping on does not need them
        return obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """Runs the tool calls in one assistant turn.

        Args:
            action: The assistant's raw text for the turn.

        Returns:
            `(obs, reward, terminated, truncated, info)`: `obs` is the tool results
            joined by newlines; `info["messages"]` holds one tool message per call (plus
            one for parse errors), `info["success"]` whether the task was solved,
            `info["turn"]` the turns taken and `info["errors"]` how many results were
            errors. Never raises on bad model output: it becomes error text.
        """
        if self._task is None:
            raise RuntimeError("Call reset() before step().")
        if self._terminated or self._truncated:
            return self._step_after_end()
        self._turn += 1
        self._reward = 0.0
        text = action if isinstance(action, str) else ""
        results = self._run_turn(action)
        self._truncated = not self._terminated and self._turn >= self.max_turns
        if self._truncated:
            verdict = self._out_of_turns()
            if verdict is not None:
                results.append(("out_of_turns", verdict))
        messages = [{"role": "tool", "name": name, "content": _valid_utf8(content)} for name, content in results]
        if self._recording:  # a replay returns the whole conversation; see `__init__`
            self._messages.append({"role": "assistant", "content": text})
            self._messages.extend(dict(m) for m in messages)
        obs = _fit("\n".join(m["content"] for m in messages), self.max_text_length)
        return obs, self._reward, self._terminated, self._truncated, self._step_info(messages)

    # --- one turn ----------------------------------------------------------------

    def _begin(self, task: Task) -> None:
        self._task = task
        self._messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": task.prompt},
        ]
        self._turn = 0
        self._reward = 0.0
        self._success = False
        self._terminated = False
        self._truncated = False
        self._start_episode(task)

    def _run_turn(self, action: object) -> list[tuple[str, str]]:
        """`(tool name or "error", result text)` for each call in the turn, in order."""
        if not isinstance(action, str):
            return [
                ("error", f"Error: the action must be text (a str), got {type(action).__name__}.")
            ]
        parsed = parse_action(action)
        results = [self._call(call.name, call.arguments) for call in parsed.tool_calls]
        if parsed.errors:
            results.append(("error", f"Error: {'; '.join(parsed.errors)}. {self._format_hint()}"))
        elif not parsed.tool_calls:
            results.append(("error", f"Error: no tool call found. {self._format_hint()}"))
        return results

    def _call(self, name: str, arguments: dict[str, Any]) -> tuple[str, str]:
        if self._terminated:
            return name, "Error: not run: the episode ended at an earlier call this turn."
        tool = self._tools_by_name.get(name)
        if tool is None:
            return (
                "error",
                f"Error: unknown tool {_quote(name)}; available tools: {self._tool_names()}.",
            )
        return name, tool.call(arguments)

    def _format_hint(self) -> str:
        return (
            'Call a tool as <tool_call>{"name": "<tool>", "arguments": {...}}</tool_call> '
            f"where <tool> is one of: {self._tool_names()}."
        )

    def _tool_names(self) -> str:
        return ", ".join(self._tools_by_name)

    def _step_after_end(self) -> tuple[str, float, bool, bool, dict[str, Any]]:
        content = "Error: the episode is over; call reset()."
        info = self._step_info([{"role": "tool", "name": "error", "content": content}])
        return content, 0.0, self._terminated, self._truncated, info

    def _step_info(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        errors = sum(m["content"].startswith("Error:") for m in messages)
        return {
            "messages": messages,
            "success": self._success,
            "turn": self._turn,
            "errors": errors,
        }


def run_oracle(env_id: str, seed: int, **env_kwargs: Any) -> list[str]:
    """Plays one whole episode of `env_id` with its scripted expert.

    Args:
        env_id: A registered `looprl/` environment id.
        seed: The reset seed, which picks the task.
        **env_kwargs: Passed to `gymnasium.make`.

    Returns:
        The oracle's actions, in order.
    """
    env = gymnasium.make(env_id, **env_kwargs)
    env.reset(seed=seed)
    actions: list[str] = []
    done = False
    while not done:
        actions.append(env.unwrapped.oracle_action())
        _, _, terminated, truncated, _ = env.step(actions[-1])
        done = terminated or truncated
    env.close()
    return actions


def _read_options(options: dict[str, Any] | None) -> tuple[list[str], str | None]:
    """`(history, task_id)` from reset options, checked."""
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"Expect `options` to be a dict or None, actually: {options!r:.200}")
    for key in options:
        if key not in RESET_OPTIONS:
            raise ValueError(
                f"Unknown reset option {key!r}; allowed options: {', '.join(RESET_OPTIONS)}"
            )
    history = options.get("history", [])
    if not isinstance(history, (list, tuple)) or not all(isinstance(a, str) for a in history):
        raise ValueError(
            f"Expect options['history'] to be a list of str, actually: {history!r:.200}"
        )
    task_id = options.get("task")
    if task_id is not None and not isinstance(task_id, str):
        raise ValueError(f"Expect options['task'] to be a task id str, actually: {task_id!r}")
    return list(history), task_id


def _valid_utf8(text: str) -> str:
    """`text` with lone surrogates escaped, so any tokenizer can encode it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _fit(text: str, limit: int) -> str:
    marker = "\n[truncated]"
    return text if len(text) <= limit else text[: limit - len(marker)] + marker
