"""The ExIt task sampler: a prioritised, bounded buffer of self-improvement starting points.

Exploratory Iteration (ExIt; Jiang et al. 2025, "Bootstrapping Task Spaces for
Self-Improvement", Sec. 3): instead of always posing fresh tasks, the sampler grows a
buffer of partial histories recorded in earlier episodes. A starting point is a task
seed plus the actions of one or more finished attempts; the environment replays them
(`looprl.envs.revise.ReviseAttempts`) and the agent makes one self-improvement step,
a revision of the last attempt. After a group of K episodes from a starting point:

- its learnability score is the variance of the K returns (Eq. 1: for 0/1 rewards,
  p (1 - p), largest where the policy succeeds half the time);
- if that score is positive, `children` of the K new histories (uniformly drawn among
  those whose attempt ended) join the buffer as new starting points, scored with their
  parent's score, unless they hold more than `max_attempts` finished attempts;
- past `capacity`, the entry with the lowest score is evicted (ties: the oldest).

Each slot of a step is a fresh task with probability `p_fresh` (or when the buffer has
no entry left to draw), else an entry drawn without replacement with probability
proportional to `score + floor`. A drawn revision asks for a significantly different
approach ("diverge" mode) with probability `p_diverge`, else for a revision.

The buffer, its ids and its random generator are the sampler's `state_dict`, which the
trainer stores in every checkpoint, so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FRESH = -1


@dataclass(frozen=True)
class StartingPoint:
    """Where a self-improvement episode starts.

    Attributes:
        seed: the task's reset seed.
        history: the actions of the earlier attempts (empty: a fresh task).
        modes: the prompt that follows each finished attempt (`"revise"`/`"diverge"`).
        attempts: finished attempts in `history`.
        score: the learnability score (variance of the last group's returns).
        uid: the buffer entry's id, or -1 for a fresh task.
    """

    seed: int
    history: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    attempts: int = 0
    score: float = 0.0
    uid: int = FRESH

    @property
    def reset_options(self) -> dict:
        """The `ReviseAttempts.reset` options that replay this starting point."""
        return {"history": list(self.history), "modes": list(self.modes)}

    def to_dict(self) -> dict:
        return {"seed": self.seed, "history": list(self.history), "modes": list(self.modes),
                "attempts": self.attempts, "score": self.score, "uid": self.uid}

    @classmethod
    def from_dict(cls, d: dict) -> "StartingPoint":
        return cls(seed=int(d["seed"]), history=tuple(d["history"]), modes=tuple(d["modes"]),
                   attempts=int(d["attempts"]), score=float(d["score"]), uid=int(d["uid"]))


def learnability(returns: list[float]) -> float:
    """The variance of a group's returns (ExIt's learnability score).

    >>> learnability([1.0, 0.0, 1.0, 0.0]), learnability([1.0, 1.0, 1.0])
    (0.25, 0.0)
    """
    return float(np.var(np.asarray(returns, dtype=np.float64)))


@dataclass
class ExItSampler:
    """Draws fresh tasks and buffered starting points; grows the buffer from each group.

    Args:
        seed: seeds the sampler's own generator.
        capacity: the most entries the buffer holds.
        p_fresh: probability that a slot poses a fresh task.
        p_diverge: probability that a revision asks for a significantly different approach.
        max_attempts: the most finished attempts a buffered starting point may hold.
        floor: added to every score in the sampling weights, so zero-score entries
            keep a chance to be re-scored.
        children: new starting points added from each learnable group.
    """

    seed: int
    capacity: int = 256
    p_fresh: float = 0.5
    p_diverge: float = 0.0
    max_attempts: int = 2
    floor: float = 0.01
    children: int = 1
    entries: list[StartingPoint] = field(default_factory=list)
    next_uid: int = 0

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.max_attempts < 1 or self.children < 0 or self.floor <= 0:
            raise ValueError(f"Expect capacity >= 1, max_attempts >= 1, children >= 0 and floor > 0, actually: "
                             f"{self.capacity}, {self.max_attempts}, {self.children}, {self.floor}")
        for name in ("p_fresh", "p_diverge"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Expect `{name}` in [0, 1], actually: {getattr(self, name)}")
        self.rng = np.random.default_rng(self.seed)

    # --- sampling -------------------------------------------------------------------

    def probabilities(self, entries: list[StartingPoint] | None = None) -> np.ndarray:
        """Sampling probabilities of `entries` (default: the buffer): `score + floor`, normalised."""
        entries = self.entries if entries is None else entries
        weights = np.array([e.score + self.floor for e in entries], dtype=np.float64)
        return weights / weights.sum()

    def sample(self, n: int) -> list[StartingPoint]:
        """`n` starting points for the next step (buffered ones drawn without replacement)."""
        left = list(self.entries)
        starts = []
        for _ in range(n):
            if not left or self.rng.random() < self.p_fresh:
                starts.append(StartingPoint(seed=int(self.rng.integers(0, 2**31 - 1))))
                continue
            entry = left.pop(int(self.rng.choice(len(left), p=self.probabilities(left))))
            mode = "diverge" if self.rng.random() < self.p_diverge else "revise"
            starts.append(StartingPoint(entry.seed, entry.history, (*entry.modes, mode), entry.attempts,
                                        entry.score, entry.uid))
        return starts

    # --- growing the buffer ---------------------------------------------------------

    def update(self, start: StartingPoint, returns: list[float], histories: list[list[str] | None]) -> float:
        """Scores `start` from its group and adds children; returns the score.

        Args:
            start: the starting point the group played.
            returns: the K returns of the group.
            histories: each episode's full action history, or None where its attempt did
                not end (cut by the token limit: not a valid starting point).
        """
        score = learnability(returns)
        for i, entry in enumerate(self.entries):
            if entry.uid == start.uid:
                self.entries[i] = StartingPoint(entry.seed, entry.history, entry.modes, entry.attempts,
                                                score, entry.uid)
        valid = [h for h in histories if h is not None]
        if score > 0 and start.attempts + 1 <= self.max_attempts and valid:
            picks = self.rng.choice(len(valid), size=min(self.children, len(valid)), replace=False)
            for i in sorted(int(p) for p in picks):
                self.add(StartingPoint(start.seed, tuple(valid[i]), start.modes, start.attempts + 1, score))
        return score

    def add(self, point: StartingPoint) -> None:
        """Adds `point` under a new id; past capacity evicts the lowest score (ties: oldest)."""
        self.entries.append(StartingPoint(point.seed, point.history, point.modes, point.attempts,
                                          point.score, self.next_uid))
        self.next_uid += 1
        while len(self.entries) > self.capacity:
            victim = min(range(len(self.entries)), key=lambda i: (self.entries[i].score, self.entries[i].uid))
            del self.entries[victim]

    # --- checkpointing --------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        scores = [e.score for e in self.entries]
        return {"exit/buffer_size": len(self.entries),
                "exit/buffer_score_mean": float(np.mean(scores)) if scores else 0.0,
                "exit/buffer_attempts_mean": float(np.mean([e.attempts for e in self.entries])) if scores else 0.0}

    def state_dict(self) -> dict:
        """JSON-safe state: the generator, the entries and the next id."""
        return {"bit_generator": self.rng.bit_generator.state, "next_uid": self.next_uid,
                "entries": [e.to_dict() for e in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        if "entries" not in state:
            raise ValueError("The checkpoint's sampler state has no ExIt buffer ('entries'); it was saved by a "
                             "run without exit.enabled")
        self.rng.bit_generator.state = state["bit_generator"]
        self.next_uid = int(state["next_uid"])
        self.entries = [StartingPoint.from_dict(d) for d in state["entries"]]
