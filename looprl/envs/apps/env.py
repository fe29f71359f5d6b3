"""`looprl/Apps-v0`: AppWorld-style tasks over a simulated world of apps.

The agent acts for a user in six apps (contacts, calendar, email, notes, files,
payments) whose data persists through the episode. It reads each app's API list with
`api_docs(app)`, calls APIs with `call_api(app, api, args)`, and ends with
`complete_task(answer)`. As in AppWorld (Trivedi et al., 2024) and the LOOP paper
(Chen et al., 2025), the reward is state-based: 1.0 iff the world changed by exactly
what the task asks (nothing else: collateral changes fail) and a question's answer is
right.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, ClassVar

import numpy as np

from looprl.envs.apps import apis, organizer, people  # noqa: F401 (registers their APIs in `apis`)
from looprl.envs.apps.check import diff, mismatch
from looprl.envs.apps.tasks import LEVELS, MAX_SEED, AppsTask, call_arguments, generate, parse_task_id
from looprl.envs.apps.world import TODAY_TEXT
from looprl.envs.base import Task, ToolEnv
from looprl.envs.parsing import format_tool_call
from looprl.envs.tools import Tool

SPLITS = ("train", "test")
MAX_DRAWS = 10_000


class AppsEnv(ToolEnv):
    """Do what the user asks in their apps by calling the apps' APIs, then complete the task.

    Args:
        split: `"train"` or `"test"` (the held-out fifth of task contents).
        difficulty: 1 (one app, 1-2 API calls), 2 (up to two apps, 2-5), 3 (several
            apps or many writes, 2-6), or None to draw the level uniformly.
        max_turns: Turns before the episode is truncated.

    Raises:
        ValueError: An argument out of range, naming it and what was expected.
    """

    description: ClassVar[str] = (
        "AppWorld-style: read app API docs, then call contacts/calendar/email/notes/files/"
        "payments APIs to do what the user asks."
    )
    reward_description: ClassVar[str] = (
        "1.0 if, at complete_task, the apps' data differs from the start by exactly the "
        "changes the task asks for (any other change fails) and a question's answer is "
        "right; else 0.0 (also at the turn limit)."
    )
    system_prompt: ClassVar[str] = (
        "You act for the user in their apps. List an app's APIs with api_docs(app), call "
        "them with call_api(app, api, args), then call complete_task (with answer= just the "
        "value, for questions). Change nothing you were not asked to. "
        f"Today is {TODAY_TEXT}."
    )

    def __init__(
        self, split: str = "train", difficulty: int | None = None, max_turns: int = 20
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"Expect `split` to be 'train' or 'test', actually: {split!r}")
        if difficulty is not None and (type(difficulty) is not int or difficulty not in LEVELS):
            raise ValueError(f"Expect `difficulty` to be 1, 2, 3 or None, actually: {difficulty!r}")
        self.split = split
        self.difficulty = difficulty
        self.world: dict[str, Any] = {}
        self._log: list[tuple[str, str, bool]] = []  # (tool, `_key(arguments)`, succeeded)
        tools = [Tool(self.api_docs), Tool(self.call_api), Tool(self.complete_task)]
        super().__init__(tools=tools, max_turns=max_turns)

    # --- tools -------------------------------------------------------------------

    def api_docs(self, app: str | None = None) -> str:
        """List an app's APIs with their arguments; without an app, list the apps.

        Args:
            app: An app name, e.g. "contacts"; leave it out to list the apps.
        """
        self._log.append(("api_docs", _key({"app": app}), app in apis.APIS))
        return apis.docs(app)

    def call_api(self, app: str, api: str, args: dict[str, Any] | None = None) -> str:
        """Call one API of an app; returns its result as JSON.

        Args:
            app: The app, e.g. "contacts".
            api: The API's name in that app, e.g. "search".
            args: The API's arguments, e.g. {"query": "Ana"}.
        """
        arguments = call_arguments(app, api, args)
        key = _key(arguments)
        try:
            result = apis.call(self.world, app, api, arguments["args"])
        except apis.ApiError as e:
            self._log.append(("call_api", key, False))
            return f"Error: {e}"
        self._log.append(("call_api", key, True))
        return json.dumps(result, ensure_ascii=False, separators=(",", ":"))

    def complete_task(self, answer: str | float | None = None) -> str:
        """Finish the task. This ends the episode.

        Args:
            answer: For a question, just the answer's value; leave it out otherwise.
        """
        problem = self._problem(None if answer is None else str(answer))
        self._end_episode(reward=float(problem is None), success=problem is None)
        return "Task completed." if problem is None else f"Task failed: {problem}."

    # --- ToolEnv -----------------------------------------------------------------

    @property
    def task(self) -> AppsTask:
        return super().task  # type: ignore[return-value]

    def _generate_task(self, rng: np.random.Generator) -> AppsTask:
        for _ in range(MAX_DRAWS):
            level = self.difficulty if self.difficulty is not None else int(rng.integers(1, 4))
            task = generate(int(rng.integers(MAX_SEED)), level)
            if task is not None and task.split == self.split:
                return task
        raise RuntimeError(f"Found no {self.split!r} task in {MAX_DRAWS} draws")

    def _task_from_id(self, task_id: str) -> AppsTask:
        level, seed, template = parse_task_id(task_id)
        if self.difficulty not in (None, level):
            problem = f"it has difficulty {level}, this env has difficulty {self.difficulty}"
        else:
            task = generate(seed, level)
            drawn = "no task" if task is None else f"template {task.spec.template!r}"
            problem = f"seed {seed} at level {level} draws {drawn}, not {template!r}"
            if task is not None and task.task_id == task_id:
                if task.split == self.split:
                    return task
                problem = f"it belongs to the {task.split!r} split, not {self.split!r}"
        raise ValueError(f"Task id {task_id!r} cannot be posed by this environment: {problem}")

    def _start_episode(self, task: Task) -> None:
        self.world = copy.deepcopy(self.task.world)
        self._log = []

    def oracle_action(self) -> str:
        """The expert's next call: docs of each app it needs, the API calls, then done.

        It walks its plan past the calls already made in order (so it resumes after a
        replay or a detour); if one of its own calls failed, the world is off its
        script and it completes the task at once.
        """
        if self._terminated or self._truncated:
            raise RuntimeError("The episode is over: the oracle has no next action; call reset().")
        plan = self.task.plan()
        done = 0
        for tool, key, ok in self._log:
            if done < len(plan) - 1 and (tool, key) == (plan[done][0], _key(plan[done][1])):
                if not ok:
                    return format_tool_call(*plan[-1])
                done += 1
        return format_tool_call(*plan[done])

    # --- helpers -----------------------------------------------------------------

    def _problem(self, answer: str | None) -> str | None:
        """Why the task is not done (the first problem found), or None if it is."""
        spec = self.task.spec
        assert spec is not None
        problem = mismatch(diff(self.task.world, self.world), self.task.expected, spec.loose)
        if problem is None and spec.check_answer is not None and not spec.check_answer(answer):
            problem = "wrong answer"
        return problem


def _key(arguments: dict[str, Any]) -> str:
    """A short fingerprint of a call's arguments: the log stays small whatever the agent sends."""
    return hashlib.sha256(json.dumps(arguments, sort_keys=True).encode()).hexdigest()
