"""RL algorithms: advantages and losses as pure tensor functions, one module each.

`build_algorithm(cfg)` gives the object a recipe uses, looked up by
`cfg.algorithm.name` in `ALGORITHMS` (an unknown name lists the known ones). A policy-
gradient algorithm (LOOP, GRPO) exposes `advantages(rewards) -> (advantages, keep)`,
`loss(PolicyLossInputs, global_count) -> (loss, metrics)`, `needs_reference` and
`aggregates_over` ("sequences" or "tokens": the unit of the minibatch's `global_count`
its loss is normalised by); DPO exposes `pairs(rewards)` and `loss(PairLossInputs,
global_count)` with `aggregates_over = "pairs"`. Their configs are
`looprl.config.ALGORITHM_CONFIGS`, under the same names.
"""

from __future__ import annotations

from typing import Callable

from looprl.algorithms.dpo import DPO
from looprl.algorithms.grpo import GRPO
from looprl.algorithms.loop import LOOP
from looprl.config import ALGORITHM_CONFIGS

# name -> builder from the run config (`max_len`: the episode token limit, Dr. GRPO's divisor by default).
ALGORITHMS: dict[str, Callable] = {
    "loop": lambda cfg: LOOP(cfg.algorithm, max_len=cfg.env.max_tokens),
    "grpo": lambda cfg: GRPO(cfg.algorithm, max_len=cfg.env.max_tokens),
    "dpo": lambda cfg: DPO(cfg.algorithm),
}
assert set(ALGORITHMS) == set(ALGORITHM_CONFIGS), "every algorithm has a config and every config an algorithm"


def build_algorithm(cfg):
    """The algorithm object for a run config (`cfg.algorithm.name` picks it)."""
    name = cfg.algorithm.name
    if name not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](cfg)
