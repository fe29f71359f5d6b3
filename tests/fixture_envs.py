"""Test environments that watch how the rollout code treats them (registered on import:
use them as `tests.fixture_envs:<id>`, which also works in a Ray actor's process)."""

from __future__ import annotations

import threading
import time

import gymnasium

from looprl.envs import make_env


class Counted(gymnasium.Wrapper):
    """Calc-v0 that counts its open instances: made ones minus closed ones."""

    open = 0
    lock = threading.Lock()

    def __init__(self, **kwargs):
        super().__init__(make_env("looprl/Calc-v0", **kwargs))
        with Counted.lock:
            Counted.open += 1
        self._closed = False

    def close(self):
        with Counted.lock:
            if not self._closed:
                Counted.open -= 1
                self._closed = True
        super().close()


class Overlap(RuntimeError):
    pass


class NoOverlap(gymnasium.Wrapper):
    """Calc-v0 whose library is not thread-safe: two calls overlapping, on any instances, raise."""

    busy = threading.Lock()
    hold_s = 0.005

    def __init__(self, **kwargs):
        super().__init__(make_env("looprl/Calc-v0", **kwargs))

    def _exclusive(self, fn, *args, **kwargs):
        if not NoOverlap.busy.acquire(blocking=False):
            raise Overlap("two calls of a thread-unsafe environment overlapped")
        try:
            time.sleep(NoOverlap.hold_s)  # long enough that threaded calls do overlap
            return fn(*args, **kwargs)
        finally:
            NoOverlap.busy.release()

    def reset(self, **kwargs):
        return self._exclusive(self.env.reset, **kwargs)

    def step(self, action):
        return self._exclusive(self.env.step, action)


class FailSeeds(gymnasium.Wrapper):
    """Calc-v0 whose episodes of the task seeds in `bad` always return garbage."""

    def __init__(self, bad=(), **kwargs):
        super().__init__(make_env("looprl/Calc-v0", **kwargs))
        self.bad, self.seed_ = set(bad), None

    def reset(self, *, seed=None, options=None):
        self.seed_ = seed
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self.seed_ in self.bad:
            return "garbage"
        return self.env.step(action)


for _name, _cls in (("Counted-v0", Counted), ("NoOverlap-v0", NoOverlap), ("FailSeeds-v0", FailSeeds)):
    if f"looprl-test/{_name}" not in gymnasium.registry:
        gymnasium.register(f"looprl-test/{_name}", entry_point=_cls, disable_env_checker=True)


class SigintOnce(gymnasium.Wrapper):
    """Calc-v0 that, while `armed`, presses Ctrl-C (SIGINT to this process) on its first
    reset of a held-out (split=test) task: a user interrupting the evaluation."""

    armed = False

    def __init__(self, **kwargs):
        self.split = kwargs.get("split", "train")
        super().__init__(make_env("looprl/Calc-v0", **kwargs))

    def reset(self, **kwargs):
        if SigintOnce.armed and self.split == "test":
            import os
            import signal

            SigintOnce.armed = False
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the signal lands while the evaluation runs
        return self.env.reset(**kwargs)


if "looprl-test/SigintOnce-v0" not in gymnasium.registry:
    gymnasium.register("looprl-test/SigintOnce-v0", entry_point=SigintOnce, disable_env_checker=True)
