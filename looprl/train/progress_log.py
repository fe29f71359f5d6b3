"""A plain progress line every N RL steps, for runs watched through a log file.

The rich display draws nothing useful when its output goes to a file (a run under `nohup` or
a scheduler printed nothing for 16 minutes). `ProgressLog` appends one line per N steps to
`<run folder>/train.log`, and (with `progress` on) echoes it to stderr when that is not a terminal:

    2026-12-02 21:50:07 step 50/150 (33%)  2.41 s/step  0.41 steps/s  26.6 episodes/s  ETA 4m 01s

Rates are over the steps this process ran (a resumed run does not count the steps before it).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TextIO


def format_duration(seconds: float) -> str:
    """`4m 01s`, `2h 05m`, `12s`.

    >>> format_duration(241), format_duration(7500), format_duration(12.4)
    ('4m 01s', '2h 05m', '12s')
    """
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(step: int, total: int, seconds: float, steps_done: int, episodes: int) -> str:
    """The line for `step` of `total`, after `steps_done` steps and `episodes` episodes in `seconds`.

    >>> progress_line(50, 150, 100.0, 40, 1000)
    'step 50/150 (33%)  2.50 s/step  0.40 steps/s  10.0 episodes/s  ETA 4m 10s'
    """
    per_step = seconds / steps_done
    return (f"step {step}/{total} ({step / total:.0%})  {per_step:.2f} s/step  {1 / per_step:.2f} steps/s  "
            f"{episodes / seconds:.1f} episodes/s  ETA {format_duration(per_step * (total - step))}")


class ProgressLog:
    """Appends a progress line to `path` every `every` RL steps (and at the last step).

    Args:
        path: the log file (appended to, so a resumed run continues it).
        total: the run's `train.steps`.
        every: steps between lines (0: never write).
        start_step: the step this process starts from (0, or the resumed checkpoint's).
        echo: also write each line here (None: nowhere; the trainer passes stderr when it
            is not a terminal).
        clock: seconds, monotonic (`time.perf_counter`; tests pass their own).
    """

    def __init__(self, path: Path, total: int, every: int, start_step: int = 0, echo: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if every < 0:
            raise ValueError(f"Expect `every` to be >= 0 (0: never), actually: {every}")
        self.path, self.total, self.every, self.echo, self.clock = Path(path), total, every, echo, clock
        self.start_step, self.start, self.episodes = start_step, clock(), 0

    def step(self, step: int, metrics: dict[str, Any]) -> None:
        """Record RL step `step` (its metrics' `rollout/episodes` count toward episodes/s)."""
        self.episodes += int(metrics.get("rollout/episodes", 0))
        if not self.every or (step % self.every and step != self.total) or step <= self.start_step:
            return
        seconds = max(self.clock() - self.start, 1e-9)
        line = (f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} "
                f"{progress_line(step, self.total, seconds, step - self.start_step, self.episodes)}")
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.echo is not None:
            print(line, file=self.echo, flush=True)


def stderr_if_not_a_terminal() -> TextIO | None:
    """Where the trainer echoes progress lines: stderr when it goes to a file or a pipe."""
    return None if sys.stderr.isatty() else sys.stderr
