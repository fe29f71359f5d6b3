"""Rollout producers: groups of K episodes played in a background event loop, pushed into a stream.

`RolloutProducer` runs an asyncio loop in its own thread. It keeps groups in flight
(every episode of every group concurrently, batched by the engine) and pushes each
finished group into a `GroupStream`. How far it may run ahead of the trainer is a
budget in groups: group number n (counting the ones not dropped) may start once the
trainer has finished `n // groups_per_batch - max_staleness` steps. With
`max_staleness=0` a batch's groups start only after the previous batch's update, all
at once and in seed order: exactly the synchronous loop. Larger values let producers
work up to `max_staleness` batches ahead while the trainer updates.

Episodes are played by `looprl.rollout.collect.EpisodePlayer`, the one collection path
of every mode, with its fault policy: an environment that raises, hangs past
`step_timeout` or returns something that is not a Gymnasium step loses the attempt
(counted by reason, reported through `on_drop`), which is replayed up to `retries`
times; an episode still lost drops its group, whose leave-one-out baseline needs all K,
and a replacement group takes its slot. Any other error (the engine's) stops the
producer and closes the stream with it, so the trainer raises it instead of waiting
forever.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import gymnasium
import torch

from looprl.rollout.collect import EpisodeFailure, EpisodeLost, EpisodePlayer, FaultPolicy
from looprl.rollout.engine import HFEngine, SamplingParams
from looprl.rollout.stream import Group, GroupStream
from looprl.types import Episode, Trajectory

log = logging.getLogger("looprl.rollout")


class GroupLost(Exception):
    """A whole group was lost outside its environments (e.g. `producer_died`): its K episodes
    are dropped with `reason` and a replacement group takes its slot."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class RolloutProducer:
    """Plays groups in a background thread's event loop and pushes them into `stream`.

    Args:
        engine: where turns are sampled (a `SnapshotEngine` when the trainer updates
            concurrently).
        tokenizer: the policy's tokenizer.
        make_env: builds one environment.
        next_seeds: returns the next task seeds (called for a batch's worth at a time).
        stream: where finished groups go.
        group_size: K, episodes per task.
        groups_per_batch: groups the trainer takes per step.
        max_staleness: how many steps ahead of the trainer producers may start groups.
        params: sampling settings.
        max_tokens, context_window: as in `run_episode`.
        step_timeout: seconds an environment call may take (None: no limit).
        threads: torch threads for the producer's generate calls.
        on_drop: called as `on_drop(reason, detail, seed)` for each dropped episode.
        retries: how often an episode lost to its environment is replayed (a run passes
            its `rollout.env_retries`).
        concurrency: how environment calls run (`looprl.rollout.collect.EnvConcurrency`).
    """

    def __init__(self, engine: HFEngine, tokenizer, make_env: Callable[[], gymnasium.Env],
                 next_seeds: Callable[[int], list[int]], stream: GroupStream, *, group_size: int,
                 groups_per_batch: int, max_staleness: int, params: SamplingParams, max_tokens: int,
                 context_window: int | None = None, step_timeout: float | None = None, threads: int = 1,
                 on_drop: Callable[[str, str, int], None] | None = None, retries: int = 0,
                 concurrency: str = "thread"):
        self.engine, self.tokenizer, self.make_env, self.stream = engine, tokenizer, make_env, stream
        self._next_seeds, self.group_size, self.groups_per_batch = next_seeds, group_size, groups_per_batch
        self.max_staleness, self.params, self.max_tokens = max_staleness, params, max_tokens
        self.context_window, self.step_timeout, self.threads = context_window, step_timeout, threads
        self.on_drop = on_drop
        self.player = EpisodePlayer(engine, tokenizer, make_env, params, max_tokens=max_tokens,
                                    context_window=context_window, faults=FaultPolicy(retries, step_timeout),
                                    concurrency=concurrency, on_failure=self._lost_attempt)
        self.stats = {"episodes": 0, "sampled_tokens": 0, "groups": 0}  # finished, counted in the loop thread
        self._seeds: deque[int] = deque()
        self._lock = threading.Lock()
        self._steps_done = 0
        self._min_version = -1  # the weights version newly started groups must be played on
        self._issued = 0  # groups started and not dropped
        self._seq = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._started = threading.Event()

    # --- called from the trainer's thread ---------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="looprl-rollouts", daemon=True)
        self._thread.start()
        self._started.wait()

    def release(self, steps_done: int, min_version: int | None = None) -> None:
        """The trainer has finished `steps_done` steps: producers may start groups up to
        `max_staleness` batches beyond them. `min_version`: the weights version those
        groups must start on, for an engine that loads pushed weights in the background
        (Ray actors); the local engine has them already when the push returns."""
        with self._lock:
            self._steps_done = steps_done
            if min_version is not None:
                self._min_version = min_version
        self._poke()

    def free(self, group: Group, reason: str) -> None:
        """A queued group was dropped (e.g. stale): let a new one take its slot."""
        with self._lock:
            self._issued -= 1
        self._poke()

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop producing: close the stream, cancel the episodes in flight, join the thread.

        Returns whether the thread ended within `timeout` (it is a daemon either way,
        so an environment call that never returns cannot keep the process alive).
        """
        self._stopping = True
        self.stream.close()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._cancel_all)
            except RuntimeError:  # the loop closed in between
                pass
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict[str, int]:
        """Groups in flight and queued, for the progress display."""
        return {"in_flight": self._in_flight, "queued": len(self.stream)}

    # --- the producer's thread ----------------------------------------------------------

    def _thread_main(self) -> None:
        torch.set_num_threads(self.threads)
        loop = asyncio.new_event_loop()
        executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="looprl-generate")
        loop.set_default_executor(executor)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # noqa: BLE001 (hand any producer failure to the trainer)
            self.stream.close(e)
        finally:
            self._started.set()  # never leave start() waiting, even if the loop failed at once
            self.stream.close()
            loop.run_until_complete(_cancel_pending(loop))
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._started.set()
        self._failure: asyncio.Future = asyncio.get_running_loop().create_future()
        while not self._stopping:
            self._launch_allowed()
            waiter = asyncio.ensure_future(self._wake.wait())
            done, _ = await asyncio.wait({waiter, self._failure}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if self._failure in done:
                raise self._failure.result()
            self._wake.clear()

    def _launch_allowed(self) -> None:
        while True:
            with self._lock:
                allowed = (self._steps_done + self.max_staleness + 1) * self.groups_per_batch
                if self._issued >= allowed or self._stopping:
                    return
                self._issued += 1
                seq, self._seq = self._seq, self._seq + 1
                min_version = self._min_version
            task = asyncio.get_running_loop().create_task(self._play_group(seq, self._next_seed(), min_version))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _next_seed(self) -> int:
        # A batch's worth at a time, as the synchronous loop samples them.
        if not self._seeds:
            self._seeds.extend(self._next_seeds(self.groups_per_batch))
        return self._seeds.popleft()

    async def _play_group(self, seq: int, seed: int, min_version: int = -1) -> None:
        self._in_flight += 1
        try:
            results = await self._play_episodes(seq, seed, min_version)
        except GroupLost as lost:  # e.g. the remote producer playing it died
            self._report(lost.reason, lost.detail, seed, self.group_size)
            self._free_slot()
            return
        finally:
            self._in_flight -= 1
        failed = [r for r in results if isinstance(r, BaseException)]
        fatal = [r for r in failed if not isinstance(r, EpisodeLost)]
        if fatal:
            if not self._failure.done() and not isinstance(fatal[0], asyncio.CancelledError):
                self._failure.set_result(fatal[0])
            return
        if failed:  # each lost attempt was reported as it happened
            self._report("incomplete_group", f"{len(failed)} of its episodes were lost", seed,
                         self.group_size - len(failed))
            self._free_slot()
            return
        group = Group(seq, seed, list(results))
        self.stats["groups"] += 1
        self.stats["episodes"] += len(results)
        self.stats["sampled_tokens"] += sum(e.num_sampled_tokens for e in results)
        if not await self.stream.put(group):
            return  # closed: the run is stopping

    async def _play_episodes(self, seq: int, seed: int,
                             min_version: int = -1) -> list[Trajectory | Episode | BaseException]:
        """The group's K episodes, each an episode or the error that lost it (a remote
        backend overrides this to play them elsewhere)."""
        return await asyncio.gather(*(self._play_episode(seed, seq) for _ in range(self.group_size)),
                                    return_exceptions=True)

    async def _play_episode(self, seed: int, seq: int) -> Trajectory | Episode:
        episode, _ = await self.player.play(seed, seq)
        return episode

    def _lost_attempt(self, failure: EpisodeFailure) -> None:
        self._report(failure.error.reason, failure.error.detail, failure.seed, 1)

    def _report(self, reason: str, detail: str, seed: int, episodes: int) -> None:
        if episodes <= 0:
            return
        self.stream.count_drop(reason, episodes)
        if self.on_drop is not None:
            self.on_drop(reason, detail, seed)

    def _free_slot(self) -> None:
        """(Loop thread) a group was lost: a replacement may start."""
        with self._lock:
            self._issued -= 1
        self._wake.set()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:
                pass

    def _cancel_all(self) -> None:
        if self._wake is not None:
            self._wake.set()
        for task in list(self._tasks):
            task.cancel()


async def _cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
