"""Streaming rollouts: the bounded stream, the producer's staleness budget, dropped
episodes by reason, shutdown without deadlock, and weight sync into the engine's copy."""

from __future__ import annotations

import asyncio
import faulthandler
import threading
import time

import gymnasium
import pytest
import torch

from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.engine import Completion, GenerationRequest, SamplingParams
from looprl.rollout.producer import RolloutProducer
from looprl.rollout.stream import Group, GroupStream, StreamClosed
from looprl.rollout.weight_sync import SnapshotEngine
from looprl.train.batch import collate, policy_logprobs
from looprl.train.policy import trainable_state
from looprl.types import Trajectory


@pytest.fixture(autouse=True)
def _watchdog():
    """A deadlock fails the test run loudly instead of hanging it."""
    faulthandler.dump_traceback_later(600, exit=True)  # a deadlock, not a slow machine
    yield
    faulthandler.cancel_dump_traceback_later()


class EchoEnv(gymnasium.Env):
    """`turns` turns of anything; faults and slowness chosen per task seed.

    Args:
        faults: seed -> "raise", "hang" (sleeps `hang_s` in step) or "garbage" (returns a 3-tuple).
        slow: seeds whose task text says "slow" (the fake engine is slow on them).
        on_step: called after each step (tests push weights from it).
    """

    def __init__(self, turns=1, faults=None, slow=(), hang_s=1.0, on_step=None):
        self.turns, self.faults, self.slow, self.hang_s, self.on_step = turns, faults or {}, set(slow), hang_s, on_step

    def reset(self, *, seed=None, options=None):
        self.seed_, self.t = seed, 0
        text = f"task {seed}" + (" slow" if seed in self.slow else "")
        return text, {"messages": [{"role": "user", "content": text}], "tools": [], "task_id": str(seed)}

    def step(self, action):
        fault = self.faults.get(self.seed_)
        if fault == "raise":
            raise RuntimeError("tool crashed")
        if fault == "hang":
            time.sleep(self.hang_s)
        if fault == "garbage":
            return "obs", 1.0, False
        self.t += 1
        done = self.t >= self.turns
        if self.on_step is not None:
            self.on_step(self.t)
        msg = [{"role": "user", "content": "ok"}]
        return "ok", float(self.seed_ % 2), done, False, {"messages": msg, "success": done}


class FakeEngine:
    """Answers every request with eos after a delay (longer on "slow" tasks)."""

    def __init__(self, tokenizer, delay=0.005, slow_delay=0.4, fail=False):
        self.tokenizer, self.delay, self.slow_delay, self.fail = tokenizer, delay, slow_delay, fail
        self.version = 0
        self.stats = {"generate_calls": 0, "sequences": 0}
        self.max_batch_size = 8

    async def generate(self, requests):
        if self.fail:
            raise RuntimeError("engine broke")
        slow = "slow" in self.tokenizer.decode(requests[0].prompt_ids)
        await asyncio.sleep(self.slow_delay if slow else self.delay)
        eos = self.tokenizer.eos_token_id
        return [Completion([eos], [-0.5], True, self.version) for _ in requests]


def make_producer(tokenizer, engine, env_factory, *, groups=2, k=2, staleness=0, capacity=None, timeout=None,
                  drops=None):
    counter = iter(range(10**6))
    stream = GroupStream(capacity or (staleness + 1) * groups, staleness)
    producer = RolloutProducer(
        engine, tokenizer, env_factory, lambda n: [next(counter) for _ in range(n)], stream, group_size=k,
        groups_per_batch=groups, max_staleness=staleness, params=SamplingParams(4, 1.0), max_tokens=256,
        step_timeout=timeout, on_drop=(lambda *a: drops.append(a)) if drops is not None else None,
    )
    stream.on_drop = producer.free
    return producer, stream


def train_steps(producer, stream, engine, steps, groups, train_s=0.0):
    """What the trainer does: take a batch at the current version, 'train', bump the version."""
    producer.start()
    staleness, seen = [], []
    try:
        for step in range(steps):
            producer.release(step)
            batch = stream.take(groups, engine.version)
            staleness += [engine.version - e.policy_version for g in batch for e in g.episodes]
            seen += [g.seed for g in batch]
            time.sleep(train_s)
            engine.version += 1
    finally:
        assert producer.stop(timeout=10)
    return staleness, seen


def test_stream_take_drops_stale_groups_and_returns_the_earliest_started():
    stream = GroupStream(capacity=8, max_staleness=1)
    traj = lambda v: Trajectory([1], [0], [0.0], policy_version=v)  # noqa: E731
    for seq, version in [(3, 5), (0, 3), (2, 4), (1, 5)]:
        assert asyncio.run(stream.put(Group(seq, seq, [traj(version), traj(version)])))
    batch = stream.take(2, version=5)
    assert [g.seq for g in batch] == [1, 2]  # seq 0 (version 3) was 2 versions behind
    assert stream.dropped == {"stale": 2} and len(stream) == 1


def test_take_returns_none_when_stopped_and_raises_when_closed():
    stream = GroupStream(capacity=2, max_staleness=0)
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    start = time.perf_counter()
    assert stream.take(1, 0, should_stop=stop.is_set, poll_s=0.05) is None
    assert time.perf_counter() - start < 60  # without the stop it would wait forever
    stream.close(RuntimeError("boom"))
    with pytest.raises(StreamClosed) as info:
        stream.take(1, 0)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_max_staleness_zero_produces_one_batch_per_version_in_seed_order(tokenizer):
    engine = FakeEngine(tokenizer)
    producer, stream = make_producer(tokenizer, engine, lambda: EchoEnv(turns=2), groups=3, k=2, staleness=0)
    staleness, seeds = train_steps(producer, stream, engine, steps=4, groups=3)
    assert staleness == [0] * 24
    assert seeds == list(range(12))  # the sampler's seeds, batch by batch, in order


def test_no_trained_group_is_older_than_max_staleness_even_when_slow_groups_would_be(tokenizer):
    # Seeds 0, 4, 8, ... take 0.4 s a turn, the rest 5 ms: a slow group started at
    # version v comes back several versions later and must be dropped, never trained.
    engine = FakeEngine(tokenizer, slow_delay=0.4)
    slow = set(range(0, 1000, 4))
    producer, stream = make_producer(tokenizer, engine, lambda: EchoEnv(turns=1, slow=slow), groups=2, k=2,
                                     staleness=1)
    staleness, seeds = train_steps(producer, stream, engine, steps=8, groups=2, train_s=0.1)
    assert max(staleness) <= 1
    assert 1 in staleness, "the test should exercise data one version old"
    assert stream.dropped["stale"] > 0, "slow groups should have come back too stale"


def test_env_faults_drop_their_episodes_with_a_reason_and_the_run_goes_on(tokenizer):
    faults = {1: "raise", 2: "hang", 3: "garbage"}
    engine, drops = FakeEngine(tokenizer), []
    producer, stream = make_producer(tokenizer, engine, lambda: EchoEnv(turns=1, faults=faults, hang_s=1.0),
                                     groups=2, k=2, staleness=0, timeout=0.2, drops=drops)
    _, seeds = train_steps(producer, stream, engine, steps=4, groups=2)
    assert len(seeds) == 8 and not set(seeds) & set(faults)  # replacements kept every batch full
    assert stream.dropped["env_error"] == 2 and stream.dropped["env_timeout"] == 2
    assert stream.dropped["env_garbage"] == 2
    reasons = {(reason, seed) for reason, _, seed in drops}
    assert {("env_error", 1), ("env_timeout", 2), ("env_garbage", 3)} <= reasons
    assert any("RuntimeError: tool crashed" in detail for _, detail, _ in drops)


class CloseFails(EchoEnv):
    def close(self):
        raise OSError("disk gone")


def test_a_failing_close_keeps_the_complete_episode_and_is_logged(tokenizer, caplog):
    engine = FakeEngine(tokenizer)
    producer, stream = make_producer(tokenizer, engine, lambda: CloseFails(turns=1), groups=2, k=2, staleness=0)
    with caplog.at_level("WARNING", logger="looprl.rollout"):
        _, seeds = train_steps(producer, stream, engine, steps=2, groups=2)
    assert seeds == [0, 1, 2, 3] and not stream.dropped
    assert "closing an environment of task seed 0 raised OSError: disk gone" in caplog.text


def test_an_engine_failure_closes_the_stream_with_its_error(tokenizer):
    engine = FakeEngine(tokenizer, fail=True)
    producer, stream = make_producer(tokenizer, engine, lambda: EchoEnv())
    producer.start()
    with pytest.raises(StreamClosed) as info:
        stream.take(2, 0)
    assert "engine broke" in str(info.value.__cause__)
    assert producer.stop(timeout=5)


def test_stop_with_a_full_stream_and_producers_blocked_does_not_deadlock(tokenizer):
    engine = FakeEngine(tokenizer)
    # Budget of 4 groups, room for 1: three finished groups wait in `put`.
    producer, stream = make_producer(tokenizer, engine, lambda: EchoEnv(), groups=1, k=2, staleness=3, capacity=1)
    producer.start()
    deadline = time.perf_counter() + 10
    while producer.stats["groups"] < 4 and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert len(stream) == 1 and producer.stats["groups"] == 4
    start = time.perf_counter()
    assert producer.stop(timeout=60)  # three blocked puts would otherwise wait forever
    assert time.perf_counter() - start < 60 and not producer.alive


# --- weight sync -----------------------------------------------------------------------------------


def _lora(model):
    from looprl.train.models import add_lora

    return add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear").eval()


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


def test_lora_weight_sync_moves_only_the_adapter(model, tokenizer):
    trainer_model = _lora(model)
    engine = SnapshotEngine(trainer_model, tokenizer, version=3)
    base_before = {n: p.clone() for n, p in engine.model.named_parameters() if "lora_" not in n}
    _perturb(trainer_model)  # an optimizer step on the adapter
    ids = torch.tensor([tokenizer.encode("task 1 + 2")])
    assert not torch.allclose(engine.model(ids).logits, trainer_model(ids).logits)

    state = trainable_state(trainer_model)
    engine.push(state, version=4)
    assert state and all("lora_" in name for name in state)
    assert engine.pushed_tensors == len(state) < len(dict(trainer_model.named_parameters()))
    for name, p in engine.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name]), name
    torch.testing.assert_close(engine.model(ids).logits, trainer_model(ids).logits, rtol=0, atol=0)
    assert engine.version == 4
    # A copy, not a view: the trainer's next step does not reach the engine until pushed.
    _perturb(trainer_model)
    assert not torch.allclose(engine.model(ids).logits, trainer_model(ids).logits)


def test_episodes_in_flight_continue_on_new_weights_tagged_with_the_oldest_version(model, tokenizer):
    """Partial rollouts: turn 2 is sampled by the pushed weights, its logprobs are theirs,
    and the episode counts as the oldest version that sampled it."""
    old = model.eval()
    new = type(model)(model.config).eval()
    new.load_state_dict(old.state_dict())
    _perturb(new.requires_grad_(True))
    engine = SnapshotEngine(old, tokenizer, version=0)
    env = EchoEnv(turns=2, on_step=lambda t: engine.push(dict(new.named_parameters()), 1) if t == 1 else None)
    torch.manual_seed(0)
    traj = asyncio.run(run_episode(env, engine, tokenizer, ObservationTemplater(tokenizer),
                                   SamplingParams(6, 1.0), seed=5))
    assert traj.num_turns == 2 and traj.policy_version == 0
    batch = collate([traj], tokenizer.pad_token_id)
    with torch.no_grad():
        under = {"old": policy_logprobs(old, batch)[0], "new": policy_logprobs(new, batch)[0]}
    behaviour = torch.tensor(traj.behaviour_logprobs)
    for (start, end), weights in zip(traj.turn_spans, ["old", "new"]):
        torch.testing.assert_close(behaviour[start:end], under[weights][start - 1:end - 1], atol=1e-4, rtol=0)
    s2, e2 = traj.turn_spans[1]
    assert not torch.allclose(behaviour[s2:e2], under["old"][s2 - 1:e2 - 1], atol=1e-3)


def test_a_push_waits_for_the_generate_call_in_progress(model, tokenizer):
    engine = SnapshotEngine(model.eval(), tokenizer, version=0)
    request = GenerationRequest(tokenizer.encode("task"), SamplingParams(48, 1.0))
    pushed_during = []
    original = engine.model.forward

    def slow_forward(*args, **kwargs):
        if not pushed_during:
            time.sleep(0.3)  # a push started now must wait until the whole generate call returns
        pushed_during.append(engine.version)
        return original(*args, **kwargs)

    engine.model.forward = slow_forward
    worker = threading.Thread(target=engine.generate_batch, args=([request],))
    worker.start()
    time.sleep(0.05)
    engine.push({}, version=1)
    worker.join()
    assert set(pushed_during) == {0} and engine.version == 1
