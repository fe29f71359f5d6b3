"""Tasks: drawn from a seed and a level, split by content, with the expert's plan.

`generate(seed, level)` builds the world of `random.Random(seed)` and draws a template
of that level from the same generator, so the id `apps:<level>:<seed>:<template>`
restores the whole task. A task is held out (`"test"`) iff the sha256 of its content
(template name and parameters, not the world) is 0 mod 5, so the same request about
the same contact is never in both splits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from looprl.envs.apps import apis, compound, templates
from looprl.envs.apps.check import diff
from looprl.envs.apps.templates import Spec
from looprl.envs.apps.world import build_world
from looprl.envs.base import Task

LEVELS = (1, 2, 3)
MAX_SEED = 2**31
DRAWS_PER_WORLD = 3
TEMPLATES: dict[int, tuple[Callable[[dict[str, Any], random.Random], Spec | None], ...]] = {
    1: (
        templates.add_event,
        templates.delete_event,
        templates.move_file,
        templates.delete_note,
        templates.contact_field,
        templates.count_events,
    ),
    2: (
        templates.email_contact,
        templates.pay_contact,
        templates.total_paid,
        templates.delete_emails_from,
        templates.reschedule,
        templates.group_note,
    ),
    3: (
        compound.pay_back,
        compound.email_group,
        compound.archive_folder,
        compound.total_with_group,
        compound.share_event,
    ),
}


@dataclass(frozen=True)
class AppsTask(Task):
    """An Apps task.

    Attributes:
        level: Its difficulty, 1 to 3.
        seed: The seed of its world and template draw.
        spec: What the template drew: content, prompt, solution, answer check.
        world: The world at the start of the episode (never changed; copy it).
        expected: The diff the solution makes to `world` (see `check.diff`).
    """

    level: int = 1
    seed: int = 0
    spec: Spec | None = field(default=None, compare=False)
    world: dict[str, Any] = field(default_factory=dict, compare=False)
    expected: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def split(self) -> str:
        """`"test"` or `"train"`, by the task's content (see `split_of`)."""
        assert self.spec is not None
        return split_of(self.spec.template, self.spec.params)

    def plan(self) -> list[tuple[str, dict[str, Any]]]:
        """The expert's tool calls `(tool, arguments)`: docs of each app, the API calls, done."""
        assert self.spec is not None
        docs = [("api_docs", {"app": app}) for app in self.spec.apps]
        calls = [("call_api", call_arguments(*c)) for c in self.spec.calls]
        answer = {} if self.spec.answer is None else {"answer": self.spec.answer}
        return [*docs, *calls, ("complete_task", answer)]


def split_of(template: str, params: dict[str, Any]) -> str:
    """`"test"` for the held-out fifth of task contents (by sha256), else `"train"`."""
    content = f"{template}:{json.dumps(params, sort_keys=True)}"
    held_out = int(hashlib.sha256(content.encode()).hexdigest(), 16) % 5 == 0
    return "test" if held_out else "train"


def call_arguments(app: str, api: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """The `call_api` arguments of one call, in the one form the expert's log compares."""
    return {"app": app, "api": api, "args": {} if args is None else args}


def generate(seed: int, level: int) -> AppsTask | None:
    """The task of `seed` at `level`, or None when the drawn template does not fit the world."""
    rnd = random.Random(seed)
    world = build_world(rnd)
    template = rnd.choice(TEMPLATES[level])
    # A few draws of the same template's parameters, so that templates which often
    # do not fit a world (e.g. need recent payments) are not much rarer than others.
    spec = next(filter(None, (template(world, rnd) for _ in range(DRAWS_PER_WORLD))), None)
    if spec is None:
        return None
    solved = copy.deepcopy(world)
    for app, api, args in spec.calls:
        apis.call(solved, app, api, args)  # raises if a template is wrong: a bug, not bad input
    return AppsTask(
        task_id=f"apps:{level}:{seed}:{spec.template}",
        prompt=spec.prompt,
        level=level,
        seed=seed,
        spec=spec,
        world=world,
        expected=diff(world, solved),
    )


def parse_task_id(task_id: str) -> tuple[int, int, str]:
    """`(level, seed, template)` from `apps:<level>:<seed>:<template>`.

    Raises:
        ValueError: `task_id` does not have that form.
    """
    parts = task_id.split(":")
    valid = (
        len(parts) == 4
        and parts[0] == "apps"
        and parts[1] in {str(level) for level in LEVELS}
        and parts[2].isascii()
        and parts[2].isdigit()
        and len(parts[2]) <= 10
        and int(parts[2]) < MAX_SEED
    )
    if not valid:
        raise ValueError(
            f"Task id {task_id!r:.200} is not an Apps task id; expected "
            f"'apps:<level 1-3>:<seed below 2**31>:<template>'"
        )
    return int(parts[1]), int(parts[2]), parts[3]
