"""The ExIt recipe path of `train`: it grows its buffer, and a resumed run restores it exactly."""

from __future__ import annotations

import torch

from looprl.train.checkpoint import CheckpointManager
from tests.recipes.test_recipes import final_state, lora_recipe, rl_records, warm_model  # noqa: F401, F811 (fixture)

EXIT = {"enabled": True, "p_fresh": 0.5, "capacity": 8, "max_attempts": 2}


def sampler_state(run_dir):
    return CheckpointManager.load(CheckpointManager(run_dir / "checkpoints").latest()).extra["sampler"]


def test_exit_run_resumes_with_the_same_buffer_weights_and_metrics(tmp_path, warm_model):
    whole = lora_recipe(tmp_path / "a", warm_model, exit=EXIT, algorithm={"name": "grpo"})
    train_run(whole)
    part = lora_recipe(tmp_path / "b", warm_model, exit=EXIT, algorithm={"name": "grpo"}, train={"steps": 2})
    train_run(part)
    train_run(lora_recipe(tmp_path / "b", warm_model, exit=EXIT, algorithm={"name": "grpo"}), resume=True)

    buffer = sampler_state(whole.run_dir)
    assert buffer["entries"], "the buffer never grew: the test would not exercise its restore"
    assert sampler_state(part.run_dir) == buffer
    (step_a, state_a), (step_b, state_b) = final_state(whole.run_dir), final_state(part.run_dir)
    assert step_a == step_b == 4
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=0, msg=key)
    records = rl_records(whole.run_dir)
    assert rl_records(part.run_dir) == records
    assert any(r.get("exit/revision_frac", 0) > 0 for r in records)


def train_run(cfg, resume=False):
    from looprl.train.trainer import train

    train(cfg, resume=resume)
