"""Which episodes of an event loop are between turns, so a batch can wait for them.

Turn-level batching wants one turn of every live episode in one `generate` call. Once
environment calls run off the event loop (`looprl.rollout.envcalls`), the episodes of a
batch come back in whatever order their threads finish, so an engine that took "what is
pending now" would batch by timing: the rows of a batch, and with them the random draws
each episode gets, would change from run to run. The board makes batching depend on
the episodes instead of on the clock:

- `run_episode` registers each episode (`start`), reports each environment call
  (`touch`) and its end (`end`); `HFEngine.generate` reports when an episode asks for
  a turn and the engine when it answers (`asked`, `answered`).
- Every request carries a ticket, handed out in a fixed order: an episode's first
  request has the ticket of its start, a later one the ticket it got when its previous
  turn was answered (rows of a batch in order). Requests made outside an episode get a
  ticket when they arrive. The engine serves pending requests in ticket order.
- Before it takes a batch the engine waits (`settle`) until every live episode is
  waiting for a turn or ended (`wait_s=None`, the default: batches depend on the
  episodes alone, so a run reproduces on a loaded machine), or has made no progress for
  `wait_s` seconds (clocked: an environment call that slow no longer holds the others
  back, but then which batch a turn lands in depends on timing).

Without a clock, or while every environment call takes less than `wait_s`, batches are
exactly what they were when environment calls ran on the loop: the same episodes, in
the same rows.

The board belongs to one event loop (`turn_board()`); the running episode is found
through a context variable (`current_episode()`), which each asyncio task has its own
copy of, so `run_episode` tasks running concurrently never see each other's.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass

_CURRENT: contextvars.ContextVar[EpisodeTurn | None] = contextvars.ContextVar("looprl_episode", default=None)
_BOARDS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TurnBoard] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class EpisodeTurn:
    """One live episode as the board sees it.

    Attributes:
        ticket: orders this episode's next request among all pending ones.
        outstanding: its requests the engine has not answered yet (0: it is busy).
        since: loop time of its last progress (started, answered, env call began/ended).
        ended: the episode is over (a late answer must not make it busy again).
    """

    ticket: int
    outstanding: int = 0
    since: float = 0.0
    ended: bool = False


class TurnBoard:
    """The live episodes of one event loop and which of them are busy (see module doc)."""

    def __init__(self) -> None:
        self._tickets = 0
        self._busy: set[EpisodeTurn] = set()
        self._waiters: list[asyncio.Future] = []
        self._on_end: set[Callable[[EpisodeTurn], None]] = set()

    def on_end(self, callback: Callable[[EpisodeTurn], None]) -> None:
        """Call `callback(episode)` whenever an episode ends (an engine frees what it holds for it)."""
        self._on_end.add(callback)

    def ticket(self) -> int:
        self._tickets += 1
        return self._tickets

    def start(self) -> EpisodeTurn:
        episode = EpisodeTurn(self.ticket(), since=_now())
        self._busy.add(episode)
        return episode

    def touch(self, episode: EpisodeTurn) -> None:
        """The episode made progress (an environment call began or ended)."""
        episode.since = _now()

    def end(self, episode: EpisodeTurn) -> None:
        episode.ended = True
        self._busy.discard(episode)
        self._notify()
        for callback in self._on_end:
            callback(episode)

    def asked(self, episode: EpisodeTurn, n: int) -> int:
        """The episode asked for `n` turns; returns the ticket its requests carry."""
        episode.outstanding += n
        self._busy.discard(episode)
        self._notify()
        return episode.ticket

    def answered(self, episode: EpisodeTurn) -> None:
        """One of its requests was answered; with none left it is busy again, next in
        line after the episodes answered before it."""
        episode.outstanding -= 1
        if episode.outstanding == 0 and not episode.ended:
            episode.ticket, episode.since = self.ticket(), _now()
            self._busy.add(episode)

    def busy(self, skip: Collection[EpisodeTurn] = ()) -> bool:
        """Whether an episode outside `skip` is busy (in an environment call)."""
        return any(e not in skip for e in self._busy)

    async def settle(self, wait_s: float | None, skip: Collection[EpisodeTurn] = ()) -> None:
        """Wait until no busy episode outside `skip` has made progress in the last `wait_s`
        (None: until no episode outside `skip` is busy, however long its call takes)."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if wait_s is None:
                due = [math.inf] if self.busy(skip) else []
            else:
                due = [e.since + wait_s for e in self._busy if e not in skip and e.since + wait_s > now]
            if not due:
                return
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, None if wait_s is None else min(due) - now)
            except TimeoutError:
                pass

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


def turn_board() -> TurnBoard:
    """The board of the running event loop."""
    loop = asyncio.get_running_loop()
    board = _BOARDS.get(loop)
    if board is None:
        board = _BOARDS[loop] = TurnBoard()
    return board


def current_episode() -> EpisodeTurn | None:
    """The episode the running task is playing (None outside `run_episode`)."""
    return _CURRENT.get()


def enter_episode(episode: EpisodeTurn) -> contextvars.Token:
    return _CURRENT.set(episode)


def exit_episode(token: contextvars.Token) -> None:
    _CURRENT.reset(token)


def _now() -> float:
    return asyncio.get_running_loop().time()
