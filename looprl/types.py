"""Types shared by every stage of the data flow (see DESIGN.md, "Contracts")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Trajectory:
    """One episode, token-in/token-out.

    `input_ids` is the whole conversation exactly as the policy saw and wrote it: the
    templated prompt, then for each turn the ids the engine sampled followed by the
    templated observation. Sampled ids are never decoded and re-tokenized.

    Attributes:
        input_ids: every token of the episode.
        loss_mask: 1 on tokens the policy sampled, 0 on prompt and observation tokens.
        behaviour_logprobs: the engine's log-probability of each sampled token under
            the sampling distribution it used (0.0 where `loss_mask` is 0).
        turn_spans: `(start, end)` index range of the sampled tokens of each turn.
        turn_rewards: the reward the environment returned after each turn.
        task_id: identifies the task, so the K rollouts of a task form a group.
        group_id: index of the group within its batch.
        policy_version: version of the weights that sampled this trajectory.
        terminated: the environment ended the episode (Gymnasium's meaning).
        truncated: the episode was cut (turn or token limit).
        info: environment facts for metrics (e.g. `success`).
    """

    input_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    task_id: str = ""
    group_id: int = 0
    policy_version: int = 0
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def reward(self) -> float:
        """The episode's return: the sum of its turn rewards."""
        return float(sum(self.turn_rewards))

    @property
    def num_turns(self) -> int:
        return len(self.turn_spans)

    @property
    def num_sampled_tokens(self) -> int:
        return int(sum(self.loss_mask))

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"Trajectory fields must have equal lengths, got input_ids={n}, "
                f"loss_mask={len(self.loss_mask)}, "
                f"behaviour_logprobs={len(self.behaviour_logprobs)}"
            )
