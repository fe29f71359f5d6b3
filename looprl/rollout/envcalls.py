"""Environment calls off the event loop, with their faults turned into `EpisodeError`.

Each episode's `reset` and `step` calls run, one after the other, on a daemon thread
(`EnvWorker`): by default one of its own, so a slow tool delays only its own episode,
the tools of concurrent episodes run at the same time, and an environment whose objects
are bound to the thread that made them (an sqlite connection opened in `reset`) keeps
working; or one shared by every episode, for environments whose library is not
thread-safe (`looprl.rollout.collect.EnvConcurrency`).

A call that raises, runs past its timeout, or returns something that is not what
Gymnasium's API says (`check_reset`, `check_step`) becomes an `EpisodeError`: the
episode is lost, the process goes on. A thread cannot be killed: after a timeout the
thread is abandoned, still running the call, and the environment object must be
dropped (nothing else may call it); closing it is queued on that thread, behind the hung
call. Being a daemon thread, it never delays the exit of the event loop or of the process.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import numbers
import queue
import threading
from typing import Any, Callable

import numpy as np

REASONS = ("env_error", "env_timeout", "env_garbage", "engine_error")
_names = itertools.count()


class EpisodeError(Exception):
    """An episode was lost to its environment or to the engine.

    Attributes:
        reason: one of `REASONS`: the environment raised (`env_error`), ran past its
            timeout (`env_timeout`), returned something malformed (`env_garbage`), or
            the engine failed to sample a turn (`engine_error`).
        detail: what happened, for the log.
    """

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"Expect `reason` to be one of {REASONS}, actually: {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def __reduce__(self):
        return type(self), (self.reason, self.detail)


class EnvWorker:
    """Runs one episode's environment calls on a daemon thread of its own.

    Args:
        timeout_s: the longest one call may take (None: no limit).
    """

    def __init__(self, timeout_s: float | None = None):
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"Expect `step_timeout_s` to be positive or None, actually: {timeout_s}")
        self.timeout_s = timeout_s
        self.abandoned = False
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"looprl-env-{next(_names)}", daemon=True)
        self._thread.start()

    async def call(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """`fn(*args, **kwargs)` on the worker thread; `what` names it in errors.

        Raises:
            EpisodeError: `env_error` if it raised, `env_timeout` past `timeout_s`.
        """
        if self.abandoned:  # shared by episodes, one of which timed out: its thread is stuck in that call
            raise EpisodeError("env_timeout", f"{what}: the env thread is stuck in an earlier call that timed out")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((loop, future, fn, args, kwargs))
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except Exception as e:
            if isinstance(e, TimeoutError) and future.cancelled():  # wait_for's timeout, not the call's own
                self.abandoned = True  # its owner closes it: the thread exits once the call returns, if ever
                detail = f"{what} ran past {self.timeout_s} s; its thread is abandoned"
                raise EpisodeError("env_timeout", detail) from None
            raise EpisodeError("env_error", f"{what} raised {type(e).__name__}: {e}") from e

    def submit(self, fn: Callable[[], Any]) -> None:
        """Run `fn()` on the worker thread after the calls before it, without waiting (an
        abandoned worker too: e.g. closing the environment once its hung call returns)."""
        self._calls.put((None, None, fn, (), {}))

    def close(self) -> None:
        """Let the thread end once the calls queued before it are done."""
        self._calls.put(None)

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            loop, future, fn, args, kwargs = item
            if future is None:  # submitted: nobody waits for it
                try:
                    fn()
                except BaseException:  # noqa: BLE001 (submit's callers handle their own errors)
                    pass
                continue
            try:
                outcome, value = future.set_result, fn(*args, **kwargs)
            except BaseException as e:  # handed to the episode, which decides
                outcome, value = future.set_exception, e
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, value)
            except RuntimeError:  # the loop closed while the call ran (an abandoned call)
                pass


def _settle(future: asyncio.Future, outcome, value) -> None:
    if not future.done():
        outcome(value)


def check_reset(result: Any) -> tuple[str, dict]:
    """`(obs, info)` of a looprl `reset`, or `EpisodeError("env_garbage")`."""
    if not (isinstance(result, tuple) and len(result) == 2):
        _garbage(f"reset must return (obs, info), got {_describe(result)}")
    obs, info = result
    _check_obs("reset", obs)
    _check_info("reset", info, ("messages", "tools", "task_id"))
    return obs, info


def check_step(result: Any) -> tuple[str, float, bool, bool, dict]:
    """`(obs, reward, terminated, truncated, info)` of a `step`, or `EpisodeError("env_garbage")`.

    `info["messages"]` is required unless the episode ended (it is not rendered then).
    """
    if not (isinstance(result, tuple) and len(result) == 5):
        _garbage(f"step must return (obs, reward, terminated, truncated, info), got {_describe(result)}")
    obs, reward, terminated, truncated, info = result
    _check_obs("step", obs)
    if isinstance(reward, (bool, np.bool_)) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        _garbage(f"step must return a finite real reward, got {reward!r}")
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        if not isinstance(flag, (bool, np.bool_)):
            _garbage(f"step must return a bool `{name}`, got {flag!r}")
    ended = bool(terminated or truncated)
    _check_info("step", info, () if ended else ("messages",))
    return obs, float(reward), bool(terminated), bool(truncated), info


def _check_obs(where: str, obs: Any) -> None:
    if not isinstance(obs, str):
        _garbage(f"{where} must return a str observation, got {type(obs).__name__}")


def _check_info(where: str, info: Any, required: tuple[str, ...]) -> None:
    if not isinstance(info, dict):
        _garbage(f"{where} must return an info dict, got {type(info).__name__}")
    missing = [key for key in required if key not in info]
    if missing:
        _garbage(f"{where} info lacks {missing}")
    messages = info.get("messages", [])
    if not (isinstance(messages, list)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages)):
        _garbage(f"{where} info['messages'] must be a list of {{'role': str, 'content': str}} dicts, "
                 f"got {messages!r:.200}")


def _describe(value: Any) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return type(value).__name__


def _garbage(detail: str):
    raise EpisodeError("env_garbage", detail)
