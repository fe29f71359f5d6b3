"""ExIt: GRPO (or LOOP) on single self-improvement steps from a prioritised buffer.

Exploratory Iteration (Jiang et al. 2025, "Bootstrapping Task Spaces for
Self-Improvement", Algorithm 1). Each step draws `tasks_per_step` starting points from
the `ExItSampler` (fresh tasks with probability `p_fresh`, else buffered histories by
learnability), plays K episodes of one attempt from each (a revision when the starting
point holds earlier attempts), scores every starting point by the variance of its K
returns, adds learnable children to the buffer, then updates the policy exactly as the
on-policy recipe does. The loss covers only the new attempt's sampled tokens: the
replayed attempts are part of the prompt (loss mask 0).

Episodes are played through the run's one collection path (its retries, timeouts and
drop counts); a starting point whose group is lost is scored by nothing and adds no child.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import torch

from looprl.config import RunConfig
from looprl.envs.revise import ReviseAttempts
from looprl.rollout.collect import drop_metrics
from looprl.rollout.exit_sampler import ExItSampler
from looprl.rollout.revisions import attempt_history
from looprl.train.context import env_factory
from looprl.train.metrics import rollout_metrics, step_timings
from looprl.train.recipes import Stateless
from looprl.train.update import chunk_rows, update_policy


class ExIt(Stateless):
    """The ExIt step (see the module docstring); its buffer is the run's sampler."""

    def __init__(self, ctx, fresh: bool):
        self.player = ctx.player(wrap=functools.partial(ReviseAttempts, context=ctx.cfg.exit.context),
                                 observe=attempt_history)  # as `looprl.rollout.revisions.revision_player`

    @staticmethod
    def sampler(cfg: RunConfig) -> ExItSampler:
        e = cfg.exit
        return ExItSampler(cfg.seed, capacity=e.capacity, p_fresh=e.p_fresh, p_diverge=e.p_diverge,
                           max_attempts=e.max_attempts, floor=e.floor, children=e.children)

    @staticmethod
    def expert_env(cfg: RunConfig):
        """What the SFT warm-start plays the expert in: some episodes revise an earlier attempt.

        A chat model knows how to revise before ExIt trains it; the tiny model learns the
        format here, from the expert revising its own or a corrupted attempt.
        """
        make = env_factory(cfg)
        if cfg.exit.warmup_revisions == 0:
            return make
        return lambda: ReviseAttempts(make(), context=cfg.exit.context, expert_previous=cfg.exit.warmup_revisions)

    def step(self, ctx) -> dict[str, Any]:
        cfg, sampler = ctx.cfg, ctx.sampler
        t0 = time.perf_counter()
        starts = sampler.sample(cfg.rollout.tasks_per_step)
        collection = self.player.collect([s.seed for s in starts], cfg.rollout.group_size,
                                         [s.reset_options for s in starts])
        starts = [starts[g.index] for g in collection.groups]
        groups, histories = collection.episodes, [g.observed for g in collection.groups]
        t1 = time.perf_counter()
        rewards = torch.tensor([[t.reward for t in g] for g in groups], device="cpu")  # (G, K)
        scores = [sampler.update(s, r, h) for s, r, h in zip(starts, rewards.tolist(), histories)]
        advantages, keep = ctx.algorithm.advantages(rewards)  # (G, K), (G, K)
        rows = chunk_rows(groups, advantages, keep)
        train_metrics = update_policy(cfg, ctx.algorithm, ctx.model, ctx.tokenizer, ctx.optimizer, rows)
        ctx.publish()
        t2 = time.perf_counter()
        revision = [t for s, g in zip(starts, groups) if s.history for t in g]
        fresh = [t for s, g in zip(starts, groups) if not s.history for t in g]
        return {
            **rollout_metrics(groups, rewards, kept=int(keep.sum().item())),
            **drop_metrics(collection.dropped),
            **({"exit/fresh_success_rate": _success(fresh)} if fresh else {}),
            **({"exit/revision_success_rate": _success(revision)} if revision else {}),
            "exit/revision_frac": len(revision) / rewards.numel(),
            "exit/learnability_mean": float(np.mean(scores)),
            **sampler.stats(),
            **train_metrics,
            "policy_version": ctx.version,
            **step_timings(groups, t0, t1, t2),
        }


def _success(trajectories) -> float:
    return sum(bool(t.info.get("success")) for t in trajectories) / len(trajectories)
