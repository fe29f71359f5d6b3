"""RL algorithms: advantages and losses as pure tensor functions, one module each.

`build_algorithm(cfg.algorithm)` gives the object the trainer uses: it exposes
`advantages(rewards) -> (advantages, keep)`, `loss(logprobs, old_logprobs, advantages,
mask, turns) -> (loss, metrics)` and `aggregates_over` ("sequences" or "tokens": how
micro-batch losses combine into a minibatch loss).
"""

from __future__ import annotations

from looprl.algorithms.loop import LOOP

ALGORITHMS = {"loop": LOOP}


def build_algorithm(cfg):
    return ALGORITHMS[cfg.name](cfg)
