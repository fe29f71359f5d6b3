"""A bounded, thread-safe stream of finished groups, filtered by staleness on the way out.

Producers (an asyncio loop in a background thread, see `producer.py`) `await put(...)`
each finished group of K episodes; the trainer (the main thread) `take`s a batch of
groups as soon as enough are there. Every group carries the policy version of the
oldest weights that sampled any of its tokens; `take` drops, and counts, every group
more than `max_staleness` versions older than the trainer's current policy, so no
batch ever trains on data that stale. `close()` wakes every waiter on both sides: a
producer blocked on a full stream and a trainer blocked on an empty one both return
at once, so stopping never deadlocks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from looprl.types import Episode, Trajectory

_POLL_S = 0.005  # how often a producer blocked on a full stream looks again


@dataclass
class Group:
    """K episodes of one task, finished.

    Attributes:
        seq: the order in which the producer started it (batches are sorted by it, so a
            batch does not depend on which episode happened to finish first).
        seed: the task seed.
        episodes: the K episodes (`Trajectory` or `Episode`).
        finished_at: `time.perf_counter()` when its last episode ended.
    """

    seq: int
    seed: int
    episodes: list[Trajectory | Episode]
    finished_at: float = field(default_factory=time.perf_counter)

    @property
    def policy_version(self) -> int:
        """The oldest weights that sampled any token of the group."""
        return min(e.policy_version for e in self.episodes)


class StreamClosed(Exception):
    """The stream was closed while a caller waited on it (raised with the producer's error, if any)."""


class GroupStream:
    """Bounded FIFO of finished groups with a staleness filter and drop counters.

    Args:
        capacity: the most groups held; `put` waits while it is full.
        max_staleness: `take` drops groups whose policy version is more than this
            many versions older than the version it is given.
        on_drop: called with `(group, reason)` for each dropped group (the producer
            frees its slot so another group replaces it).
    """

    def __init__(self, capacity: int, max_staleness: int, on_drop: Callable[[Group, str], None] | None = None):
        if capacity <= 0:
            raise ValueError(f"Expect the stream `capacity` to be positive, actually: {capacity}")
        if max_staleness < 0:
            raise ValueError(f"Expect `max_staleness` to be >= 0, actually: {max_staleness}")
        self.capacity, self.max_staleness, self.on_drop = capacity, max_staleness, on_drop
        self.dropped: Counter[str] = Counter()  # episodes dropped, by reason
        self._groups: list[Group] = []
        self._cond = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None

    def __len__(self) -> int:
        with self._cond:
            return len(self._groups)

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, group: Group) -> bool:
        """Add a group, waiting (without blocking the event loop) while the stream is full.

        Returns False, and drops the group, if the stream is or gets closed.
        """
        while True:
            with self._cond:
                if self._closed:
                    return False
                if len(self._groups) < self.capacity:
                    self._groups.append(group)
                    self._cond.notify_all()
                    return True
            await asyncio.sleep(_POLL_S)

    def take(self, n: int, version: int, *, should_stop: Callable[[], bool] = lambda: False,
             on_wait: Callable[[], None] | None = None, poll_s: float = 0.1) -> list[Group] | None:
        """The `n` earliest-started groups no more than `max_staleness` behind `version`.

        Stale groups are dropped (reason "stale") as they are found. Waits until `n`
        fresh groups are there; returns None if `should_stop()` turns true first.

        Raises:
            StreamClosed: the stream was closed (carrying the producer's error, if any).
        """
        while True:
            stale = []
            with self._cond:
                self._groups, stale = _split_stale(self._groups, version, self.max_staleness)
                if len(self._groups) >= n:
                    self._groups.sort(key=lambda g: g.seq)
                    batch, self._groups = self._groups[:n], self._groups[n:]
                    self._cond.notify_all()
                elif self._closed:
                    raise StreamClosed("the rollout stream was closed") from self._error
                else:
                    batch = None
                    self._cond.wait(poll_s)
            for group in stale:
                self._drop(group, "stale")
            if batch is not None:
                return batch
            if should_stop():
                return None
            if on_wait is not None:
                on_wait()

    def count_drop(self, reason: str, episodes: int) -> None:
        with self._cond:
            self.dropped[reason] += episodes

    def close(self, error: BaseException | None = None) -> None:
        """Refuse new groups and wake every waiter; `take` then raises with `error`."""
        with self._cond:
            self._closed = True
            self._error = self._error or error
            self._cond.notify_all()

    def _drop(self, group: Group, reason: str) -> None:
        self.count_drop(reason, len(group.episodes))
        if self.on_drop is not None:
            self.on_drop(group, reason)


def _split_stale(groups: list[Group], version: int, max_staleness: int) -> tuple[list[Group], list[Group]]:
    fresh = [g for g in groups if version - g.policy_version <= max_staleness]
    stale = [g for g in groups if version - g.policy_version > max_staleness]
    return fresh, stale
