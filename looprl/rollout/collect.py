"""Run many episodes concurrently and group them by task."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.engine import InferenceEngine, SamplingParams
from looprl.rollout.envcalls import EpisodeError
from looprl.types import Episode, Trajectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpisodeFailure:
    """One lost attempt at an episode.

    Attributes:
        group: the index of its seed in `seeds`.
        seed: the task seed.
        error: why it was lost (`error.reason` is one of `envcalls.REASONS`).
    """

    group: int
    seed: int
    error: EpisodeError


def collect_groups(
    engine: InferenceEngine,
    tokenizer,
    make_env: Callable[[], object],
    seeds: Sequence[int],
    group_size: int,
    params: SamplingParams,
    *,
    max_tokens: int = 2048,
    templater: ObservationTemplater | None = None,
    context_window: int | None = None,
    step_timeout_s: float | None = None,
    max_retries: int = 1,
    return_failures: bool = False,
) -> list[list[Trajectory | Episode]] | tuple[list[list[Trajectory | Episode]], list[EpisodeFailure]]:
    """Play `group_size` episodes of each task seed, all concurrently.

    An episode lost to an `EpisodeError` (its environment raised, ran past
    `step_timeout_s` or returned garbage, or the engine failed; see `run_episode`) is
    played again from its seed with a fresh `make_env()`, up to `max_retries` times,
    concurrently with the others. If it is still lost, its whole group is dropped: a
    group holds `group_size` episodes of one task or none. Healthy episodes are played
    exactly as without failures (same batches, same random draws) while no episode
    fails. Each failure is logged as a warning.

    Returns:
        One list of `group_size` episodes per kept seed, in the order of `seeds` (each
        episode's `group_id` is the index of its seed): each a `Trajectory`, or with a
        `context_window` an `Episode` of chunks. With `return_failures`, the pair
        `(groups, failures)`, `failures` listing every lost attempt, retried or not.

    Raises:
        RuntimeError: every group was dropped (the environment or engine is broken).
    """
    if max_retries < 0:
        raise ValueError(f"Expect `max_retries` to be >= 0, actually: {max_retries}")
    templater = templater or ObservationTemplater(tokenizer)
    failures: list[EpisodeFailure] = []

    async def play_one(env, g: int, seed: int) -> Trajectory | Episode | None:
        for attempt in range(max_retries + 1):
            try:
                return await run_episode(env, engine, tokenizer, templater, params, seed=seed, max_tokens=max_tokens,
                                         group_id=g, context_window=context_window, step_timeout_s=step_timeout_s)
            except EpisodeError as e:
                failures.append(EpisodeFailure(g, seed, e))
                log.warning("Episode of seed %d (group %d) lost, attempt %d of %d: %s",
                            seed, g, attempt + 1, max_retries + 1, e)
                env = make_env()  # the old one may still be in use by an abandoned thread
        return None

    async def play() -> list[Trajectory | Episode | None]:
        # The environments are made up front, in order, as they always were.
        episodes = [play_one(make_env(), g, seed) for g, seed in enumerate(seeds) for _ in range(group_size)]
        return list(await asyncio.gather(*episodes))

    flat = asyncio.run(play())
    groups = [flat[g * group_size:(g + 1) * group_size] for g in range(len(seeds))]
    kept = [group for group in groups if None not in group]
    if seeds and not kept:
        reasons = Counter(f.error.reason for f in failures)
        raise RuntimeError(f"Every group was lost to episode failures ({dict(reasons)}); the first: "
                           f"{failures[0].error}") from failures[0].error
    return (kept, failures) if return_failures else kept


def collect_step_groups(cfg, engine: InferenceEngine, tokenizer, seeds: Sequence[int]) -> list[list[Trajectory | Episode]]:
    """The groups of one training step of run config `cfg`: `group_size` episodes per task seed."""
    from looprl.envs import make_env

    params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature)
    return collect_groups(
        engine, tokenizer, lambda: make_env(cfg.env.id, **cfg.env.kwargs), seeds,
        cfg.rollout.group_size, params, max_tokens=cfg.env.max_tokens, context_window=cfg.rollout.context_window,
    )
