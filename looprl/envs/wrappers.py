"""`RecordToolErrors`: counts an episode's tool results and how many were errors.

A failing or malformed tool call is never an exception (see `ToolEnv`): it comes back to
the agent as a tool message whose text starts with `Error:` (an unknown tool, bad JSON,
no call found, a tool that failed). This wrapper counts those messages in each step's
`info["messages"]`, so an evaluation can report a tool-error rate without the episode
records growing a field per environment.
"""

from __future__ import annotations

from typing import Any

import gymnasium

ERROR_PREFIX = "Error:"


class RecordToolErrors(gymnasium.Wrapper):
    """Counts the tool results of the current episode and those that were errors.

    Attributes:
        tool_results: tool messages returned since the last `reset`.
        tool_errors: those whose text starts with `Error:`.
    """

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        self.tool_results = 0
        self.tool_errors = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self.tool_results = self.tool_errors = 0
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        result = self.env.step(action)  # returned as it is: `check_step` judges it, garbage included
        info = result[-1] if isinstance(result, tuple) and len(result) == 5 else None
        messages = info.get("messages") if isinstance(info, dict) else None
        if isinstance(messages, list):
            self.tool_results += len(messages)
            self.tool_errors += sum(isinstance(m, dict) and str(m.get("content", "")).startswith(ERROR_PREFIX)
                                    for m in messages)
        return result

    def counts(self) -> dict[str, int]:
        """`{"tool_results", "tool_errors"}` of the episode so far."""
        return {"tool_results": self.tool_results, "tool_errors": self.tool_errors}
