"""Progress lines in the run folder's `train.log`, and `train.keep_every` in a real run."""

from __future__ import annotations

import io
import re

import pytest

from looprl.train.metrics import read_metrics
from looprl.train.progress_log import ProgressLog
from looprl.train.trainer import train
from tests.recipes.test_recipes import tiny_recipe


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_n_steps_with_rate_episodes_and_eta(tmp_path):
    clock, echo = Clock(), io.StringIO()
    log = ProgressLog(tmp_path / "train.log", total=10, every=4, start_step=2, echo=echo, clock=clock)
    for step in range(3, 11):  # resumed at step 2: 8 steps of 3 s, 24 episodes each
        clock.now += 3.0
        log.step(step, {"rollout/episodes": 24})
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "step 4/10 (40%)  3.00 s/step  0.33 steps/s  8.0 episodes/s  ETA 18s",
        "step 8/10 (80%)  3.00 s/step  0.33 steps/s  8.0 episodes/s  ETA 6s",
        "step 10/10 (100%)  3.00 s/step  0.33 steps/s  8.0 episodes/s  ETA 0s",  # the last step, off the grid
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step .*", lines[0])  # a timestamp first
    assert echo.getvalue().splitlines() == lines


def test_every_zero_writes_nothing_and_a_negative_every_is_refused(tmp_path):
    log = ProgressLog(tmp_path / "train.log", total=4, every=0)
    for step in range(1, 5):
        log.step(step, {"rollout/episodes": 1})
    assert not (tmp_path / "train.log").exists()
    with pytest.raises(ValueError, match="Expect `every` to be >= 0"):
        ProgressLog(tmp_path / "train.log", total=4, every=-1)


def test_a_run_logs_progress_and_keeps_every_nth_checkpoint(tmp_path):
    cfg = tiny_recipe(tmp_path, sft={"steps": 0},
                      train={"steps": 4, "save_every": 1, "keep_checkpoints": 1, "keep_every": 2, "log_every": 2})
    train(cfg)
    lines = (cfg.run_dir / "train.log").read_text().splitlines()
    assert [line.split()[3] for line in lines] == ["2/4", "4/4"] and all("episodes/s  ETA" in x for x in lines)
    kept = sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir())
    assert kept == ["step_00000000", "step_00000002", "step_00000004"]  # 1 and 3 pruned; 0 is a multiple of 2
    assert all(isinstance(r["time"], float) for r in read_metrics(cfg.run_dir))  # timestamps in metrics.jsonl
