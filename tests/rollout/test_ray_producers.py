"""Rollout producers as Ray actors (`rollout.backend: ray`) on a Ray cluster started on this
machine: the run trains, trajectories carry the versions that sampled them within the
staleness bound, weight sync reaches the actors, and a killed actor loses only its groups.

Every wait is bounded: the pool's pushes by `rollout.ray_timeout` (a clear error naming the
actor), the test's own Ray calls by `WAIT_S`, and a test still running after `TEST_LIMIT_S`
fails (with every thread's stack) instead of hanging or exiting the whole pytest run."""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import pickle
import signal
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

import looprl.train.recipes.streaming as streaming  # noqa: E402
from looprl.rollout.engine import SamplingParams  # noqa: E402
from looprl.rollout.ray_producers import (  # noqa: E402
    LOCAL_SYSTEM_CONFIG,
    RayActorPool,
    RayRolloutProducer,
    RolloutActor,
)
from looprl.rollout.stream import GroupStream, StreamClosed  # noqa: E402
from looprl.train.metrics import read_metrics  # noqa: E402
from looprl.train.models import load_model, load_tokenizer  # noqa: E402
from looprl.train.policy import trainable_state  # noqa: E402
from looprl.train.trainer import train  # noqa: E402
from looprl.types import Episode, Trajectory  # noqa: E402
from tests.recipes.test_recipes import final_state, tiny_recipe  # noqa: E402
from tests.rollout.test_stream import EchoEnv  # noqa: E402

K = 4
WAIT_S = 60  # the test's own calls to an actor
PUSH_S = 180  # rollout.ray_timeout: the first push waits for the actors to be built
TEST_LIMIT_S = 420  # a test running longer fails (16 s on a quiet machine, under a minute on a busy one)


class TimedOut(Exception):
    pass


@pytest.fixture(autouse=True)
def _watchdog(request):
    """Fail a test still running after TEST_LIMIT_S, with every thread's stack, without ending pytest."""
    def expire(signum, frame):
        faulthandler.dump_traceback(all_threads=True)
        raise TimedOut(f"{request.node.name} still running after {TEST_LIMIT_S} s (stacks above)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray cluster on this machine, shut down even when a test fails; its workers at
    niceness 0 as the run's own local cluster (Ray's 15 starves them on a busy machine)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _system_config=LOCAL_SYSTEM_CONFIG)
    try:
        yield
    finally:
        ray.shutdown()


def ray_recipe(tmp_path, **rollout):
    rollout = {"mode": "async", "backend": "ray", "max_staleness": 1, "group_size": K, "num_producers": 2,
               "producer_cpus": 0.5, "producer_restarts": 1, "ray_timeout": PUSH_S, **rollout}
    return tiny_recipe(tmp_path, rollout=rollout, train={"steps": 4, "save_every": 100})


def test_connect_starts_a_local_cluster_keeping_the_runs_signal_handlers_and_shutdown_stops_it():
    from looprl.rollout.ray_producers import connect

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")

    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        assert connect(None) is True  # the local cluster uses every CPU: nothing else runs here meanwhile
        assert signal.getsignal(signal.SIGTERM) is handler
        assert connect(None) is False  # already connected: reuse it
        pool = RayActorPool({"seed": 0}, num_actors=0, max_restarts=0, num_cpus=1, max_batch_size=1,
                            started_ray=True)
        pool.shutdown()
        assert not ray.is_initialized()
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 cores and sched_setaffinity")
def test_pinned_cpus_give_the_trainer_and_the_local_cluster_disjoint_cores_and_disconnect_restores_them():
    from looprl.rollout.ray_producers import connect, disconnect

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    cores = os.sched_getaffinity(0)

    @ray.remote(num_cpus=1)
    def worker_cores():
        return os.sched_getaffinity(0)

    try:
        assert connect(None, pin_threads=1) is True
        trainer = {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
        assert trainer == {frozenset({min(cores)})}  # every thread, Ray's own included
        assert ray.cluster_resources()["CPU"] == len(cores) - 1
        assert ray.get(worker_cores.remote(), timeout=WAIT_S) == cores - {min(cores)}
    finally:
        disconnect()
    assert not ray.is_initialized()
    assert os.sched_getaffinity(0) == cores


def test_too_few_cores_to_split_leave_them_unpinned_with_a_warning(monkeypatch, caplog):
    from looprl.rollout import ray_producers

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity")
    cores = os.sched_getaffinity(0)
    monkeypatch.setattr(ray_producers.os, "sched_getaffinity", lambda pid: {0})
    assert ray_producers.pin_cpus(threads=1) is None
    assert "1 core(s) cannot be split between a trainer on 1 thread(s) and Ray" in caplog.text
    assert ray_producers._unpinned is None
    monkeypatch.undo()
    assert os.sched_getaffinity(0) == cores


def test_trajectories_pickle_through_the_object_store(ray_cluster):
    chunk = Trajectory([1, 2, 3], [0, 1, 1], [0.0, -0.5, -0.25], turn_spans=[(1, 3)], turn_rewards=[1.0],
                       task_id="7", policy_version=3, info={"success": True})
    episode = Episode([chunk, chunk])
    assert ray.get(ray.put([chunk, episode])) == [chunk, episode]
    assert pickle.loads(pickle.dumps(episode)).reward == episode.reward


def test_ray_backend_needs_async_rollouts():
    with pytest.raises(ValueError, match="rollout.backend=ray runs asynchronous producers"):
        tiny_recipe("/tmp/unused", rollout={"backend": "ray"})


def test_ray_producers_train_sync_weights_and_survive_a_killed_actor(tmp_path, ray_cluster, monkeypatch):
    taken = []  # (trainer version, policy versions of the batch's episodes)
    real_take = GroupStream.take

    def take(self, n, version, **kwargs):
        batch = real_take(self, n, version, **kwargs)
        if batch is not None:
            taken.append((version, [e.policy_version for g in batch for e in g.episodes]))
        return batch

    real_call = streaming.Streaming.step
    seen = {"synced": [], "killed_in_flight": None}

    def kill_when_busy(pool):
        deadline = time.perf_counter() + 300
        while pool.in_flight[0] == 0 and time.perf_counter() < deadline:
            time.sleep(0.002)
        seen["killed_in_flight"] = pool.in_flight[0]
        ray.kill(pool.actors[0], no_restart=False)  # a crash: Ray restarts it (producer_restarts=1)

    def call(self, ctx):
        model, engine = ctx.model, ctx.engine
        if "initial" not in seen:
            seen["initial"] = {k: v.detach().clone() for k, v in trainable_state(model).items()}
        metrics = real_call(self, ctx)
        pool, state = self.engine, trainable_state(model)
        if self.steps_done == 3:  # actor 0 is killed by now (below), and its death is noticed
            seen["killer"].join(timeout=300)
            # Until its lost groups are counted: on a loaded machine Ray can take longer to
            # notice the death than the last step takes, and a drop counted after the last
            # step never reaches metrics.jsonl (a race in this test, not a lost count).
            deadline = time.perf_counter() + 300
            while self.stream.dropped.get("producer_died", 0) == 0 and time.perf_counter() < deadline:
                time.sleep(0.005)
        deadline = time.perf_counter() + 60
        while self.steps_done == 4 and len(pool.ready) < 2 and time.perf_counter() < deadline:
            time.sleep(0.05)  # the restarted actor is back, with the latest weights
        pool.settle()  # acknowledged: every ready actor holds the trainer's weights
        for i in sorted(pool.ready):
            assert ray.get(pool.actors[i].version.remote(), timeout=WAIT_S) == engine.version
            weights = ray.get(pool.actors[i].weights.remote(sorted(state)), timeout=WAIT_S)
            assert all(torch.equal(weights[k], state[k]) for k in state)
            seen["synced"].append((self.steps_done, i))
        if self.steps_done == 2:
            # Kill actor 0 while it plays groups, from a thread of its own: the stream may be
            # full now, and then no actor plays until the next step takes from it.
            seen["killer"] = threading.Thread(target=kill_when_busy, args=(pool,), daemon=True)
            seen["killer"].start()
        seen["pool"] = pool
        return metrics

    monkeypatch.setattr(GroupStream, "take", take)
    monkeypatch.setattr(streaming.Streaming, "step", call)
    cfg = ray_recipe(tmp_path)
    start = time.perf_counter()
    train(cfg)
    elapsed = time.perf_counter() - start

    # It trained: four steps, optimizer steps taken, weights moved.
    step, state = final_state(cfg.run_dir)
    assert step == 4
    records = [r for r in read_metrics(cfg.run_dir) if "rollout/staleness_max" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert sum(r["train/optimizer_steps"] for r in records) > 0
    assert any(not torch.equal(state[k], seen["initial"][k]) for k in state)

    # Versions: every episode was sampled by pushed weights (never the actors' own -1),
    # at most max_staleness behind, and later batches by weights pushed after updates.
    assert len(taken) == 4 and all(len(v) == 6 * K for _, v in taken)
    for version, versions in taken:
        assert all(0 <= version - v <= 1 for v in versions), (version, versions)
    assert max(v for _, vs in taken for v in vs) >= 2
    assert all(r["rollout/staleness_max"] <= 1 for r in records)

    # Weight sync reached both actors after each push, and the restarted one once it was back.
    assert {(1, 0), (1, 1), (2, 0), (2, 1), (3, 1), (4, 0), (4, 1)} <= set(seen["synced"])

    # The killed actor lost its groups, counted as producer_died, and nothing else was lost.
    assert seen["killed_in_flight"] > 0, "actor 0 had no group in flight: the test would prove nothing"
    died = sum(r["rollout/dropped/producer_died"] for r in records)
    assert died > 0 and died % K == 0
    assert all(r[f"rollout/dropped/{reason}"] == 0 for r in records
               for reason in ("env_error", "env_timeout", "env_garbage", "incomplete_group"))
    logged = [json.loads(line) for line in (cfg.run_dir / "rollout_drops.jsonl").read_text().splitlines()]
    assert logged and all(d["reason"] == "producer_died" and "Ray actor 0 died" in d["detail"] for d in logged)
    assert seen["pool"].deaths == [1, 0]
    print(f"ray run: {elapsed:.1f} s")


def test_sigterm_saves_a_checkpoint_kills_the_actors_and_keeps_a_cluster_it_did_not_start(tmp_path, ray_cluster,
                                                                                           monkeypatch):
    real_call = streaming.Streaming.step
    seen = {}

    def call_then_sigterm(self, *args, **kwargs):
        metrics = real_call(self, *args, **kwargs)
        seen["pool"] = self.engine
        os.kill(os.getpid(), signal.SIGTERM)  # ray.init's own SIGTERM handler must not have replaced the run's
        return metrics

    monkeypatch.setattr(streaming.Streaming, "step", call_then_sigterm)
    cfg = ray_recipe(tmp_path, num_producers=1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert final_state(cfg.run_dir)[0] == 1
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(seen["pool"].actors[0].version.remote(), timeout=WAIT_S)
    assert ray.is_initialized()  # the test's cluster: not ours to stop


def _never_built():
    time.sleep(3600)  # an actor stuck in its constructor (the test kills it)


def test_a_push_an_actor_does_not_answer_raises_naming_it_instead_of_waiting_forever(ray_cluster):
    pool = RayActorPool(
        dict(build_policy=_never_built, make_env=None, params=SamplingParams(4, 1.0), max_tokens=1,
             context_window=None, step_timeout=None, group_size=2, max_batch_size=1, threads=1, seed=0),
        num_actors=1, max_restarts=0, num_cpus=0.5, max_batch_size=1, started_ray=False, push_timeout_s=2)
    try:
        start = time.perf_counter()
        with pytest.raises(TimeoutError, match=r"Ray rollout actor 0 did not load weights v0 within 2 s"):
            pool.push({}, version=0)
        assert time.perf_counter() - start < WAIT_S
    finally:
        pool.shutdown()


def _policy(path, broken=False):
    """What a rollout actor builds: the small tiny model (its engine raising when `broken`)."""
    model, tokenizer = load_model(path), load_tokenizer(path)
    if broken:
        def forward(*args, **kwargs):
            raise RuntimeError("engine broke")
        model.forward = forward
    return model, tokenizer


def _ray_producer(tiny_model_path, tokenizer, faults=None, broken=False):
    pool = RayActorPool(
        dict(build_policy=functools.partial(_policy, tiny_model_path, broken),
             make_env=functools.partial(EchoEnv, turns=1, faults=faults or {}), params=SamplingParams(4, 1.0),
             max_tokens=256, context_window=None, step_timeout=5.0, group_size=2, max_batch_size=8, threads=1,
             seed=0),
        num_actors=1, max_restarts=0, num_cpus=0.5, max_batch_size=8, started_ray=False, push_timeout_s=PUSH_S)
    counter = iter(range(10**6))
    stream = GroupStream(2, 0)
    drops = []
    producer = RayRolloutProducer(pool, tokenizer, next_seeds=lambda n: [next(counter) for _ in range(n)],
                                  stream=stream, group_size=2, groups_per_batch=2, max_staleness=0,
                                  params=SamplingParams(4, 1.0), max_tokens=256, on_drop=lambda *a: drops.append(a))
    stream.on_drop = producer.free
    return producer, pool, stream, drops


def test_env_faults_over_ray_drop_by_reason_and_an_engine_failure_stops_the_run(ray_cluster, tiny_model_path,
                                                                                 tokenizer):
    producer, pool, stream, drops = _ray_producer(tiny_model_path, tokenizer, faults={1: "raise"})
    try:
        pool.push({}, version=0)
        producer.start()
        seeds = []
        for step in range(2):
            producer.release(step)
            batch = stream.take(2, step)
            assert all(e.policy_version == step for g in batch for e in g.episodes)
            seeds += [g.seed for g in batch]
            pool.push({}, version=step + 1)
    finally:
        assert producer.stop(timeout=10)
    assert seeds == [0, 2, 3, 4] and stream.dropped["env_error"] == 2
    assert any(reason == "env_error" and "tool crashed" in detail and seed == 1 for reason, detail, seed in drops)

    producer, pool, stream, _ = _ray_producer(tiny_model_path, tokenizer, broken=True)
    try:
        pool.push({}, version=0)
        producer.start()
        with pytest.raises(StreamClosed) as info:
            stream.take(2, 0)
        assert "engine broke" in str(info.value.__cause__)
    finally:
        assert producer.stop(timeout=10)


def test_a_group_waits_for_the_weights_it_was_released_on(tiny_model_path):
    """The trainer does not wait for a push (s > 0): an actor plays a group only once it
    holds the version the group was released on, and gives up with a clear error."""
    import asyncio

    actor = RolloutActor(functools.partial(_policy, tiny_model_path), functools.partial(EchoEnv, turns=2),
                         params=SamplingParams(4, 1.0), max_tokens=256, context_window=None, step_timeout=5.0,
                         group_size=2, max_batch_size=8, threads=1, seed=0)

    async def scenario():
        await actor.load_weights({}, 0)
        group = asyncio.ensure_future(actor.play_group(7, 0, min_version=1, wait_s=30))
        await asyncio.sleep(0.2)
        assert not group.done(), "the group started on weights older than it was released on"
        await actor.load_weights({}, 1)
        episodes, _ = await asyncio.wait_for(group, 30)
        assert [e.policy_version for e in episodes] == [1, 1]
        with pytest.raises(TimeoutError, match="weights v5 did not reach this rollout actor within 0 s"):
            await actor.play_group(7, 1, min_version=5, wait_s=0.05)

    asyncio.run(scenario())
