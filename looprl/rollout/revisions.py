"""Play groups of self-improvement episodes from ExIt starting points."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

from looprl.envs.revise import ReviseAttempts
from looprl.rollout.collect import EpisodePlayer, FaultPolicy
from looprl.rollout.engine import InferenceEngine, SamplingParams
from looprl.rollout.exit_sampler import StartingPoint
from looprl.types import Trajectory


def attempt_history(env: ReviseAttempts) -> list[str] | None:
    """An episode's full action history when its attempt ended (a valid next starting point)."""
    return list(env.history) if env.attempt_ended else None


def revision_player(engine: InferenceEngine, tokenizer, make_env: Callable[[], object], params: SamplingParams, *,
                    max_tokens: int = 2048, context: str = "last", faults: FaultPolicy = FaultPolicy(),
                    concurrency: str = "thread") -> EpisodePlayer:
    """An `EpisodePlayer` of ExIt episodes: each in `ReviseAttempts(make_env())`, which
    replays the starting point's history (the replayed attempts are prompt, loss mask 0);
    what it observes of each episode is `attempt_history`."""
    return EpisodePlayer(engine, tokenizer, make_env, params, max_tokens=max_tokens, faults=faults,
                         concurrency=concurrency, wrap=functools.partial(ReviseAttempts, context=context),
                         observe=attempt_history)


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

    Returns:
        `(groups, histories)`: one list of `group_size` trajectories per kept starting
        point, in order, and for each episode its full action history when its attempt
        ended (a valid next starting point), else None.
    """
    player = revision_player(engine, tokenizer, make_env, params, max_tokens=max_tokens, context=context)
    collection = player.collect([s.seed for s in starts], group_size, [s.reset_options for s in starts])
    return collection.episodes, [g.observed for g in collection.groups]
