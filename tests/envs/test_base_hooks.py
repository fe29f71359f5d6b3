"""`ToolEnv` hooks for long episodes: per-step rewards, and no message list kept while stepping."""

from __future__ import annotations

import tracemalloc

import numpy as np

from looprl.envs import Task, Tool, ToolEnv, format_tool_call


class CounterEnv(ToolEnv):
    """Count to `goal` with `bump`; each bump earns `1 / goal` through `_add_reward`."""

    system_prompt = "Bump."

    def __init__(self, goal: int = 3, max_turns: int = 10) -> None:
        self.goal = goal
        self.count = 0
        super().__init__(tools=[Tool(self.bump)], max_turns=max_turns)

    def bump(self) -> str:
        """Add one to the counter."""
        self.count += 1
        self._add_reward(1 / self.goal)
        if self.count == self.goal:
            self._end_episode(reward=0.0, success=True)
        return f"count {self.count}"

    def _generate_task(self, rng: np.random.Generator) -> Task:
        return Task("count", "Count.")

    def _task_from_id(self, task_id: str) -> Task:
        return Task("count", "Count.")

    def _start_episode(self, task: Task) -> None:
        self.count = 0

    def oracle_action(self) -> str:
        return BUMP


BUMP = format_tool_call("bump", {})


def test_add_reward_sums_within_a_turn_and_starts_from_zero_each_turn():
    env = CounterEnv(goal=4)
    env.reset(seed=0)
    assert env.step(BUMP)[1] == 0.25
    assert env.step(BUMP + BUMP)[1] == 0.5
    assert env.step("no call")[1] == 0.0
    _, reward, terminated, _, info = env.step(BUMP)
    assert (reward, terminated, info["success"]) == (0.25, True, True)


def test_stepping_keeps_no_conversation_but_replay_still_returns_it():
    env = CounterEnv(goal=1000, max_turns=2000)
    env.reset(seed=0)
    for _ in range(10):
        env.step(BUMP)
    assert env._messages == []

    _, info = env.reset(seed=0, options={"history": [BUMP, "hi"]})
    assert info["messages"][2:] == [
        {"role": "assistant", "content": BUMP},
        {"role": "tool", "name": "bump", "content": "count 1"},
        {"role": "assistant", "content": "hi"},
        {"role": "tool", "name": "error", "content": info["messages"][5]["content"]},
    ]
    assert env._messages == [] and env.count == 1


def test_memory_stays_flat_over_a_long_episode():
    env = CounterEnv(goal=5000, max_turns=5000)
    env.reset(seed=0)
    tracemalloc.start()
    try:
        for turn in range(3000):
            env.step(BUMP)
            if turn == 200:
                warm = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - warm
    finally:
        tracemalloc.stop()
    assert grown < 50_000, grown  # a kept message list grows ~500 bytes a turn
