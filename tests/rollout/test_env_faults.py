"""Environment calls run off the event loop; a faulty environment loses its episode
(`EpisodeError`), never the process; `collect_groups` retries, then drops the group."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import gymnasium
import pytest
import torch

from looprl.envs import make_env
from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.collect import collect_groups
from looprl.rollout.engine import Completion, HFEngine, SamplingParams
from looprl.rollout.envcalls import EpisodeError

PARAMS = SamplingParams(max_new_tokens=4)
RELEASE = threading.Event()  # lets the hung env threads of these tests finish at the end


@pytest.fixture(scope="module", autouse=True)
def _release_hung_threads():
    yield
    RELEASE.set()


class TextEnv(gymnasium.Env):
    """A three-turn text env; `fault(turn)` may replace a step's result or raise."""

    def __init__(self, fault=None, turns: int = 3, delay_s: float = 0.0):
        self.fault, self.turns, self.delay_s = fault, turns, delay_s

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.turn = 0
        info = {"messages": [{"role": "user", "content": f"task {seed}"}], "tools": [], "task_id": f"t{seed}"}
        return f"task {seed}", info

    def step(self, action):
        self.turn += 1
        time.sleep(self.delay_s)
        result = ("ok", 0.5, self.turn >= self.turns, False, {"messages": [{"role": "user", "content": "ok"}]})
        return self.fault(self.turn, result) if self.fault else result


class EosEngine:
    """Answers every request with one stop token."""

    version = 0

    def __init__(self, tokenizer):
        self.eos = tokenizer.eos_token_id

    def update_weights(self, state_dict=None) -> None:
        self.version += 1

    async def generate(self, requests):
        return [Completion([self.eos], [-0.1], True, self.version) for _ in requests]


def play(env, engine, tokenizer, **kwargs):
    return asyncio.run(run_episode(env, engine, tokenizer, ObservationTemplater(tokenizer), PARAMS, seed=1, **kwargs))


def lose(env, engine, tokenizer, **kwargs) -> EpisodeError:
    with pytest.raises(EpisodeError) as e:
        play(env, engine, tokenizer, **kwargs)
    return e.value


def raise_on_second(turn, result):
    if turn == 2:
        raise KeyError("tool state lost")
    return result


def hang_on_second(turn, result):
    if turn == 2:
        RELEASE.wait(60)
    return result


def test_a_healthy_fake_env_plays_to_the_end(tokenizer):
    traj = play(TextEnv(), EosEngine(tokenizer), tokenizer)
    assert traj.num_turns == 3 and traj.terminated and traj.turn_rewards == [0.5] * 3


def test_an_env_that_raises_loses_its_episode(tokenizer):
    error = lose(TextEnv(raise_on_second), EosEngine(tokenizer), tokenizer)
    assert error.reason == "env_error"
    assert str(error) == "env_error: step raised KeyError: 'tool state lost'"
    assert isinstance(error.__cause__, KeyError)


def test_an_env_that_hangs_times_out_and_its_thread_is_abandoned(tokenizer):
    start = time.perf_counter()
    error = lose(TextEnv(hang_on_second), EosEngine(tokenizer), tokenizer, step_timeout_s=0.2)
    elapsed = time.perf_counter() - start
    assert error.reason == "env_timeout" and "ran past 0.2 s" in error.detail
    # asyncio.run returned without waiting for the hung thread, which is a daemon.
    assert elapsed < 30  # the hung step waits 60 s
    hung = [t for t in threading.enumerate() if t.name.startswith("looprl-env-") and t.is_alive()]
    assert hung and all(t.daemon for t in hung)


def test_a_timeout_applies_to_reset_too(tokenizer):
    class SlowReset(TextEnv):
        def reset(self, **kwargs):
            RELEASE.wait(60)
            return super().reset(**kwargs)

    assert lose(SlowReset(), EosEngine(tokenizer), tokenizer, step_timeout_s=0.1).reason == "env_timeout"


def test_a_tool_that_raises_timeout_error_itself_is_an_env_error(tokenizer):
    def socket_timeout(turn, result):
        raise TimeoutError("upstream API timed out")

    error = lose(TextEnv(socket_timeout), EosEngine(tokenizer), tokenizer, step_timeout_s=30)
    assert error.reason == "env_error" and "upstream API timed out" in error.detail


@pytest.mark.parametrize(("garbage", "expected"), [
    (lambda r: r[:4], "step must return (obs, reward, terminated, truncated, info), got a tuple of 4"),
    (lambda r: [*r], "got list"),
    (lambda r: (None, *r[1:]), "step must return a str observation, got NoneType"),
    (lambda r: (r[0], math.nan, *r[2:]), "step must return a finite real reward, got nan"),
    (lambda r: (r[0], "1.0", *r[2:]), "finite real reward, got '1.0'"),
    (lambda r: (*r[:2], None, *r[3:]), "step must return a bool `terminated`, got None"),
    (lambda r: (*r[:4], {}), "step info lacks ['messages']"),
    (lambda r: (*r[:4], {"messages": "ok"}), "info['messages'] must be a list of"),
    (lambda r: (*r[:4], None), "step must return an info dict, got NoneType"),
])
def test_an_env_that_returns_garbage_loses_its_episode(tokenizer, garbage, expected):
    error = lose(TextEnv(lambda turn, result: garbage(result) if turn == 2 else result), EosEngine(tokenizer),
                 tokenizer)
    assert error.reason == "env_garbage" and expected in error.detail


def test_a_reset_without_messages_is_garbage(tokenizer):
    class NoMessages(TextEnv):
        def reset(self, **kwargs):
            obs, info = super().reset(**kwargs)
            del info["messages"]
            return obs, info

    error = lose(NoMessages(), EosEngine(tokenizer), tokenizer)
    assert (error.reason, error.detail) == ("env_garbage", "reset info lacks ['messages']")


def test_messages_may_be_missing_on_the_last_step(tokenizer):
    last = TextEnv(lambda turn, r: (*r[:4], {"success": True}) if turn == 3 else r)
    assert play(last, EosEngine(tokenizer), tokenizer).info["success"]


def test_an_engine_failure_is_an_engine_error(tokenizer):
    class Broken(EosEngine):
        async def generate(self, requests):
            raise RuntimeError("CUDA error: device-side assert")

    error = lose(TextEnv(), Broken(tokenizer), tokenizer)
    assert error.reason == "engine_error" and "device-side assert" in error.detail


def test_a_bad_timeout_is_refused(tokenizer):
    with pytest.raises(ValueError, match="Expect `step_timeout_s` to be positive or None, actually: 0"):
        play(TextEnv(), EosEngine(tokenizer), tokenizer, step_timeout_s=0)


def test_slow_steps_run_concurrently_and_the_loop_stays_responsive(tokenizer):
    """8 episodes x 3 steps of 0.1 s: the steps run on threads off the event loop, and
    they overlap (their start/end times are compared, never a duration: the machine may be busy)."""
    engine, templater = EosEngine(tokenizer), ObservationTemplater(tokenizer)
    spans, lock = [], threading.Lock()

    class Recorded(TextEnv):
        def step(self, action):
            began = time.perf_counter()
            result = super().step(action)
            with lock:
                spans.append((began, time.perf_counter(), threading.get_ident()))
            return result

    async def run():
        loop_thread = threading.get_ident()
        trajs = await asyncio.gather(*[run_episode(Recorded(delay_s=0.1), engine, tokenizer, templater, PARAMS,
                                                   seed=s) for s in range(8)])
        return trajs, loop_thread

    trajs, loop_thread = asyncio.run(run())
    assert all(t.num_turns == 3 for t in trajs) and len(spans) == 24
    assert all(ident != loop_thread for _, _, ident in spans)  # no step ran on (and blocked) the loop
    most_at_once = max(sum(a < end and start < b for a, b, _ in spans) for start, end, _ in spans)
    assert most_at_once >= 4  # steps of different episodes overlapped


# collect_groups: retries, dropped groups, and healthy runs unchanged.


class FlakyEnvs:
    """`make_env` whose envs for `bad_seeds` fail, always or only on their first `n` resets."""

    def __init__(self, bad_seeds, n: int | None = None):
        self.bad_seeds, self.n, self.failed = set(bad_seeds), n, 0

    def __call__(self):
        return FlakyEnv(self)


class FlakyEnv(gymnasium.Wrapper):
    def __init__(self, owner: FlakyEnvs):
        super().__init__(make_env("looprl/Calc-v0"))
        self.owner = owner

    def reset(self, *, seed=None, options=None):
        self.seed_ = seed
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        owner = self.owner
        if self.seed_ in owner.bad_seeds and (owner.n is None or owner.failed < owner.n):
            owner.failed += 1
            return "garbage"
        return self.env.step(action)


def collect(model, tokenizer, make, seeds=(1, 2, 3), **kwargs):
    torch.manual_seed(0)
    engine = HFEngine(model, tokenizer)
    return collect_groups(engine, tokenizer, make, list(seeds), 2, SamplingParams(max_new_tokens=6, temperature=0),
                          max_tokens=300, **kwargs)


def ids(groups):
    return [[t.input_ids for t in g] for g in groups]


def test_healthy_envs_give_the_same_groups_and_no_failures(model, tokenizer):
    plain = collect(model, tokenizer, lambda: make_env("looprl/Calc-v0"))
    groups, failures = collect(model, tokenizer, FlakyEnvs([]), return_failures=True, step_timeout_s=30)
    assert failures == [] and ids(groups) == ids(plain)


def test_a_failing_seed_is_retried_then_its_group_dropped(model, tokenizer, caplog):
    plain = collect(model, tokenizer, lambda: make_env("looprl/Calc-v0"))
    groups, failures = collect(model, tokenizer, FlakyEnvs([2]), max_retries=1, return_failures=True)

    assert [g[0].group_id for g in groups] == [0, 2]
    assert len(failures) == 4  # 2 episodes x (1 try + 1 retry)
    assert {(f.group, f.seed, f.error.reason) for f in failures} == {(1, 2, "env_garbage")}
    assert "Episode of seed 2 (group 1) lost" in caplog.text
    # Greedy rows do not depend on their batch: the kept groups are the healthy ones.
    assert ids(groups) == [ids(plain)[0], ids(plain)[2]]


def test_a_transient_failure_is_replayed(model, tokenizer):
    plain = collect(model, tokenizer, lambda: make_env("looprl/Calc-v0"))
    groups, failures = collect(model, tokenizer, FlakyEnvs([3], n=1), return_failures=True)
    assert len(failures) == 1 and failures[0].seed == 3
    assert ids(groups) == ids(plain)


def test_when_every_group_fails_the_error_says_why(model, tokenizer):
    with pytest.raises(RuntimeError, match=r"Every group was lost to episode failures \({'env_garbage': 12}\)"):
        collect(model, tokenizer, FlakyEnvs([1, 2, 3]))
