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
    """Episode 0's first step blocks in `hold()`; the time it ended is kept in `ended`."""

    def __init__(self, env, hold):
        super().__init__(env)
        self.hold, self.ended = hold, None

    def step(self, action):
        if self.hold is not None:
            self.hold()
            self.hold, self.ended = None, time.perf_counter()
        return self.env.step(action)


def play_four(model, tokenizer, turn_wait_s, hold, on_done=lambda k: None):
    """Plays 4 episodes; returns (turns, end time) per episode and when episode 0's slow
    step ended. Only the order of events is asserted, never a duration: the machine may be busy."""
    engine = HFEngine(model, tokenizer, turn_wait_s=turn_wait_s)
    templater, params = ObservationTemplater(tokenizer), SamplingParams(max_new_tokens=4)
    slow = SlowFirstStep(make_env("looprl/Calc-v0", max_turns=3), hold)

    async def one(k):
        env = slow if k == 0 else make_env("looprl/Calc-v0", max_turns=3)
        traj = await run_episode(env, engine, tokenizer, templater, params, seed=k)
        on_done(k)
        return traj.num_turns, time.perf_counter()

    async def run():
        return await asyncio.gather(*[one(k) for k in range(4)])

    return asyncio.run(run()), slow.ended


@pytest.mark.parametrize("turn_wait_s, hold_s", [(60.0, 0.3), (None, 1.5)])
def test_a_slow_tool_holds_the_batch_while_turn_wait_s_lasts(model, tokenizer, turn_wait_s, hold_s):
    """With a wait longer than the slow step, or none at all (the default: as long as the
    step takes, here longer than the clocked default of old), every episode's next turn waits for it."""
    played, slow_ended = play_four(model, tokenizer, turn_wait_s=turn_wait_s, hold=lambda: time.sleep(hold_s))
    assert [n for n, _ in played] == [3] * 4
    assert all(end > slow_ended for _, end in played[1:])


def test_a_slow_tool_holds_the_batch_at_most_turn_wait_s(model, tokenizer):
    """With a short wait, the other episodes end while episode 0's step is still running:
    the step blocks until they have all ended (it would time out after 60 s if they waited)."""
    others_done, ended = threading.Event(), set()

    def on_done(k):
        ended.add(k)
        if ended >= {1, 2, 3}:
            others_done.set()

    played, slow_ended = play_four(model, tokenizer, turn_wait_s=0.05, on_done=on_done,
                                   hold=lambda: others_done.wait(timeout=60.0))
    assert others_done.is_set(), "the other episodes waited for the slow step"
    assert [n for n, _ in played] == [3] * 4
    assert all(end < slow_ended for _, end in played[1:]) and played[0][1] > slow_ended


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
