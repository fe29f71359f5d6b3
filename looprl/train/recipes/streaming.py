"""Asynchronous streaming rollouts (`rollout.mode: async`): producers generate while the trainer updates.

`AsyncRollouts` is the RL step of `train()` when rollouts are asynchronous. On its first
call it starts a `RolloutProducer` over a `SnapshotEngine` (a private copy of the
policy's weights) that keeps groups of K episodes in flight and pushes finished ones
into a bounded `GroupStream`. Each step then:

  1. lets producers run up to `max_staleness` batches ahead of this step;
  2. takes the `tasks_per_step` earliest-started groups at most `max_staleness` policy
     versions old (older ones are dropped and counted: `rollout/dropped/stale`);
  3. computes the algorithm's advantages and runs `_update` exactly as `rl_step` does,
     the PPO ratio against the behaviour logprobs recorded at generation (or, with
     `recompute_logprobs`, against logprobs recomputed under the current weights; or,
     with `decoupled_loss`, clipped around the recomputed ones and weighted by
     pi_current / pi_behaviour);
  4. pushes the trained tensors into the engine's copy every `sync_every` steps (only
     the adapter with LoRA; Ray actors load them while the trainer goes on, and no group
     starts on weights older than the push before it was allowed); episodes in flight
     continue on the new weights (partial rollouts, see `looprl/rollout/weight_sync.py`).

With `max_staleness: 0` the producer starts a batch's groups only once the previous
update is pushed, samples the same seeds and the batches are sorted into seed order, so
the run is the synchronous one: same batches, same metrics, same weights (tested).

With `rollout.backend: ray` the groups are played by Ray actors, each with its own
policy copy (see `looprl/rollout/ray_producers.py`); the stream, the staleness budget and
the drop reasons are the same, and step 4 pushes the weights through the object store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from looprl.config import RunConfig
from looprl.envs import make_env
from looprl.rollout.engine import SamplingParams
from looprl.rollout.producer import RolloutProducer
from looprl.rollout.stream import GroupStream, StreamClosed
from looprl.rollout.weight_sync import SnapshotEngine
from looprl.train.batch import collate, micro_batches, policy_logprobs
from looprl.train.metrics import rollout_metrics
from looprl.train.policy import build_policy, trainable_state
from looprl.types import Trajectory

log = logging.getLogger("looprl.rollout")

DROP_REASONS = ("stale", "env_error", "env_timeout", "env_garbage", "incomplete_group", "producer_died")


class AsyncRollouts:
    """The step function for `rollout.mode: async`; use inside `running(...)`, which stops its producer.

    Args:
        cfg: the run config.
        run_dir: the run folder (dropped episodes are logged to `rollout_drops.jsonl`).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.drop_log = Path(run_dir) / "rollout_drops.jsonl"
        self.producer: RolloutProducer | None = None
        self.engine: SnapshotEngine | None = None
        self.stream: GroupStream | None = None
        self.steps_done = 0
        self._pushed_version: int | None = None  # the last weights version sent to the producers
        self._stop = None
        self._progress = None
        self._log_lock = threading.Lock()
        self._last: dict[str, Any] = {"t": 0.0, "episodes": 0, "tokens": 0, "engine": {}, "dropped": {}}

    @contextlib.contextmanager
    def running(self, stop, progress) -> Iterator["AsyncRollouts"]:
        """While active, a step waiting for a batch returns None once `stop.requested`; on exit
        the producer is stopped (the stream closed, episodes in flight cancelled, its thread joined)."""
        self._stop, self._progress = stop, progress
        try:
            yield self
        finally:
            if self.producer is not None and not self.producer.stop(timeout=30.0):
                log.warning("rollout producer still busy in an environment call after 30 s; left as a daemon")

    def __call__(self, cfg: RunConfig, algorithm, model, tokenizer, engine, optimizer, sampler) -> dict[str, Any] | None:
        """One step on a streamed batch; None if the run was stopped while waiting for it."""
        from looprl.train.trainer import _update, chunk_rows  # the trainer imports this module

        if self.producer is None:
            self._start(model, tokenizer, engine, sampler)
        t0 = time.perf_counter()
        self.producer.release(self.steps_done)
        try:
            groups = self.stream.take(cfg.rollout.tasks_per_step, engine.version,
                                      should_stop=lambda: self._stop is not None and self._stop.requested,
                                      on_wait=self._show_producers)
        except StreamClosed as e:
            raise RuntimeError("rollout producers failed") from (e.__cause__ or e)
        if groups is None:
            return None
        t1 = time.perf_counter()
        episodes = [g.episodes for g in groups]  # (G, K)
        staleness = [engine.version - e.policy_version for g in episodes for e in g]
        rewards = torch.tensor([[e.reward for e in g] for g in episodes])  # (G, K)
        advantages, keep = algorithm.advantages(rewards)  # (G, K), (G, K)
        kept = chunk_rows(episodes, advantages, keep)
        if cfg.rollout.recompute_logprobs or cfg.rollout.decoupled_loss:
            kept = recompute_logprobs(model, tokenizer.pad_token_id, kept, cfg.rollout.temperature,
                                      cfg.algorithm.micro_batch_tokens,
                                      field="proximal_logprobs" if cfg.rollout.decoupled_loss else "behaviour_logprobs")
        train_metrics = _update(cfg, algorithm, model, tokenizer, optimizer, kept)
        engine.update_weights()  # the trainer's version: the shared-model engine only counts
        self.steps_done += 1
        if self.steps_done % cfg.rollout.sync_every == 0:
            self._push(trainable_state(model), engine.version)
        if cfg.rollout.max_staleness > 0:
            # Let producers start the next groups now (on the weights just pushed). With
            # s = 0 that waits for the next step's call, so the RNG and sampler state a
            # checkpoint saves in between are exactly the synchronous run's.
            self.producer.release(self.steps_done, self._pushed_version)
        t2 = time.perf_counter()
        metrics = {
            **rollout_metrics(episodes, rewards, kept=int(keep.sum().item())), **train_metrics,
            "policy_version": engine.version,
            "perf/rollout_s": t1 - t0,
            "perf/train_s": t2 - t1,
            "perf/step_s": t2 - t0,
            **self._stream_metrics(staleness, idle_s=t1 - t0, now=t2),
        }
        self._show_producers()
        return metrics

    def _push(self, state, version: int) -> None:
        """New weights into the producers' engine. Ray actors load them in the background
        when s > 0 (the trainer goes on; each group waits for the version it was released
        on); the local snapshot copies them between two generate calls."""
        if isinstance(self.engine, SnapshotEngine):
            self.engine.push(state, version)
        else:
            self.engine.push(state, version, wait=self.cfg.rollout.max_staleness == 0)
        self._pushed_version = version

    def _start(self, model, tokenizer, engine, sampler) -> None:
        cfg = self.cfg
        self.stream = GroupStream(capacity=(cfg.rollout.max_staleness + 1) * cfg.rollout.tasks_per_step,
                                  max_staleness=cfg.rollout.max_staleness,
                                  on_drop=lambda group, reason: self.producer.free(group, reason))
        params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature)
        common = dict(next_seeds=sampler.sample, stream=self.stream, group_size=cfg.rollout.group_size,
                      groups_per_batch=cfg.rollout.tasks_per_step, max_staleness=cfg.rollout.max_staleness,
                      params=params, max_tokens=cfg.env.max_tokens, context_window=cfg.rollout.context_window,
                      step_timeout=cfg.rollout.env_step_timeout, threads=cfg.threads, on_drop=self._log_drop)
        if cfg.rollout.backend == "ray":
            self.engine = start_ray_pool(cfg, params)
            try:
                self.engine.push(trainable_state(model), engine.version)  # the actors built the config's weights
                self._pushed_version = engine.version
            except BaseException:
                self.engine.shutdown()
                raise
            from looprl.rollout.ray_producers import RayRolloutProducer  # imports ray: only when asked

            self.producer = RayRolloutProducer(self.engine, tokenizer, **common)
        else:
            self.engine = SnapshotEngine(model, tokenizer, engine.version, max_batch_size=cfg.rollout.max_batch_size,
                                         prefix_cache=cfg.rollout.prefix_cache)
            self.producer = RolloutProducer(self.engine, tokenizer, lambda: make_env(cfg.env.id, **cfg.env.kwargs),
                                            **common)
        self._last["t"] = time.perf_counter()
        self.producer.start()

    def _stream_metrics(self, staleness: list[int], idle_s: float, now: float) -> dict[str, float]:
        stats, last = self.producer.stats, self._last
        elapsed = max(now - last["t"], 1e-9)
        dropped = dict(self.stream.dropped)
        metrics = {
            "rollout/episodes_per_s": (stats["episodes"] - last["episodes"]) / elapsed,
            "rollout/tokens_per_s": (stats["sampled_tokens"] - last["tokens"]) / elapsed,
            "perf/rollout_tokens_per_s": (stats["sampled_tokens"] - last["tokens"]) / elapsed,
            "rollout/staleness_mean": sum(staleness) / len(staleness),
            "rollout/staleness_max": max(staleness),
            **{f"rollout/dropped/{r}": dropped.get(r, 0) - last["dropped"].get(r, 0)
               for r in sorted(set(DROP_REASONS) | set(dropped))},
            "rollout/in_flight_groups": self.producer.status()["in_flight"],
            "rollout/queued_groups": len(self.stream),
            "perf/trainer_idle_frac": idle_s / elapsed,
            **self.engine.metrics(since=last["engine"]),  # perf/engine_batch_occupancy and the other engine figures
        }
        self._last = {"t": now, "episodes": stats["episodes"], "tokens": stats["sampled_tokens"],
                      "engine": dict(self.engine.stats), "dropped": dropped}
        return metrics

    def _show_producers(self) -> None:
        if self._progress is None or self.producer is None:
            return
        status, dropped = self.producer.status(), sum(self.stream.dropped.values())
        self._progress.status("rollouts", f"in flight {status['in_flight']} groups  queued {status['queued']}  "
                              f"episodes {self.producer.stats['episodes']}  dropped {dropped}  "
                              f"engine v{self.engine.version}", completed=self.producer.stats["episodes"])

    def _log_drop(self, reason: str, detail: str, seed: int) -> None:
        log.warning("dropped an episode of task seed %d: %s (%s)", seed, reason, detail)
        record = {"reason": reason, "detail": detail, "seed": seed, "trainer_step": self.steps_done,
                  "time": time.time()}
        with self._log_lock, self.drop_log.open("a") as f:
            f.write(json.dumps(record) + "\n")


def start_ray_pool(cfg: RunConfig, params: SamplingParams):
    """Connect to Ray (`rollout.ray_address`) and start `rollout.num_producers` rollout actors,
    each building the policy from `cfg` on its own node."""
    from looprl.rollout import ray_producers

    pin_threads = cfg.threads if cfg.rollout.ray_pin_cpus else None
    started = ray_producers.connect(cfg.rollout.ray_address, pin_threads=pin_threads)
    r = cfg.rollout
    actor_kwargs = dict(
        build_policy=functools.partial(build_policy, cfg),
        make_env=functools.partial(make_env, cfg.env.id, **cfg.env.kwargs),
        params=params, max_tokens=cfg.env.max_tokens, context_window=r.context_window,
        step_timeout=r.env_step_timeout, group_size=r.group_size, max_batch_size=r.max_batch_size,
        prefix_cache=r.prefix_cache, threads=cfg.threads, seed=cfg.seed,
    )
    try:
        return ray_producers.RayActorPool(actor_kwargs, num_actors=r.num_producers, max_restarts=r.producer_restarts,
                                          num_cpus=r.producer_cpus, max_batch_size=r.max_batch_size,
                                          started_ray=started, push_timeout_s=r.ray_timeout)
    except BaseException:
        if started:
            ray_producers.disconnect()
        raise


def running(step_fn, stop, progress):
    """`step_fn.running(stop, progress)` for asynchronous rollouts, else a no-op context."""
    return step_fn.running(stop, progress) if isinstance(step_fn, AsyncRollouts) else contextlib.nullcontext()


@torch.no_grad()
def recompute_logprobs(model, pad_id: int, rows: list[tuple[Trajectory, float]], temperature: float,
                       max_tokens: int, field: str = "behaviour_logprobs") -> list[tuple[Trajectory, float]]:
    """The rows with the sampled tokens' logprobs under `model` (the current weights) in `field`.

    - `"behaviour_logprobs"` replaces the recorded ones: the PPO ratio then measures only
      how far this step's updates moved the policy, not how stale the rollouts were
      (the staleness still bounds how off-policy the samples themselves are).
    - `"proximal_logprobs"` keeps the recorded ones beside them, for decoupled PPO.
    """
    out: list[tuple[Trajectory, float] | None] = [None] * len(rows)
    for group in micro_batches([len(t.input_ids) for t, _ in rows], max_tokens):
        batch = collate([rows[i][0] for i in group], pad_id)
        logprobs = policy_logprobs(model, batch, temperature)  # (B, L-1): row t predicts token t+1
        for row, i in enumerate(group):
            traj, advantage = rows[i]
            n = len(traj.input_ids)
            values = [0.0] + logprobs[row, : n - 1].tolist()
            fresh = [v if m else 0.0 for v, m in zip(values, traj.loss_mask)]
            out[i] = (dataclasses.replace(traj, **{field: fresh}), advantage)
    return out  # type: ignore[return-value]

