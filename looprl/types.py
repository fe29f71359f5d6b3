"""Types shared by every stage of the data flow (see docs/architecture.md, "Contracts")."""

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
        proximal_logprobs: set by the trainer for decoupled PPO: each sampled token's
            logprob under the weights the update starts from (0.0 where `loss_mask` is 0);
            None otherwise.
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
    proximal_logprobs: list[float] | None = None

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

    @property
    def chunks(self) -> list[Trajectory]:
        """The sequences to train on: this one (an `Episode` has several)."""
        return [self]

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"Trajectory fields must have equal lengths, got input_ids={n}, "
                f"loss_mask={len(self.loss_mask)}, "
                f"behaviour_logprobs={len(self.behaviour_logprobs)}"
            )
        if self.proximal_logprobs is not None and len(self.proximal_logprobs) != n:
            raise ValueError(f"Trajectory fields must have equal lengths, got input_ids={n}, "
                             f"proximal_logprobs={len(self.proximal_logprobs)}")


@dataclass
class Episode:
    """One episode played with an agent-side context window, as consecutive chunks.

    Each chunk is a `Trajectory` (one contiguous token sequence): the episode's prompt,
    then the last turns of the chunk before it as context (loss mask 0: they were
    trained where they were sampled), then the turns sampled in this chunk (loss mask
    1 on their sampled ids). A chunk's `turn_spans` and `turn_rewards` cover only the
    turns sampled in it, so every sampled token and every reward belongs to exactly
    one chunk. See `looprl.rollout.agent.run_episode`.

    An `Episode` answers the same questions as a `Trajectory` (`reward`, `num_turns`,
    `num_sampled_tokens`, `terminated`, `truncated`, `info`, `chunks`), so groups and
    metrics treat both alike; the trainer gives every chunk its episode's advantage.

    Attributes:
        chunks: the chunks in the order they were played (at least one); the last one
            carries the episode's `terminated`, `truncated` and `info["success"]`.
    """

    chunks: list[Trajectory]

    def __post_init__(self) -> None:
        if not self.chunks:
            raise ValueError("An Episode needs at least one chunk, got none")

    @property
    def reward(self) -> float:
        """The episode's return: the sum of the turn rewards of all chunks."""
        return float(sum(r for c in self.chunks for r in c.turn_rewards))

    @property
    def num_turns(self) -> int:
        return sum(c.num_turns for c in self.chunks)

    @property
    def num_sampled_tokens(self) -> int:
        return sum(c.num_sampled_tokens for c in self.chunks)

    @property
    def terminated(self) -> bool:
        return self.chunks[-1].terminated

    @property
    def truncated(self) -> bool:
        return self.chunks[-1].truncated

    @property
    def info(self) -> dict[str, Any]:
        return self.chunks[-1].info

    @property
    def task_id(self) -> str:
        return self.chunks[0].task_id

    @property
    def group_id(self) -> int:
        return self.chunks[0].group_id

    @property
    def policy_version(self) -> int:
        return min(c.policy_version for c in self.chunks)
