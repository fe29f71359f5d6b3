"""Asynchronous streaming rollouts through `train()`: s = 0 is the synchronous run,
faults lose episodes and never the run, and SIGTERM with a full stream exits cleanly."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import time

import gymnasium
import pytest
import torch

import looprl.train.recipes.streaming as streaming
from looprl.envs import make_env
from looprl.train.metrics import read_metrics
from looprl.train.trainer import train
from tests.recipes.test_recipes import final_state, rl_records, tiny_recipe


@pytest.fixture(autouse=True)
def _watchdog():
    """A deadlock fails the test run loudly instead of hanging it."""
    faulthandler.dump_traceback_later(600, exit=True)  # a deadlock, not a slow machine
    yield
    faulthandler.cancel_dump_traceback_later()


def async_recipe(tmp_path, staleness, **sections):
    rollout = {"mode": "async", "max_staleness": staleness, **sections.pop("rollout", {})}
    return tiny_recipe(tmp_path, rollout=rollout, **sections)


def test_max_staleness_zero_is_the_synchronous_run_bit_for_bit(tmp_path):
    sync = tiny_recipe(tmp_path / "sync", train={"steps": 3})
    train(sync)
    asyn = async_recipe(tmp_path / "async", 0, train={"steps": 3})
    train(asyn)

    records_sync, records_async = rl_records(sync.run_dir), rl_records(asyn.run_dir)
    assert sum(r["train/optimizer_steps"] for r in records_sync) > 0, "no update: the test would prove nothing"
    assert len(records_async) == len(records_sync) == 3
    for a, s in zip(records_async, records_sync):
        assert {k: a[k] for k in s} == s  # every synchronous figure, exactly
        assert a["rollout/staleness_max"] == 0 and a["rollout/dropped/stale"] == 0
    _, state_sync = final_state(sync.run_dir)
    _, state_async = final_state(asyn.run_dir)
    for key in state_sync:
        torch.testing.assert_close(state_async[key], state_sync[key], rtol=0, atol=0, msg=key)


class Faulty(gymnasium.Wrapper):
    """The 3rd environment made raises in step, the 10th returns garbage, the 17th hangs."""

    made = 0

    def __init__(self, env):
        super().__init__(env)
        Faulty.made += 1
        n = Faulty.made
        self.fault = {3: "raise", 10: "garbage", 17: "hang"}.get(n)

    def step(self, action):
        if self.fault == "raise":
            raise ConnectionError("tool server went away")
        if self.fault == "hang":
            time.sleep(1.0)
        if self.fault == "garbage":
            return "?", float("nan"), False, False, {}
        return self.env.step(action)


def test_async_run_survives_env_faults_and_never_trains_on_stale_data(tmp_path, monkeypatch):
    Faulty.made = 0
    monkeypatch.setattr(streaming, "make_env", lambda env_id, **kw: Faulty(make_env(env_id, **kw)))
    # No SFT: rewards do not matter here, faults and staleness do.
    cfg = async_recipe(tmp_path, 1, train={"steps": 4}, sft={"steps": 0}, rollout={"env_step_timeout": 0.3})
    train(cfg)
    assert final_state(cfg.run_dir)[0] == 4
    records = [r for r in read_metrics(cfg.run_dir) if "rollout/staleness_max" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["rollout/staleness_max"] <= 1 for r in records)
    for key in ("rollout/episodes_per_s", "rollout/tokens_per_s", "rollout/staleness_mean", "perf/trainer_idle_frac",
                "perf/engine_batch_occupancy"):
        assert all(r[key] >= 0 for r in records), key
    dropped = {reason: sum(r[f"rollout/dropped/{reason}"] for r in records)
               for reason in ("env_error", "env_garbage", "env_timeout")}
    assert all(n > 0 for n in dropped.values()), dropped
    logged = [json.loads(line) for line in (cfg.run_dir / "rollout_drops.jsonl").read_text().splitlines()]
    assert {"env_error", "env_garbage", "env_timeout"} <= {d["reason"] for d in logged}
    assert any("ConnectionError" in d["detail"] for d in logged)


def test_sigterm_with_a_full_stream_saves_a_checkpoint_and_exits(tmp_path, monkeypatch):
    real_call = streaming.Streaming.step
    seen = {}

    def call_then_sigterm(self, *args, **kwargs):
        metrics = real_call(self, *args, **kwargs)
        deadline = time.perf_counter() + 30
        while len(self.stream) < self.stream.capacity and time.perf_counter() < deadline:
            time.sleep(0.02)  # producers run ahead until the stream is full
        seen["full"] = len(self.stream) == self.stream.capacity
        seen["rollouts"] = self
        os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(streaming.Streaming, "step", call_then_sigterm)
    cfg = async_recipe(tmp_path, 1, train={"steps": 4, "save_every": 100}, sft={"steps": 0})
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert seen["full"], "the stream never filled up: the test would not exercise a full stream"
    assert time.perf_counter() - start < 60
    assert not seen["rollouts"].producer.alive
    assert final_state(cfg.run_dir)[0] == 1


@pytest.mark.parametrize("correction", ["decoupled_loss", "recompute_logprobs"])
def test_stale_rollouts_train_with_each_off_policy_correction(tmp_path, correction):
    cfg = async_recipe(tmp_path, 1, train={"steps": 4}, rollout={correction: True})
    train(cfg)
    records = [r for r in rl_records(cfg.run_dir) if r["train/optimizer_steps"] > 0]
    stale = [r for r in records if r["rollout/staleness_max"] > 0]
    assert stale, "no update on a stale batch: the correction would not be exercised"
    if correction == "decoupled_loss":
        # The proximal logprobs are the current weights', the behaviour's an older policy's.
        assert all(r["train/behaviour_kl"] > 0 for r in stale)
        assert all(0 < r["train/behaviour_weight_mean"] < 5 for r in records)
    else:
        assert not any("train/behaviour_kl" in r for r in records)
    _, state = final_state(cfg.run_dir)
    assert all(torch.isfinite(v).all() for v in state.values())
