"""A synchronous run reproduces bit for bit on a loaded machine: its batches are decided by
the episodes (every live episode's turn, `rollout.turn_wait_s: None`), never by a clock."""

from __future__ import annotations

import subprocess
import sys

import torch

from looprl.train.metrics import read_metrics
from looprl.train.trainer import train

from .test_recipes import final_state, tiny_recipe

HOG = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end:\n    pass"  # bounded in time


def run(root):
    cfg = tiny_recipe(root, train={"steps": 3, "save_every": 3})  # the default rollout.turn_wait_s: None
    train(cfg)
    rollouts = [{k: v for k, v in m.items() if k.startswith(("rollout/", "train/pg_loss"))}
                for m in read_metrics(cfg.run_dir) if "rollout/success_rate" in m]
    return final_state(cfg.run_dir), rollouts


def test_a_sync_run_reproduces_while_another_process_keeps_both_cores_busy(tmp_path):
    (step, idle), idle_rollouts = run(tmp_path / "idle")
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
    try:
        (loaded_step, loaded), loaded_rollouts = run(tmp_path / "loaded")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert loaded_step == step == 3
    assert len(idle_rollouts) == 3 and loaded_rollouts == idle_rollouts
    assert loaded.keys() == idle.keys()
    for name in idle:
        assert torch.equal(loaded[name], idle[name]), name
