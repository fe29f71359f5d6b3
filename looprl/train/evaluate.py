"""Held-out evaluation: success rate, return, turns and tokens over N episodes."""

from __future__ import annotations

import math
from typing import Any

import torch

from looprl.envs import make_env
from looprl.rollout.collect import collect_groups
from looprl.rollout.engine import InferenceEngine, SamplingParams
from looprl.types import Episode, Trajectory

EVAL_SEED = 1234


def evaluate(
    engine: InferenceEngine,
    tokenizer,
    env_id: str,
    env_kwargs: dict[str, Any],
    episodes: int,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    max_tokens: int = 1024,
    context_window: int | None = None,
) -> dict[str, float]:
    """Play `episodes` episodes on seeds 0..N-1 (the same tasks every time).

    Sampling uses its own fixed torch seed, so evaluating never shifts the training
    run's random stream and two policies are compared on the same draws.
    `context_window` is the agent's (see `looprl.rollout.agent.run_episode`).
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED)
        groups = collect_groups(
            engine, tokenizer, lambda: make_env(env_id, **env_kwargs), list(range(episodes)), 1, params,
            max_tokens=max_tokens, context_window=context_window,
        )
    return summarize([g[0] for g in groups])


def summarize(trajectories: list[Trajectory | Episode]) -> dict[str, float]:
    n = len(trajectories)
    success = sum(bool(t.info.get("success")) for t in trajectories) / n
    return {
        "episodes": n,
        "success_rate": success,
        "success_stderr": math.sqrt(success * (1 - success) / n),
        "mean_return": sum(t.reward for t in trajectories) / n,
        "mean_turns": sum(t.num_turns for t in trajectories) / n,
        "mean_tokens": sum(t.num_sampled_tokens for t in trajectories) / n,
        "truncated_frac": sum(t.truncated for t in trajectories) / n,
    }
