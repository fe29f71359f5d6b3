"""Run many episodes concurrently and group them by task."""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.engine import InferenceEngine, SamplingParams
from looprl.types import Episode, Trajectory


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
) -> list[list[Trajectory | Episode]]:
    """Play `group_size` episodes of each task seed, all concurrently.

    Returns one list of `group_size` episodes per seed, in the order of `seeds`: each a
    `Trajectory`, or with a `context_window` an `Episode` of chunks (see `run_episode`).
    """
    templater = templater or ObservationTemplater(tokenizer)

    async def play() -> list[Trajectory | Episode]:
        episodes = [
            run_episode(make_env(), engine, tokenizer, templater, params,
                        seed=seed, max_tokens=max_tokens, group_id=g, context_window=context_window)
            for g, seed in enumerate(seeds) for _ in range(group_size)
        ]
        return list(await asyncio.gather(*episodes))

    flat = asyncio.run(play())
    return [flat[g * group_size:(g + 1) * group_size] for g in range(len(seeds))]
