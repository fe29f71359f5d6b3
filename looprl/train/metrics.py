"""Per-step metrics: a JSONL file in the run folder, and wandb when enabled."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per record to `run_dir/metrics.jsonl`.

    Each record carries `step` and `time` (Unix seconds). `lines` counts the records in
    the file: a checkpoint stores it, and a run resumed from that checkpoint keeps exactly
    the records written before it, so no record is ever duplicated.

    Args:
        run_dir: the run folder.
        resume_step: when resuming, records of steps after this one (written after the
            checkpoint being resumed) are dropped, so the file reads as one clean run.
        wandb_run: an initialised wandb run, or None.
        resume_lines: when resuming from a checkpoint that counted them, keep exactly
            its first `resume_lines` records (instead of the step rule).
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None, wandb_run=None,
                 resume_lines: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = wandb_run
        if resume_lines is not None and self.path.exists():
            self._keep_first(resume_lines)
        elif resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.lines = len(self.path.read_text().splitlines()) if self.path.exists() else 0
        self._file = self.path.open("a")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def _keep_first(self, n: int) -> None:
        kept = [line for line in self.path.read_text().splitlines() if line.strip()][:n]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def _truncate_after(self, step: int) -> None:
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _step_of(line) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line from a crash: drop it


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_text_atomic(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a kill mid-write leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def init_wandb(enabled: bool, mode: str, project: str, name: str, run_dir: Path, config: dict):
    if not enabled:
        return None
    import wandb

    return wandb.init(project=project, name=name, dir=str(run_dir), mode=mode, config=config, resume="allow")


def rollout_metrics(groups: list[list[Any]], rewards: Any, kept: int | None = None) -> dict[str, float]:
    """The `rollout/*` figures of one step's groups of episodes (`rewards`: their (G, K) returns).

    `kept` is the number of episodes trained on (the rest had zero advantage), when the
    algorithm drops any.
    """
    flat = [e for g in groups for e in g]
    n = len(flat)
    metrics = {
        "rollout/episodes": n,
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/success_rate": sum(bool(e.info.get("success")) for e in flat) / n,
        "rollout/turns_mean": sum(e.num_turns for e in flat) / n,
        "rollout/tokens_mean": sum(e.num_sampled_tokens for e in flat) / n,
        "rollout/truncated_frac": sum(e.truncated for e in flat) / n,
    }
    if kept is not None:
        metrics |= {"rollout/kept_frac": kept / n, "rollout/dropped_zero_adv": n - kept}
    return metrics


def step_timings(groups: list[list[Any]], t0: float, t1: float, t2: float) -> dict[str, float]:
    """`perf/*` of a step that collected `groups` from t0 to t1 and trained from t1 to t2."""
    sampled = sum(e.num_sampled_tokens for g in groups for e in g)
    return {
        "perf/rollout_s": t1 - t0,
        "perf/train_s": t2 - t1,
        "perf/step_s": t2 - t0,
        "perf/rollout_tokens_per_s": sampled / max(t1 - t0, 1e-9),
    }
