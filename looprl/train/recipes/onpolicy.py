"""On-policy LOOP and GRPO: each step plays K rollouts per task, then trains on them.

One RL step (LOOP's Algorithm 1; GRPO differs only in its advantages and loss):
  1. sample `tasks_per_step` task seeds, play `group_size` episodes of each;
  2. the algorithm's advantages per group; drop rollouts it does not train on;
  3. `epochs` passes of shuffled minibatches, one optimizer step per minibatch;
  4. publish the new weights (the `hf` engine shares the model: only the version moves).

`collect` and `prepare` are the hooks a variant overrides (a benchmark that samples
with older weights, or rewrites the logprobs the ratio is taken against).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from looprl.rollout.collect import Collection, drop_metrics
from looprl.train.metrics import rollout_metrics, step_timings
from looprl.train.recipes import Stateless
from looprl.train.update import Row, chunk_rows, update_policy


class OnPolicy(Stateless):
    """The synchronous LOOP / GRPO step (see the module docstring)."""

    data_parallel = True  # several ranks: each plays its share of the tasks, all train (looprl.train.parallel)
    sequence_parallel = True  # train.sequence_parallel: blocks of ranks split each row (looprl.train.ulysses)

    def __init__(self, ctx, fresh: bool):
        self.player = ctx.player()

    def step(self, ctx) -> dict[str, Any]:
        t0 = time.perf_counter()
        collection = self.collect(ctx, ctx.sampler.sample(ctx.cfg.rollout.tasks_per_step))
        groups = collection.episodes
        t1 = time.perf_counter()
        rewards = torch.tensor([[t.reward for t in g] for g in groups], device="cpu")  # (G, K), one return per episode
        advantages, keep = ctx.algorithm.advantages(rewards)  # (G, K), (G, K)
        rows = self.prepare(ctx, chunk_rows(groups, advantages, keep))
        train_metrics = update_policy(ctx.cfg, ctx.algorithm, ctx.model, ctx.tokenizer, ctx.optimizer, rows,
                                      parallel=ctx.parallel, before_step=ctx.before_optimizer_step)
        ctx.publish()
        t2 = time.perf_counter()
        return {
            **rollout_metrics(groups, rewards, kept=int(keep.sum().item())),
            **drop_metrics(collection.dropped),
            **train_metrics,
            "policy_version": ctx.version,
            **step_timings(groups, t0, t1, t2),
        }

    def collect(self, ctx, seeds: Sequence[int]) -> Collection:
        """This step's groups: `group_size` episodes of each task seed."""
        return ctx.collect(self.player, seeds, ctx.cfg.rollout.group_size)

    def prepare(self, ctx, rows: list[Row]) -> list[Row]:
        """The rows to train on (a hook: the plain step trains on them as collected)."""
        return rows
