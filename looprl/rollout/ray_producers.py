"""Rollout producers as Ray actors (`rollout.backend: ray`), on this machine or across a cluster.

Each `RolloutActor` builds its own copy of the policy from the run config on its node,
holds its own environments and engine, and plays whole groups of K episodes for the
task seeds the trainer hands it. The trainer side is the local producer's own loop
(`RolloutProducer`: the same staleness budget, the same stream, the same drop reasons);
only where a group is played changes: `RayRolloutProducer` sends it to the least busy
actor and awaits the finished episodes, which come back pickled (plain dataclasses).

Weight sync: `RayActorPool.push` puts the trained tensors (the adapter alone with LoRA)
into the object store once (`ray.put`) and every actor loads that one object between
two generate calls, tagging later completions with the new version exactly as the
local `SnapshotEngine` does. With `wait=True` it returns once every live actor has
loaded it; with `wait=False` (what the trainer does when `max_staleness` > 0) it returns
at once, so the trainer does not wait for the actors' current generate calls, and the
next push first collects the acknowledgements. Either way no group starts on weights
older than the trainer had pushed when it allowed that group: each group carries that
version (`min_version`) and its actor waits for it before playing.

Faults: an actor that dies loses the groups it had in flight (counted as
`producer_died`, replaced by new groups); Ray restarts it up to `max_restarts` times and
the pool reloads the latest weights into it before its next group. When every actor
has died for good the run stops with an error instead of waiting forever; a push that an
actor does not answer within `push_timeout_s` (`rollout.ray_timeout`) raises, naming it.

Priority: Ray starts its workers at niceness 15, so on a machine busy with other work
(other runs, a test suite) an actor gets a few percent of a core: building the policy and
every generate call then take minutes while the trainer waits on them. The actors are on
the trainer's critical path, so a local cluster `connect` starts runs its workers at the
default niceness (`LOCAL_SYSTEM_CONFIG`), and each actor raises its own priority back to 0
where it may (root, CAP_SYS_NICE) on a cluster started elsewhere; otherwise start that
cluster with `RAY_worker_niceness=0` in its environment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections import Counter
from typing import Any, Callable

import torch

from looprl.rollout.collect import EpisodeFailure, EpisodeLost, EpisodePlayer, FaultPolicy
from looprl.rollout.engine import STAT_KEYS, HFEngine, SamplingParams
from looprl.rollout.envcalls import EpisodeError
from looprl.rollout.producer import GroupLost, RolloutProducer
from looprl.rollout.weight_sync import SnapshotEngine

try:
    import ray
    from ray.exceptions import ActorDiedError, RayActorError
except ImportError:  # the `ray` extra is optional; `connect` says how to get it
    ray = None
    ActorDiedError = RayActorError = ()

log = logging.getLogger("looprl.rollout")

# Ray settings for a local cluster that runs rollout actors: workers at the default
# niceness, not Ray's 15 (see the module docstring).
LOCAL_SYSTEM_CONFIG = {"worker_niceness": 0}


class RolloutActor:
    """One remote producer: its own policy copy, engine and environments (wrapped by `ray.remote`).

    Args:
        build_policy: returns `(model, tokenizer)`, built on the actor's node.
        make_env: builds one environment.
        params, max_tokens, context_window, step_timeout: as in `run_episode`.
        group_size: K, episodes per group.
        max_batch_size: the most sequences in one generate call.
        prefix_cache: keep each episode's keys and values between its turns.
        shared_prefix: first turns that start alike prefill their common prefix once.
        threads: torch threads.
        seed: seeds the actor's sampling.
        retries, concurrency: the fault policy of `looprl.rollout.collect.EpisodePlayer` (a run passes its
            `rollout.env_retries` and `env.concurrency`).
    """

    def __init__(self, build_policy: Callable[[], tuple[Any, Any]], make_env: Callable[[], Any], *,
                 params: SamplingParams, max_tokens: int, context_window: int | None, step_timeout: float | None,
                 group_size: int, max_batch_size: int, threads: int, seed: int, prefix_cache: bool = True,
                 shared_prefix: bool = False, retries: int = 0, concurrency: str = "thread"):
        _unnice()
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model, tokenizer = build_policy()
        model.requires_grad_(False)
        # Version -1 until the trainer's first push: no group is played on the config's initial weights.
        self.engine = SnapshotEngine(model, tokenizer, version=-1, max_batch_size=max_batch_size, copy=False,
                                     prefix_cache=prefix_cache, shared_prefix=shared_prefix)
        self.group_size = group_size
        self._failures: dict[int, list[tuple[str, str]]] = {}  # per group in play: its lost attempts
        self.player = EpisodePlayer(self.engine, tokenizer, make_env, params, max_tokens=max_tokens,
                                    context_window=context_window, faults=FaultPolicy(retries, step_timeout),
                                    concurrency=concurrency, on_failure=self._lost_attempt)

    async def play_group(self, seed: int, seq: int, min_version: int = -1,
                         wait_s: float = 600.0) -> tuple[list, dict[str, float]]:
        """The group's K episodes (None for one lost to its environment) and the engine's
        stats, with `failures`: the `(reason, detail)` of every lost attempt.

        The group starts once the engine has weights of `min_version` or newer (a push
        the trainer did not wait for may still be loading); after `wait_s` it raises.
        An engine error raises: as with the local producer it stops the run.
        """
        deadline = time.monotonic() + wait_s
        while self.engine.version < min_version:
            if time.monotonic() > deadline:
                raise TimeoutError(f"weights v{min_version} did not reach this rollout actor within {wait_s:.0f} s "
                                   f"(it has v{self.engine.version})")
            await asyncio.sleep(0.002)
        self._failures[seq] = []
        try:
            results = await asyncio.gather(*(self.player.play(seed, seq) for _ in range(self.group_size)),
                                           return_exceptions=True)
        finally:
            failures = self._failures.pop(seq)
        out = []
        for result in results:
            if isinstance(result, EpisodeLost):
                out.append(None)
            elif isinstance(result, BaseException):  # plain, so that any error crosses to the trainer intact
                raise RuntimeError(f"rollout actor failed: {type(result).__name__}: {result}") from result
            else:
                out.append(result[0])
        return out, {**self.engine.stats, "failures": failures}

    def _lost_attempt(self, failure: EpisodeFailure) -> None:
        self._failures[failure.group].append((failure.error.reason, failure.error.detail))

    async def load_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Load pushed weights between two generate calls; an older version than the one
        loaded (a re-sync racing a push) is ignored. Returns the engine's version."""
        if version > self.engine.version:
            await asyncio.to_thread(self.engine.push, state, version)
        return self.engine.version

    def weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The engine's copy of the named parameters (tests compare them with the trainer's)."""
        return {name: self.engine._params[name].detach().clone() for name in names}

    def version(self) -> int:
        return self.engine.version


class RayActorPool:
    """The trainer's handle on the rollout actors: dispatch, weight sync, restarts, shutdown.

    An actor is *ready* (it gets groups and pushes) or *recovering*: after its death the
    pool counts it once, and a recovery task in the producer's loop retries loading the
    latest weights until Ray has restarted it (then it is ready again) or has given up
    on it (`ActorDiedError`: it is gone for good).

    Args:
        actor_kwargs: `RolloutActor`'s arguments.
        num_actors: how many actors to start.
        max_restarts: how often Ray restarts a dead actor.
        num_cpus: CPUs each actor reserves (leave some for the trainer).
        max_batch_size: as the actors' engines (for the occupancy metric).
        started_ray: whether this pool called `ray.init` (then `shutdown` disconnects).
        recover_s: how long a dead actor may take to come back before it counts as gone.
        push_timeout_s: how long `push` waits for the actors (the first push also waits
            for them to be built: generous, a real model may have to be loaded first).
        wait_on_publish: whether `publish` waits for every actor to load the weights.
    """

    def __init__(self, actor_kwargs: dict[str, Any], *, num_actors: int, max_restarts: int, num_cpus: float,
                 max_batch_size: int, started_ray: bool, recover_s: float = 300.0, push_timeout_s: float = 600.0,
                 wait_on_publish: bool = True):
        remote = ray.remote(RolloutActor).options(num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0)
        self.actors = [remote.remote(**{**actor_kwargs, "seed": actor_kwargs["seed"] + i}) for i in range(num_actors)]
        self.max_restarts, self.max_batch_size, self.started_ray = max_restarts, max_batch_size, started_ray
        self.recover_s, self.push_timeout_s, self.wait_on_publish = recover_s, push_timeout_s, wait_on_publish
        self.in_flight = [0] * num_actors
        self.deaths = [0] * num_actors
        self.ready = set(range(num_actors))
        self._gone: set[int] = set()
        self._latest: tuple[Any, int] = (None, -1)  # (object ref, version) of the latest push
        self._pending: tuple[list, int, float] = ([], -1, 0.0)  # unacknowledged loads, their version, sent at
        self._stats: dict[int, dict[str, float]] = {}
        self._retired: Counter[str] = Counter()  # stats of actor lives that ended
        self._lock = threading.Lock()
        self._recovering: set[asyncio.Task] = set()

    @property
    def version(self) -> int:
        """The latest pushed version."""
        return self._latest[1]

    @property
    def stats(self) -> dict[str, float]:
        """The actors' engine stats, summed (for `HFEngine.metrics`' figures)."""
        with self._lock:
            total = Counter(self._retired)
            for stats in self._stats.values():
                total.update(stats)
        return {k: total.get(k, 0) for k in STAT_KEYS}

    def metrics(self, since: dict[str, float] | None = None) -> dict[str, float]:
        return HFEngine.metrics(self, since)  # the same figures, over every actor's engine

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """`WeightSync.publish`: `push`, waiting for the actors when `wait_on_publish`
        (the synchronous-equivalent s = 0 run), else loading in the background."""
        self.push(state, version, wait=self.wait_on_publish)

    def push(self, state: dict[str, torch.Tensor], version: int, wait: bool = True) -> None:
        """Every ready actor loads `state` (put in the object store once) as `version`.

        Args:
            wait: wait for every actor to have loaded it; else return once the loads are
                sent, and collect them at the next push (or `settle`).

        Raises:
            TimeoutError: an actor did not load it (or the previous push) within
                `push_timeout_s` (all calls together).
        """
        self.settle()
        ref = ray.put({name: t.detach().cpu() for name, t in state.items()})  # a copy: training may go on
        self._latest = (ref, version)
        with self._lock:  # `ready` changes in the producer's loop thread
            ready = sorted(self.ready)
        self._pending = ([(i, self.actors[i].load_weights.remote(ref, version)) for i in ready], version,
                         time.monotonic())
        if wait:
            self.settle()

    def settle(self) -> None:
        """Wait for the actors to acknowledge the last push (a no-op if they have).

        Raises:
            TimeoutError: as `push`.
        """
        calls, version, start = self._pending
        self._pending = ([], version, start)
        for i, call in calls:
            try:
                ray.get(call, timeout=max(start + self.push_timeout_s - time.monotonic(), 0.0))
            except RayActorError:
                pass  # it died: its recovery loads the latest weights before it plays again
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(
                    f"Ray rollout actor {i} did not load weights v{version} within {self.push_timeout_s:.0f} s "
                    f"(rollout.ray_timeout): still being built, or starved of CPU? ({self.actors[i]!r}: its "
                    f"log is the worker log naming that actor id under the Ray session's logs/)") from None

    async def play(self, seq: int, seed: int, min_version: int = -1) -> tuple[list, list[tuple[str, str]]]:
        """Play a group on the least busy ready actor, on weights of `min_version` or newer;
        returns its episodes (None: lost) and the `(reason, detail)` of every lost attempt.

        Raises:
            GroupLost: the actor died while playing it ("producer_died").
            RuntimeError: every actor has died for good.
        """
        while not self.ready:
            if len(self._gone) == len(self.actors):
                raise RuntimeError(f"every Ray rollout actor died (each restarted {self.max_restarts} times)")
            await asyncio.sleep(0.05)  # all recovering
        i = min(self.ready, key=lambda j: self.in_flight[j])
        life = self.deaths[i]
        self.in_flight[i] += 1
        try:
            results, stats = await asyncio.wrap_future(
                self.actors[i].play_group.remote(seed, seq, min_version, self.push_timeout_s).future())
        except RayActorError as e:
            self._died(i, life)
            raise GroupLost("producer_died", f"Ray actor {i} died: {type(e).__name__}") from None
        finally:
            self.in_flight[i] -= 1
        stats = dict(stats)
        failures = stats.pop("failures", [])
        with self._lock:
            self._stats[i] = stats
        return results, failures

    def shutdown(self) -> None:
        """Kill the actors; disconnect from Ray (stopping the cluster it started) if we connected."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception as e:  # noqa: BLE001 (already gone: nothing to kill)
                log.debug("killing a rollout actor: %s", e)
        if self.started_ray:
            disconnect()

    def _died(self, i: int, life: int) -> None:
        """(Producer loop) a call to actor `i` failed; count its death once and start its recovery."""
        if life != self.deaths[i] or i not in self.ready:
            return  # this death was already counted (several groups were lost with it)
        self.deaths[i] += 1
        with self._lock:
            self.ready.discard(i)
            self._retired.update(self._stats.pop(i, {}))
        task = asyncio.get_running_loop().create_task(self._recover(i))
        self._recovering.add(task)
        task.add_done_callback(self._recovering.discard)

    async def _recover(self, i: int) -> None:
        deadline = time.monotonic() + self.recover_s
        while time.monotonic() < deadline:
            ref, version = self._latest
            try:
                loaded = await asyncio.wrap_future(self.actors[i].load_weights.remote(ref, version).future())
            except ActorDiedError:
                break  # Ray will not restart it again
            except RayActorError:
                await asyncio.sleep(0.2)  # still restarting
                continue
            if loaded == self._latest[1]:  # no push slipped in between
                log.warning("Ray rollout actor %d is back (restart %d) with weights v%d", i, self.deaths[i], loaded)
                with self._lock:
                    self.ready.add(i)
                return
        self._gone.add(i)
        log.warning("Ray rollout actor %d died for good (%d deaths)", i, self.deaths[i])


class RayRolloutProducer(RolloutProducer):
    """`RolloutProducer` whose groups are played by Ray actors (`pool`); same budget, stream and drops."""

    def __init__(self, pool: RayActorPool, tokenizer, **kwargs):
        super().__init__(pool, tokenizer, lambda: None, **kwargs)
        self.pool = pool

    async def _play_episodes(self, seq: int, seed: int, min_version: int = -1) -> list:
        try:
            results, failures = await self.pool.play(seq, seed, min_version)
        except ray.exceptions.RayTaskError as e:  # the actor's engine failed: fatal, as locally
            return [e]
        except RuntimeError as e:  # no actor left
            return [e]
        for reason, detail in failures:
            self._report(reason, detail, seed, 1)
        return [EpisodeLost([EpisodeError(reason, detail)]) if r is None else r for r in results]

    def stop(self, timeout: float = 10.0) -> bool:
        try:
            return super().stop(timeout)
        finally:
            self.pool.shutdown()


def _unnice() -> None:
    """Run this actor at niceness 0 where Ray started it lower (see the module docstring).

    On Linux niceness is per thread: every thread of the worker (Ray's own included) is reset.
    """
    if not hasattr(os, "getpriority") or os.getpriority(os.PRIO_PROCESS, 0) <= 0:
        return
    try:
        _each_thread(lambda tid: os.setpriority(os.PRIO_PROCESS, tid, 0))
    except OSError as e:  # no permission to raise priority (not root, no CAP_SYS_NICE)
        log.warning("rollout actor left at niceness %d (%s): on a busy machine start Ray with "
                    "RAY_worker_niceness=0", os.getpriority(os.PRIO_PROCESS, 0), e)


def connect(address: str | None, pin_threads: int | None = None) -> bool:
    """Make sure this process is connected to Ray; returns whether it called `ray.init`.

    Args:
        address: None: the Ray already initialised in this process, else a new local
            cluster; "auto" or "host:port": an existing cluster (`ray start --head`).
        pin_threads: for a new local cluster, pin this process to its first `pin_threads`
            cores and Ray's daemons and workers to the others (see `pin_cpus`);
            `disconnect` gives this process its cores back.
    """
    if ray is None:
        raise ImportError("rollout.backend=ray needs Ray: pip install 'looprl[ray]'")
    if ray.is_initialized():
        if pin_threads:
            log.warning("rollout.ray_pin_cpus: Ray was already initialised in this process; cores left unpinned")
        return False
    # ray.init replaces the SIGTERM handler (with sys.exit): keep the run's graceful stop.
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    split = pin_cpus(pin_threads) if pin_threads and address is None else None
    try:
        if address is None:
            ray.init(include_dashboard=False, runtime_env=_runtime_env(), _system_config=LOCAL_SYSTEM_CONFIG,
                     **({"num_cpus": len(split[1])} if split else {}))
        else:
            ray.init(address=address, runtime_env=_runtime_env())
    except BaseException:
        if split:
            disconnect()
        raise
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if split:  # every thread of this process, Ray's own included; later ones inherit it
        _set_process_affinity(split[0])
    return True


def disconnect() -> None:
    """Stop this process's Ray connection (and the local cluster it started); unpin its cores."""
    global _unpinned
    ray.shutdown()
    if _unpinned is not None:
        _set_process_affinity(_unpinned)
        _unpinned = None


_unpinned: set[int] | None = None  # this process's cores before `pin_cpus`


def pin_cpus(threads: int) -> tuple[set[int], set[int]] | None:
    """Split this process's cores: the first `threads` for the trainer, the rest for a Ray
    cluster started next from this thread; returns `(trainer's, Ray's)`, or None (with a
    warning) where there are too few cores or no `sched_setaffinity`.

    A local cluster shares the machine with the trainer, and the OS spreads the actors'
    generate calls, their environments and Ray's own daemons over every core, the trainer's
    included: on 2 cores that made each training step 15-25% slower. With the split, what
    the actors do never preempts the step. The cores are set on the calling thread only, so
    the daemons `ray.init` starts (and the workers they start) inherit them; the caller
    then moves this process's threads onto the trainer's cores (`connect` does).
    """
    global _unpinned
    if not hasattr(os, "sched_setaffinity"):
        log.warning("rollout.ray_pin_cpus: this OS cannot pin threads to cores; left unpinned")
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= threads:
        log.warning("rollout.ray_pin_cpus: %d core(s) cannot be split between a trainer on %d thread(s) and Ray; "
                    "left unpinned", len(cores), threads)
        return None
    trainer, rest = set(cores[:threads]), set(cores[threads:])
    _unpinned = _unpinned or set(cores)
    os.sched_setaffinity(0, rest)  # this thread: what it starts inherits these cores
    return trainer, rest


def _set_process_affinity(cores: set[int]) -> None:
    """Pin every thread of this process to `cores` (Linux affinity is per thread)."""
    _each_thread(lambda tid: os.sched_setaffinity(tid, cores))


def _each_thread(apply: Callable[[int], None]) -> None:
    """`apply(tid)` for every thread of this process (Linux's per-thread settings); just
    this thread (0) where /proc is missing; threads that end meanwhile are skipped."""
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            apply(tid)
        except ProcessLookupError:
            pass  # that thread has ended


def _runtime_env() -> dict[str, Any]:
    # The actors build the tiny model in the same cache as the trainer when one is set.
    env = {k: os.environ[k] for k in ("LOOPRL_CACHE",) if k in os.environ}
    return {"env_vars": env} if env else {}
