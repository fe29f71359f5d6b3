"""Play episodes and group them by task: the one collection path of every mode.

Synchronous steps, the asynchronous producers (local and Ray), ExIt and evaluation all
play their episodes through `EpisodePlayer.play`, so they share one fault policy:

- an episode lost to its environment (it raised, ran past `FaultPolicy.step_timeout_s`
  or returned garbage: an `EpisodeError`, see `looprl.rollout.envcalls`) is played
  again from its seed on a fresh environment, up to `FaultPolicy.retries` times; every
  lost attempt is counted under its reason (`rollout/dropped/<reason>`);
- a group still missing an episode is dropped whole (its leave-one-out baseline needs
  all K): its healthy episodes count as `rollout/dropped/incomplete_group`;
- an engine failure is not the environment's fault: it stops the collection (a
  `RuntimeError` naming it) instead of being retried and hidden;
- every environment is closed when its episode ends, lost or not (after a timeout, once
  the abandoned call returns, on the thread that ran it).

`EnvConcurrency` says how the environments' calls run: on a thread per episode
(`thread`, the default: slow tools overlap), or all on one shared thread (`serial`, for
environments whose library is not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.engine import InferenceEngine, SamplingParams, stream_seed
from looprl.rollout.envcalls import REASONS, EnvWorker, EpisodeError
from looprl.types import Episode, Trajectory

log = logging.getLogger(__name__)

# Why episodes are dropped, in every mode (`rollout/dropped/<reason>`): the environment's
# faults, a group dropped for a lost episode, a group too stale to train on (async), a
# rollout actor that died with the group (Ray).
DROP_REASONS = ("stale", "env_error", "env_timeout", "env_garbage", "incomplete_group", "producer_died")
ENV_FAULTS = tuple(r for r in REASONS if r != "engine_error")


@dataclass(frozen=True)
class FaultPolicy:
    """How lost episodes are handled.

    Attributes:
        retries: how often an episode lost to its environment is replayed from its seed.
        step_timeout_s: the longest one `reset` or `step` may take (None: no limit).
    """

    retries: int = 1
    step_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"Expect `max_retries` to be >= 0, actually: {self.retries}")
        if self.step_timeout_s is not None and not self.step_timeout_s > 0:
            raise ValueError(f"Expect `step_timeout_s` to be positive or None, actually: {self.step_timeout_s}")


class EnvConcurrency:
    """The worker each episode's environment calls run on.

    Args:
        mode: `thread` (a thread per episode) or `serial` (one thread for all, so no two
            calls ever overlap).
        timeout_s: the longest one call may take.
    """

    MODES = ("thread", "serial")

    def __init__(self, mode: str = "thread", timeout_s: float | None = None):
        if mode not in self.MODES:
            raise ValueError(f"Expect env concurrency to be one of {self.MODES}, actually: {mode!r}")
        self.mode, self.timeout_s = mode, timeout_s
        self._shared: EnvWorker | None = None

    def worker(self) -> tuple[EnvWorker, bool]:
        """A worker for one episode, and whether the episode owns it (and closes it)."""
        if self.mode == "thread":
            return EnvWorker(self.timeout_s), True
        if self._shared is None or self._shared.abandoned:  # a timed-out call holds the old one
            self._shared = EnvWorker(self.timeout_s)
        return self._shared, False

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None


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


class EpisodeLost(Exception):
    """An episode lost to its environment on every attempt; `errors` holds each attempt's."""

    def __init__(self, errors: list[EpisodeError]):
        super().__init__(str(errors[-1]))
        self.errors = errors

    @property
    def reason(self) -> str:
        return self.errors[-1].reason

    @property
    def detail(self) -> str:
        return self.errors[-1].detail


@dataclass
class PlayedGroup:
    """The K episodes of one task seed.

    Attributes:
        index: the seed's position among the seeds collected.
        seed: the task seed.
        episodes: its episodes (each a `Trajectory`, or an `Episode` of chunks).
        observed: per episode, what `EpisodePlayer.observe` read from its environment.
    """

    index: int
    seed: int
    episodes: list[Trajectory | Episode]
    observed: list[Any] = field(default_factory=list)


@dataclass
class Collection:
    """What one call of `collect` played: the kept groups, every lost attempt, and the
    drop counts by reason (`rollout/dropped/<reason>`)."""

    groups: list[PlayedGroup]
    failures: list[EpisodeFailure]
    dropped: Counter

    @property
    def episodes(self) -> list[list[Trajectory | Episode]]:
        return [g.episodes for g in self.groups]


class EpisodePlayer:
    """Plays episodes of one environment with one engine, under one fault policy.

    Args:
        engine: where turns are sampled.
        tokenizer: the policy's tokenizer.
        make_env: builds one environment (called once per attempt).
        params: sampling settings for every turn.
        max_tokens, context_window: as in `run_episode`.
        faults: retries and the per-call timeout.
        concurrency: `thread` or `serial` (see `EnvConcurrency`).
        wrap: applied to each new environment (e.g. ExIt's `ReviseAttempts`).
        observe: called with an episode's environment after the episode, before it is
            closed; its result goes to `PlayedGroup.observed` (e.g. ExIt's histories).
        on_failure: called with each lost attempt's `EpisodeFailure`.
        sampling_seed: None samples from the process's torch random stream (training);
            a seed gives sample k of task seed s the stream `stream_seed(sampling_seed, s, k)`
            of its own (see `run_episode`), so its outcome depends on neither the batch
            size nor which other seeds are played (evaluation).
    """

    def __init__(self, engine: InferenceEngine, tokenizer, make_env: Callable[[], Any], params: SamplingParams, *,
                 max_tokens: int = 2048, context_window: int | None = None, faults: FaultPolicy = FaultPolicy(),
                 concurrency: str = "thread", wrap: Callable[[Any], Any] | None = None,
                 observe: Callable[[Any], Any] | None = None,
                 on_failure: Callable[[EpisodeFailure], None] | None = None,
                 templater: ObservationTemplater | None = None, sampling_seed: int | None = None):
        self.engine, self.tokenizer, self.make_env, self.params = engine, tokenizer, make_env, params
        self.max_tokens, self.context_window, self.faults = max_tokens, context_window, faults
        self.concurrency = EnvConcurrency(concurrency, faults.step_timeout_s)
        self.wrap, self.observe, self.on_failure = wrap, observe, on_failure
        self.templater = templater or ObservationTemplater(tokenizer)
        self.sampling_seed = sampling_seed

    async def play(self, seed: int, group: int = 0, reset_options: dict | None = None,
                   env: Any = None, sample: int = 0) -> tuple[Trajectory | Episode, Any]:
        """One episode of task `seed` (tagged with `group`), replayed after env faults.

        Args:
            env: the first attempt's environment, if already made (later ones are new).
            sample: which of the task's episodes this is (with `sampling_seed`, it names
                the episode's random stream; a replay after a fault draws the same one).

        Returns:
            The episode and what `observe` read from its environment (None without one).

        Raises:
            EpisodeLost: every attempt was lost to the environment.
            RuntimeError: the engine failed (not retried).
        """
        errors: list[EpisodeError] = []
        sample_seed = None if self.sampling_seed is None else stream_seed(self.sampling_seed, seed, sample)
        for attempt in range(self.faults.retries + 1):
            env = self._new_env() if env is None else env
            worker, owned = self.concurrency.worker()
            try:
                episode = await run_episode(env, self.engine, self.tokenizer, self.templater, self.params, seed=seed,
                                            max_tokens=self.max_tokens, group_id=group,
                                            context_window=self.context_window, reset_options=reset_options,
                                            worker=worker, sample_seed=sample_seed)
                return episode, self.observe(env) if self.observe is not None else None
            except EpisodeError as e:
                if e.reason == "engine_error":
                    raise RuntimeError(f"The inference engine failed on task seed {seed}: {e.detail}") from e
                errors.append(e)
                log.warning("Episode of seed %d (group %d) lost, attempt %d of %d: %s",
                            seed, group, attempt + 1, self.faults.retries + 1, e)
                if self.on_failure is not None:
                    self.on_failure(EpisodeFailure(group, seed, e))
            finally:  # played, lost, or cancelled with its run: the environment is closed
                _close(env, worker, owned, seed)
                env = None
        raise EpisodeLost(errors)

    def collect(self, seeds: Sequence[int], group_size: int,
                reset_options: Sequence[dict | None] | None = None) -> Collection:
        """Play `group_size` episodes of each seed, all concurrently; drop incomplete groups.

        Healthy episodes are played exactly as without failures (same batches, same
        random draws) while no episode fails: the environments of first attempts are
        made up front, in order.
        """
        options = list(reset_options) if reset_options is not None else [None] * len(seeds)
        failures: list[EpisodeFailure] = []
        on_failure = self.on_failure

        def record(failure: EpisodeFailure) -> None:
            failures.append(failure)
            if on_failure is not None:
                on_failure(failure)

        self.on_failure = record
        try:
            async def play() -> list:
                first = [self._new_env() for _ in seeds for _ in range(group_size)]
                return list(await asyncio.gather(
                    *(self.play(seed, g, options[g], env=first[g * group_size + k], sample=k)
                      for g, seed in enumerate(seeds) for k in range(group_size)),
                    return_exceptions=True))

            flat = asyncio.run(play())
        finally:
            self.on_failure = on_failure
            self.concurrency.close()
        fatal = [r for r in flat if isinstance(r, BaseException) and not isinstance(r, EpisodeLost)]
        if fatal:
            raise fatal[0]
        groups, dropped = [], Counter({reason: 0 for reason in DROP_REASONS})
        for f in failures:
            dropped[f.error.reason] += 1
        for g, seed in enumerate(seeds):
            results = flat[g * group_size:(g + 1) * group_size]
            lost = sum(isinstance(r, EpisodeLost) for r in results)
            if lost:
                dropped["incomplete_group"] += group_size - lost
                continue
            groups.append(PlayedGroup(g, seed, [e for e, _ in results], [o for _, o in results]))
        if seeds and not groups:
            reasons = Counter(f.error.reason for f in failures)
            raise RuntimeError(f"Every group was lost to episode failures ({dict(reasons)}); the first: "
                               f"{failures[0].error}") from failures[0].error
        return Collection(groups, failures, dropped)

    def _new_env(self):
        env = self.make_env()
        return self.wrap(env) if self.wrap is not None else env


def _close(env, worker: EnvWorker, owned: bool, seed: int) -> None:
    """Close `env` on the thread that runs its calls, after any call still running there
    (an abandoned, timed-out one included), then let an owned worker's thread end."""

    def close() -> None:
        try:
            env.close()
        except Exception as e:  # noqa: BLE001 (the episode is decided; a failing close must not change it)
            log.warning("closing an environment of task seed %d raised %s: %s", seed, type(e).__name__, e)

    worker.submit(close)
    if owned or worker.abandoned:  # an abandoned shared worker has been replaced
        worker.close()


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
    concurrency: str = "thread",
) -> list[list[Trajectory | Episode]] | tuple[list[list[Trajectory | Episode]], list[EpisodeFailure]]:
    """Play `group_size` episodes of each task seed, all concurrently (see `EpisodePlayer`).

    Returns:
        One list of `group_size` episodes per kept seed, in the order of `seeds` (each
        episode's `group_id` is the index of its seed). With `return_failures`, the pair
        `(groups, failures)`, `failures` listing every lost attempt, retried or not.

    Raises:
        RuntimeError: every group was dropped, or the engine failed.
    """
    player = EpisodePlayer(engine, tokenizer, make_env, params, max_tokens=max_tokens, context_window=context_window,
                           faults=FaultPolicy(max_retries, step_timeout_s), concurrency=concurrency,
                           templater=templater)
    collection = player.collect(seeds, group_size)
    return (collection.episodes, collection.failures) if return_failures else collection.episodes


def drop_metrics(dropped: Counter) -> dict[str, float]:
    """`rollout/dropped/<reason>` for every reason (0 where none)."""
    return {f"rollout/dropped/{r}": dropped.get(r, 0) for r in sorted(set(DROP_REASONS) | set(dropped))}
