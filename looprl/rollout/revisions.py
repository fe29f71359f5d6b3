"""Play groups of self-improvement episodes from ExIt starting points."""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

from looprl.envs.revise import ReviseAttempts
from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.engine import InferenceEngine, SamplingParams
from looprl.rollout.exit_sampler import StartingPoint
from looprl.types import Trajectory


def collect_revisions(
    engine: InferenceEngine,
    tokenizer,
    make_env: Callable[[], object],
    starts: Sequence[StartingPoint],
    group_size: int,
    params: SamplingParams,
    *,
    max_tokens: int = 2048,
    context: str = "last",
) -> tuple[list[list[Trajectory]], list[list[list[str] | None]]]:
    """Play `group_size` episodes from each starting point, all concurrently.

    Each episode runs in `ReviseAttempts(make_env())`: the starting point's history is
    replayed, and the episode is one new attempt, whose sampled tokens are the only
    ones with loss mask 1 (the replayed attempts are prompt).

    Returns:
        `(groups, histories)`: one list of `group_size` trajectories per starting point,
        in order, and for each episode its full action history when its attempt ended
        (a valid next starting point), else None.
    """
    templater = ObservationTemplater(tokenizer)
    envs = [ReviseAttempts(make_env(), context=context) for _ in starts for _ in range(group_size)]

    async def play() -> list[Trajectory]:
        episodes = [
            run_episode(envs[g * group_size + k], engine, tokenizer, templater, params, seed=start.seed,
                        max_tokens=max_tokens, group_id=g, reset_options=start.reset_options)
            for g, start in enumerate(starts) for k in range(group_size)
        ]
        return list(await asyncio.gather(*episodes))

    flat = asyncio.run(play())
    histories = [list(env.history) if env.attempt_ended else None for env in envs]
    for env in envs:
        env.close()
    groups = [flat[g * group_size:(g + 1) * group_size] for g in range(len(starts))]
    return groups, [histories[g * group_size:(g + 1) * group_size] for g in range(len(starts))]
