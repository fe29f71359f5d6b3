"""ExIt training step: GRPO (or LOOP) on single self-improvement steps from a prioritised buffer.

Exploratory Iteration (Jiang et al. 2025, "Bootstrapping Task Spaces for
Self-Improvement", Algorithm 1). Each step draws `tasks_per_step` starting points from
the `ExItSampler` (fresh tasks with probability `p_fresh`, else buffered histories by
learnability), plays K episodes of one attempt from each (a revision when the starting
point holds earlier attempts), scores every starting point by the variance of its K
returns, adds learnable children to the buffer, then updates the policy exactly as
`rl_step` does. The loss covers only the new attempt's sampled tokens: the replayed
attempts are part of the prompt (loss mask 0).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from looprl.config import RunConfig
from looprl.envs import make_env
from looprl.envs.revise import ReviseAttempts
from looprl.rollout.engine import HFEngine, SamplingParams
from looprl.rollout.exit_sampler import ExItSampler
from looprl.rollout.revisions import collect_revisions
from looprl.train.metrics import rollout_metrics, step_timings


def expert_env_factory(cfg: RunConfig):
    """What the SFT warm-start plays the expert in: with ExIt, some episodes revise an earlier attempt.

    A chat model knows how to revise before ExIt trains it; the tiny model learns the
    format here, from the expert revising its own or a corrupted attempt.
    """
    if not cfg.exit.enabled or cfg.exit.warmup_revisions == 0:
        return lambda: make_env(cfg.env.id, **cfg.env.kwargs)
    return lambda: ReviseAttempts(make_env(cfg.env.id, **cfg.env.kwargs), context=cfg.exit.context,
                                  expert_previous=cfg.exit.warmup_revisions)


def build_exit_sampler(cfg: RunConfig) -> ExItSampler:
    e = cfg.exit
    return ExItSampler(cfg.seed, capacity=e.capacity, p_fresh=e.p_fresh, p_diverge=e.p_diverge,
                       max_attempts=e.max_attempts, floor=e.floor, children=e.children)


def exit_step(cfg: RunConfig, algorithm, model, tokenizer, engine: HFEngine, optimizer,
              sampler: ExItSampler) -> dict[str, float]:
    """One ExIt step: sample starting points, play groups, rescore and grow the buffer, update."""
    from looprl.train.trainer import _update, chunk_rows  # the trainer imports this module

    t0 = time.perf_counter()
    starts = sampler.sample(cfg.rollout.tasks_per_step)
    params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature)
    groups, histories = collect_revisions(
        engine, tokenizer, lambda: make_env(cfg.env.id, **cfg.env.kwargs), starts, cfg.rollout.group_size,
        params, max_tokens=cfg.env.max_tokens, context=cfg.exit.context,
    )
    t1 = time.perf_counter()
    rewards = torch.tensor([[t.reward for t in g] for g in groups])  # (G, K)
    scores = [sampler.update(s, r, h) for s, r, h in zip(starts, rewards.tolist(), histories)]
    advantages, keep = algorithm.advantages(rewards)  # (G, K), (G, K)
    kept = chunk_rows(groups, advantages, keep)
    train_metrics = _update(cfg, algorithm, model, tokenizer, optimizer, kept)
    engine.update_weights()
    t2 = time.perf_counter()
    revision = [t for s, g in zip(starts, groups) if s.history for t in g]
    fresh = [t for s, g in zip(starts, groups) if not s.history for t in g]
    return {
        **rollout_metrics(groups, rewards, kept=int(keep.sum().item())),
        **({"exit/fresh_success_rate": _success(fresh)} if fresh else {}),
        **({"exit/revision_success_rate": _success(revision)} if revision else {}),
        "exit/revision_frac": len(revision) / rewards.numel(),
        "exit/learnability_mean": float(np.mean(scores)),
        **sampler.stats(),
        **train_metrics,
        "policy_version": engine.version,
        **step_timings(groups, t0, t1, t2),
    }


def _success(trajectories) -> float:
    return sum(bool(t.info.get("success")) for t in trajectories) / len(trajectories)
