"""`bench/SlowCalc-v0`: `looprl/Calc-v0` behind tool latency, for `bench/async.py`.

A module of its own so that `env.id: slow_calc:bench/SlowCalc-v0` registers it in any
process that makes it, Ray rollout actors included (with `bench/` on `PYTHONPATH`).
"""

from __future__ import annotations

import threading
import time
import zlib

import gymnasium

from looprl.envs import make_env


class SlowCalc(gymnasium.Wrapper):
    """Calc-v0 whose tool calls take `latency_s` (x `slow_factor` on one task in five) in rollouts."""

    def __init__(self, latency_s: float = 0.02, slow_factor: float = 5.0, **calc_kwargs):
        super().__init__(make_env("looprl/Calc-v0", **calc_kwargs))
        self.latency_s, self.slow_factor, self.delay = latency_s, slow_factor, latency_s

    def reset(self, *, seed=None, options=None):
        slow = seed is not None and zlib.crc32(str(seed).encode()) % 5 == 0
        self.delay = self.latency_s * (self.slow_factor if slow else 1.0)
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        # The tool's latency, in rollouts: `run_episode` calls step on an env thread. The
        # SFT warm-start's oracle episodes (main thread) play without it.
        if threading.current_thread() is not threading.main_thread():
            time.sleep(self.delay)
        return self.env.step(action)


gymnasium.register(id="bench/SlowCalc-v0", entry_point=SlowCalc)
