"""RL algorithms: advantages and losses as pure tensor functions, one module each.

`build_algorithm(cfg.algorithm)` gives the object the trainer uses: it exposes
`advantages(rewards) -> (advantages, keep)`, `loss(logprobs, old_logprobs, advantages,
mask, turns[, ref_logprobs][, weights]) -> (loss, metrics)`, `needs_reference`, and `aggregates_over` ("sequences" or "tokens": how
micro-batch losses combine into a minibatch loss).
"""

from __future__ import annotations

from looprl.algorithms.dpo import DPO
from looprl.algorithms.grpo import GRPO
from looprl.algorithms.loop import LOOP


def build_algorithm(cfg):
    """The algorithm object for a run config (`cfg.algorithm.name` picks it)."""
    if cfg.algorithm.name == "grpo":
        return GRPO(cfg.algorithm, max_len=cfg.env.max_tokens)
    if cfg.algorithm.name == "dpo":
        return DPO(cfg.algorithm)  # pairs and a pair loss, run by looprl/train/dpo_online.py
    return LOOP(cfg.algorithm, max_len=cfg.env.max_tokens)
