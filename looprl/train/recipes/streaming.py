"""Asynchronous streaming rollouts (`rollout.mode: async`): producers generate while the trainer updates.

`Streaming` is the recipe of `rollout.mode: async`. On its first step it starts a
`RolloutProducer` over a `SnapshotEngine` (a private copy of the policy's weights)
that keeps groups of K episodes in flight and pushes finished ones into a bounded
`GroupStream`. Each step then:

  1. lets producers run up to `max_staleness` batches ahead of this step;
  2. takes the `tasks_per_step` earliest-started groups at most `max_staleness` policy
     versions old (older ones are dropped and counted: `rollout/dropped/stale`);
  3. computes the algorithm's advantages and updates exactly as the on-policy recipe does,
     the PPO ratio against the behaviour logprobs recorded at generation (or, with
     `recompute_logprobs`, against logprobs recomputed under the current weights; or,
     with `decoupled_loss`, clipped around the recomputed ones and weighted by
     pi_current / pi_behaviour);
  4. publishes the trained tensors to the producers' engine every `sync_every` steps
     (only the adapter with LoRA; Ray actors load them while the trainer goes on, and no
     group starts on weights older than the push before it was allowed); episodes in
     flight continue on the new weights (partial rollouts, see `looprl/rollout/weight_sync.py`).

With `max_staleness: 0` the producer starts a batch's groups only once the previous
update is pushed, samples the same seeds and the batches are sorted into seed order, so
the run is the synchronous one: same batches, same metrics, same weights (tested).

With `rollout.backend: ray` the groups are played by Ray actors, each with its own
policy copy (see `looprl/rollout/ray_producers.py`); the stream, the staleness budget and
the drop reasons are the same, and step 4 pushes the weights through the object store.
Episodes are played through the run's one collection path (`looprl.rollout.collect`):
the same retries, timeouts and drop reasons as every other mode.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from looprl.config import RunConfig
from looprl.envs import make_env
from looprl.rollout.collect import DROP_REASONS
from looprl.rollout.engine import SamplingParams
from looprl.rollout.producer import RolloutProducer
from looprl.rollout.stream import GroupStream, StreamClosed
from looprl.rollout.weight_sync import SnapshotEngine
from looprl.train.metrics import rollout_metrics
from looprl.train.policy import build_policy, trainable_state
from looprl.train.recipes import Interrupted
from looprl.train.update import chunk_rows, recompute_logprobs, update_policy

log = logging.getLogger("looprl.rollout")


class Streaming:
    """The recipe of `rollout.mode: async` (see the module docstring); `close()` stops its producer."""

    def __init__(self, ctx, fresh: bool):
        cfg = ctx.cfg
        self.cfg = cfg
        self.drop_log = Path(ctx.run_dir) / "rollout_drops.jsonl"
        self.producer: RolloutProducer | None = None
        self.engine = None  # the producers' engine: a SnapshotEngine, or Ray's actor pool
        self.stream: GroupStream | None = None
        self.steps_done = 0
        self._pushed_version: int | None = None  # the last weights version sent to the producers
        self._ctx = ctx
        self._log_lock = threading.Lock()
        self._last: dict[str, Any] = {"t": 0.0, "episodes": 0, "tokens": 0, "engine": {}, "dropped": {}}

    def close(self) -> None:
        """Stop the producer: close the stream, cancel the episodes in flight, join its thread."""
        if self.producer is not None and not self.producer.stop(timeout=30.0):
            log.warning("rollout producer still busy in an environment call after 30 s; left as a daemon")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def step(self, ctx) -> dict[str, Any]:
        """One step on a streamed batch; raises `Interrupted` if the run was stopped while waiting for it."""
        cfg, model, tokenizer = ctx.cfg, ctx.model, ctx.tokenizer
        if self.producer is None:
            self._start(ctx)
        t0 = time.perf_counter()
        self.producer.release(self.steps_done)
        try:
            groups = self.stream.take(cfg.rollout.tasks_per_step, ctx.version,
                                      should_stop=lambda: ctx.stop is not None and ctx.stop.requested,
                                      on_wait=self._show_producers)
        except StreamClosed as e:
            raise RuntimeError("rollout producers failed") from (e.__cause__ or e)
        if groups is None:
            raise Interrupted
        t1 = time.perf_counter()
        episodes = [g.episodes for g in groups]  # (G, K)
        staleness = [ctx.version - e.policy_version for g in episodes for e in g]
        rewards = torch.tensor([[e.reward for e in g] for g in episodes], device="cpu")  # (G, K)
        advantages, keep = ctx.algorithm.advantages(rewards)  # (G, K), (G, K)
        kept = chunk_rows(episodes, advantages, keep)
        if cfg.rollout.recompute_logprobs or cfg.rollout.decoupled_loss:
            kept = recompute_logprobs(model, tokenizer.pad_token_id, kept, cfg.rollout.temperature,
                                      cfg.algorithm.micro_batch_tokens,
                                      field="proximal_logprobs" if cfg.rollout.decoupled_loss else "behaviour_logprobs")
        train_metrics = update_policy(cfg, ctx.algorithm, model, tokenizer, ctx.optimizer, kept)
        ctx.publish()  # the trainer's own engine (evaluation) shares the model: only the version moves
        self.steps_done += 1
        if self.steps_done % cfg.rollout.sync_every == 0:
            self._push(trainable_state(model), ctx.version)
        if cfg.rollout.max_staleness > 0:
            # Let producers start the next groups now (on the weights just pushed). With
            # s = 0 that waits for the next step's call, so the RNG and sampler state a
            # checkpoint saves in between are exactly the synchronous run's.
            self.producer.release(self.steps_done, self._pushed_version)
        t2 = time.perf_counter()
        metrics = {
            **rollout_metrics(episodes, rewards, kept=int(keep.sum().item())), **train_metrics,
            "policy_version": ctx.version,
            "perf/rollout_s": t1 - t0,
            "perf/train_s": t2 - t1,
            "perf/step_s": t2 - t0,
            **self._stream_metrics(staleness, idle_s=t1 - t0, now=t2),
        }
        self._show_producers()
        return metrics

    def _push(self, state, version: int) -> None:
        """New weights into the producers' engine: Ray actors load them in the background
        when s > 0 (the trainer goes on; each group waits for the version it was released
        on); the local snapshot copies them between two generate calls."""
        self.engine.publish(state, version)
        self._pushed_version = version

    def _start(self, ctx) -> None:
        cfg, tokenizer = self.cfg, ctx.tokenizer
        self.stream = GroupStream(capacity=(cfg.rollout.max_staleness + 1) * cfg.rollout.tasks_per_step,
                                  max_staleness=cfg.rollout.max_staleness,
                                  on_drop=lambda group, reason: self.producer.free(group, reason))
        params = SamplingParams(cfg.rollout.max_new_tokens, cfg.rollout.temperature)
        common = dict(next_seeds=ctx.sampler.sample, stream=self.stream, group_size=cfg.rollout.group_size,
                      groups_per_batch=cfg.rollout.tasks_per_step, max_staleness=cfg.rollout.max_staleness,
                      params=params, max_tokens=cfg.env.max_tokens, context_window=cfg.rollout.context_window,
                      step_timeout=cfg.rollout.env_step_timeout, threads=cfg.threads, on_drop=self._log_drop,
                      retries=cfg.rollout.env_retries, concurrency=cfg.env.concurrency)
        if cfg.rollout.backend == "ray":
            self.engine = start_ray_pool(cfg, params)
            try:
                self.engine.push(trainable_state(ctx.model), ctx.version)  # the actors built the config's weights
                self._pushed_version = ctx.version
            except BaseException:
                self.engine.shutdown()
                raise
            from looprl.rollout.ray_producers import RayRolloutProducer  # imports ray: only when asked

            self.producer = RayRolloutProducer(self.engine, tokenizer, **common)
        else:
            self.engine = SnapshotEngine(ctx.model, tokenizer, ctx.version, max_batch_size=cfg.rollout.max_batch_size,
                                         prefix_cache=cfg.rollout.prefix_cache,
                                         shared_prefix=cfg.rollout.shared_prefix)
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
        if self.producer is None:
            return
        status, dropped = self.producer.status(), sum(self.stream.dropped.values())
        self._ctx.progress.status("rollouts", f"in flight {status['in_flight']} groups  queued {status['queued']}  "
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
        prefix_cache=r.prefix_cache, shared_prefix=r.shared_prefix, threads=cfg.threads, seed=cfg.seed, retries=r.env_retries,
        concurrency=cfg.env.concurrency,
    )
    try:
        return ray_producers.RayActorPool(actor_kwargs, num_actors=r.num_producers, max_restarts=r.producer_restarts,
                                          num_cpus=r.producer_cpus, max_batch_size=r.max_batch_size,
                                          started_ray=started, push_timeout_s=r.ray_timeout,
                                          wait_on_publish=r.max_staleness == 0)
    except BaseException:
        if started:
            ray_producers.disconnect()
        raise
