"""Gymnasium tool-use environments, their tools, and the registry of `looprl/` ids.

Every `gymnasium.register` call of the project lives here (one registry, as Gymnasium does). Build an
environment with `gymnasium.make("looprl/Calc-v0")` or `make_env`, which explains an
unknown id. Environments count their own turns, so none is registered with
`max_episode_steps`.
"""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium

from looprl.envs.base import Task, ToolEnv, UnicodeText, run_oracle
from looprl.envs.parsing import ParsedAction, ToolCall, format_tool_call, parse_action
from looprl.envs.tools import Tool, tool

__all__ = [
    "ParsedAction",
    "Task",
    "Tool",
    "ToolCall",
    "ToolEnv",
    "UnicodeText",
    "env_ids",
    "format_tool_call",
    "list_envs",
    "make_env",
    "parse_action",
    "run_oracle",
    "tool",
]

NAMESPACE = "looprl/"

gymnasium.register(id="looprl/Calc-v0", entry_point="looprl.envs.calc:CalcEnv")
gymnasium.register(id="looprl/Code-v0", entry_point="looprl.envs.code:CodeEnv")
gymnasium.register(id="looprl/Hanoi-v0", entry_point="looprl.envs.hanoi:HanoiEnv")
gymnasium.register(id="looprl/Dataset-v0", entry_point="looprl.envs.adapters:DatasetEnv")
gymnasium.register(id="looprl/Apps-v0", entry_point="looprl.envs.apps:AppsEnv")
gymnasium.register(id="looprl/SQL-v0", entry_point="looprl.envs.sql:SqlEnv")


def env_ids() -> list[str]:
    """The registered `looprl/` environment ids, sorted."""
    return sorted(env_id for env_id in gymnasium.registry if env_id.startswith(NAMESPACE))


def make_env(env_id: str, **kwargs: Any) -> gymnasium.Env:
    """`gymnasium.make(env_id, **kwargs)`, with a clear error for an unknown id.

    Args:
        env_id: A registered id, e.g. `"looprl/Calc-v0"`, or, as in `gymnasium.make`,
            `"module:EnvId"`: `module` is imported first and registers `EnvId`. That
            form registers a user's environment wherever it is made, in a Ray rollout
            actor's process too.
        **kwargs: The environment's constructor arguments.

    Raises:
        ValueError: `env_id` is not registered (or its module cannot be imported); the
            message lists the looprl ids.
    """
    if ":" in env_id:
        module, _, env_id = env_id.partition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"Environment module {module!r} (of {module}:{env_id}) cannot be imported: {e}") from None
    if env_id not in gymnasium.registry:
        known = ", ".join(env_ids())
        raise ValueError(
            f"Unknown environment id {env_id!r}; registered looprl environments: {known}"
        )
    try:
        return gymnasium.make(env_id, **kwargs)
    except TypeError as e:  # an unknown or missing constructor argument
        raise ValueError(f"Bad arguments for environment {env_id!r} {kwargs}: {e}".split(" was raised")[0]) from None


def list_envs() -> list[dict[str, Any]]:
    """Describes every registered `looprl/` environment (builds each with defaults).

    Returns:
        One dict per id: `id`, `description` (one line), `tools` (a list of
        `{"name", "description"}`) and `reward` (how the reward is given).
    """
    described = []
    for env_id in env_ids():
        env = gymnasium.make(env_id)
        unwrapped: ToolEnv = env.unwrapped  # type: ignore[assignment]
        described.append(
            {
                "id": env_id,
                "description": unwrapped.description,
                "tools": [{"name": t.name, "description": t.description} for t in unwrapped.tools],
                "reward": unwrapped.reward_description,
            }
        )
        env.close()
    return described
