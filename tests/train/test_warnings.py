"""The warnings that tell a user why a run is not learning."""

from __future__ import annotations

import logging

from looprl.train.trainer import IDLE_STEPS_WARNING, train
from tests.recipes.test_recipes import tiny_recipe


def test_a_policy_that_never_succeeds_is_named_before_rl_and_its_idle_steps_after(tmp_path, caplog):
    # No SFT: the random tiny policy solves nothing, so no group has a reward difference.
    cfg = tiny_recipe(tmp_path, sft={"steps": 0}, train={"steps": IDLE_STEPS_WARNING + 1, "save_every": 100},
                      rollout={"tasks_per_step": 2, "group_size": 2, "max_new_tokens": 8},
                      eval={"episodes": 4, "greedy": False, "before_rl": True})
    with caplog.at_level(logging.WARNING, logger="looprl.train"):
        results = train(cfg)
    assert results["warmstart"]["sampled"]["success_rate"] == 0
    said = [r.getMessage() for r in caplog.records if r.name == "looprl.train"]
    assert sum("solves none of 4 held-out tasks before RL" in m for m in said) == 1
    idle = [m for m in said if "RL steps in a row made no optimizer step" in m]
    assert idle == [f"{IDLE_STEPS_WARNING} RL steps in a row made no optimizer step (up to step {IDLE_STEPS_WARNING}): "
                    "every group's episodes got the same reward, so every advantage is 0 (the policy solves ~none or "
                    "~all of its tasks); warm-start it with SFT or pick tasks it solves sometimes"]


def test_a_learning_run_says_neither(tmp_path, caplog):
    cfg = tiny_recipe(tmp_path, train={"steps": 2}, eval={"episodes": 20, "greedy": False, "before_rl": True})
    with caplog.at_level(logging.WARNING, logger="looprl.train"):
        results = train(cfg)
    assert results["warmstart"]["sampled"]["success_rate"] > 0
    assert not [r for r in caplog.records if "optimizer step" in r.getMessage() or "solves none" in r.getMessage()]
