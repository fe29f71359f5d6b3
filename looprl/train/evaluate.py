"""Held-out evaluation: success rate, return, turns and tokens over N episodes, one record per
episode, and the paired change between two evaluations of the same tasks."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from looprl.envs import make_env
from looprl.rollout.collect import collect_groups
from looprl.rollout.engine import InferenceEngine, SamplingParams
from looprl.types import Episode, Trajectory

EVAL_SEED = 1234


def evaluate_episodes(
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
) -> list[dict[str, Any]]:
    """Play `episodes` episodes on seeds 0..N-1 (the same tasks every time); one record each.

    Sampling uses its own fixed torch seed, so evaluating never shifts the training
    run's random stream and two policies are compared on the same draws: records of
    two evaluations pair up by `seed` (see `paired_change`).
    `context_window` is the agent's (see `looprl.rollout.agent.run_episode`).
    """
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    seeds = list(range(episodes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EVAL_SEED)
        groups = collect_groups(
            engine, tokenizer, lambda: make_env(env_id, **env_kwargs), seeds, 1, params,
            max_tokens=max_tokens, context_window=context_window,
        )
    return [episode_record(seed, group[0]) for seed, group in zip(seeds, groups)]


def episode_record(seed: int, episode: Trajectory | Episode) -> dict[str, Any]:
    """What a report keeps of one evaluation episode."""
    return {
        "seed": seed,
        "task_id": episode.task_id,
        "success": bool(episode.info.get("success")),
        "return": episode.reward,
        "turns": episode.num_turns,
        "tokens": episode.num_sampled_tokens,
        "truncated": bool(episode.truncated),
    }


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    n = len(records)
    success = sum(r["success"] for r in records) / n
    return {
        "episodes": n,
        "success_rate": success,
        "success_stderr": math.sqrt(success * (1 - success) / n),
        "mean_return": sum(r["return"] for r in records) / n,
        "mean_turns": sum(r["turns"] for r in records) / n,
        "mean_tokens": sum(r["tokens"] for r in records) / n,
        "truncated_frac": sum(r["truncated"] for r in records) / n,
    }


def paired_change(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How success changed between two evaluations of the same tasks, paired by seed.

    Paired, the noise of which tasks were drawn cancels: only the episodes whose outcome
    changed count. `gained` went from failure to success, `lost` the other way, and
    `p_value` is the exact two-sided sign test of gained against lost (the chance of a
    split at least this uneven if the policies were equally good).
    """
    by_seed = {r["seed"]: r for r in before}
    if len(by_seed) != len(before) or {r["seed"] for r in after} != set(by_seed) or len(after) != len(before):
        raise ValueError(f"Expect two evaluations of the same seeds to pair, actually {len(before)} and "
                         f"{len(after)} episodes on different seeds")
    for r in after:
        if r["task_id"] != by_seed[r["seed"]]["task_id"]:
            raise ValueError(f"Expect seed {r['seed']} to be the same task in both evaluations, actually "
                             f"{by_seed[r['seed']]['task_id']!r} and {r['task_id']!r}")
    gained = sum(r["success"] and not by_seed[r["seed"]]["success"] for r in after)
    lost = sum(by_seed[r["seed"]]["success"] and not r["success"] for r in after)
    n = len(after)
    return {
        "episodes": n,
        "before": sum(r["success"] for r in before) / n,
        "after": sum(r["success"] for r in after) / n,
        "change": (gained - lost) / n,
        "gained": gained,
        "lost": lost,
        "p_value": sign_test(gained, lost),
    }


def sign_test(a: int, b: int) -> float:
    """Exact two-sided sign test: P(a split at least as uneven as a:b | each side 1/2)."""
    n, k = a + b, min(a, b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def describe_change(change: dict[str, float]) -> str:
    """`+3.8 pts (53 gained, 15 lost; sign test p = 4e-06)`."""
    return (f"{100 * change['change']:+.1f} pts ({change['gained']} gained, {change['lost']} lost; "
            f"sign test p = {change['p_value']:.2g})")
