"""Turn-level continuous batching with environment calls off the loop: batches do not
depend on thread timing, a slow tool holds a batch at most `turn_wait_s`, and the
engine's `perf/engine_*` figures count what it did."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import gymnasium
import pytest
import torch

from looprl.envs import make_env
from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.collect import collect_groups
from looprl.rollout.engine import GenerationRequest, HFEngine, SamplingParams

from .test_engine import SpyEngine, prompts


class Jitter(gymnasium.Wrapper):
    """Sleeps a random 0-20 ms in every reset and step (its own RNG, per thread timing)."""

    rng = random.Random(0)
    lock = threading.Lock()

    def _nap(self):
        with self.lock:
            delay = self.rng.uniform(0, 0.02)
        time.sleep(delay)

    def reset(self, **kwargs):
        self._nap()
        return self.env.reset(**kwargs)

    def step(self, action):
        self._nap()
        return self.env.step(action)


def sampled_groups(model, tokenizer, make, max_batch_size):
    torch.manual_seed(0)
    engine = HFEngine(model, tokenizer, max_batch_size=max_batch_size)
    groups = collect_groups(engine, tokenizer, make, [1, 2, 3, 4], 3, SamplingParams(max_new_tokens=10),
                            max_tokens=320)
    return [[t.input_ids for t in g] for g in groups], engine.stats["generate_calls"]


@pytest.mark.parametrize("max_batch_size", [64, 5])
def test_batches_do_not_depend_on_when_env_threads_return(peaked_model, tokenizer, max_batch_size):
    """Sampled episodes (temperature 1) are the same whether env calls return at once or
    after random delays, also when batches overflow `max_batch_size`."""
    make = lambda: make_env("looprl/Calc-v0", max_turns=6)  # noqa: E731
    plain = sampled_groups(peaked_model, tokenizer, make, max_batch_size)
    jittered = sampled_groups(peaked_model, tokenizer, lambda: Jitter(make()), max_batch_size)
    assert jittered == plain


class SlowFirstStep(gymnasium.Wrapper):
    def __init__(self, env, delay_s):
        super().__init__(env)
        self.delay_s = delay_s

    def step(self, action):
        time.sleep(self.delay_s)
        self.delay_s = 0.0
        return self.env.step(action)


def finish_times(model, tokenizer, turn_wait_s):
    """Seconds until each of 4 episodes ends; episode 0's first step takes 0.6 s."""
    engine = HFEngine(model, tokenizer, turn_wait_s=turn_wait_s)
    templater, params = ObservationTemplater(tokenizer), SamplingParams(max_new_tokens=4)

    async def one(k, start):
        env = make_env("looprl/Calc-v0", max_turns=3)
        env = SlowFirstStep(env, 0.6 if k == 0 else 0.0)
        traj = await run_episode(env, engine, tokenizer, templater, params, seed=k)
        return traj.num_turns, time.perf_counter() - start

    async def run():
        start = time.perf_counter()
        return await asyncio.gather(*[one(k, start) for k in range(4)])

    return asyncio.run(run())


def test_a_slow_tool_holds_the_batch_at_most_turn_wait_s(model, tokenizer):
    held = finish_times(model, tokenizer, turn_wait_s=5.0)
    assert [n for n, _ in held] == [3] * 4
    assert min(t for _, t in held) > 0.6  # everyone waited for episode 0's slow step
    free = finish_times(model, tokenizer, turn_wait_s=0.05)
    assert [n for n, _ in free] == [3] * 4
    assert max(t for _, t in free[1:]) < 0.55  # the others went on without it (before 0.6 s)
    assert free[0][1] > 0.6


def test_requests_that_arrive_during_a_batch_share_the_next_one(model, tokenizer):
    class SlowSpy(SpyEngine):
        def generate_batch(self, requests, keys=None):
            time.sleep(0.2)
            return super().generate_batch(requests, keys)

    engine = SlowSpy(model, tokenizer)
    params = SamplingParams(max_new_tokens=2)
    requests = [GenerationRequest(p, params) for p in prompts(tokenizer, 8)]

    async def run():
        first = [asyncio.create_task(engine.generate([r])) for r in requests[:3]]
        later = []
        for r in requests[3:]:  # staggered, all while the first batch generates
            await asyncio.sleep(0.02)
            later.append(asyncio.create_task(engine.generate([r])))
        return await asyncio.gather(*first, *later)

    asyncio.run(run())
    assert [len(b) for b in engine.batches] == [3, 5]
    assert [r.prompt_ids for r in engine.batches[1]] == [r.prompt_ids for r in requests[3:]]


def test_metrics_count_calls_rows_and_tokens(model, tokenizer):
    engine = HFEngine(model, tokenizer, max_batch_size=5)
    params = SamplingParams(max_new_tokens=3)
    requests = [GenerationRequest(p, params) for p in prompts(tokenizer, 12)]

    async def run():
        return await asyncio.gather(*[engine.generate([r]) for r in requests])

    completions = [c for (c,) in asyncio.run(run())]
    m = engine.metrics()
    assert m["perf/engine_generate_calls"] == 3 and m["perf/engine_requests"] == 12
    assert m["perf/engine_batch_occupancy"] == pytest.approx(12 / 15)
    tokens = sum(len(c.token_ids) for c in completions)
    assert m["perf/engine_tokens"] == tokens
    assert m["perf/engine_row_occupancy"] == pytest.approx(tokens / engine.stats["row_steps"])
    assert 0 < m["perf/engine_row_occupancy"] <= 1 and engine.stats["row_steps"] <= 12 * 3
    assert m["perf/engine_busy_s"] > 0 and m["perf/engine_tokens_per_s"] > 0
    assert m["perf/engine_queue_wait_s"] > 0  # the last 7 waited for the first batch

    since = dict(engine.stats)
    window = engine.metrics(since=since)
    assert window["perf/engine_requests"] == 0 and window["perf/engine_batch_occupancy"] == 0.0
    asyncio.run(run())
    assert engine.metrics(since=since)["perf/engine_requests"] == 12


def test_turn_wait_validation(model, tokenizer):
    with pytest.raises(ValueError, match="Expect `turn_wait_s` to be >= 0, actually: -1"):
        HFEngine(model, tokenizer, turn_wait_s=-1)
