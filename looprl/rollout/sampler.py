"""Task samplers: which tasks the next rollouts play."""

from __future__ import annotations

import numpy as np


class TaskSampler:
    """Draws task seeds uniformly; its state is part of every checkpoint.

    Args:
        seed: seeds the sampler's own generator (independent of torch's).
    """

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> list[int]:
        return [int(s) for s in self.rng.integers(0, 2**31 - 1, size=n)]

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
