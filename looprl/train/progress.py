"""A rich progress display for long runs (a no-op when disabled)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

SHOWN = ("sft/loss", "rollout/success_rate", "rollout/reward_mean", "rollout/kept_frac", "train/clipfrac",
         "rollout/staleness_mean", "perf/trainer_idle_frac")


class RunProgress:
    """One bar per stage (`sft`, `rl`; `rollouts` for async producers) with the latest key metrics beside it."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"),
            console=self.console, disable=not enabled,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> "RunProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def start(self, name: str, total: int, completed: int = 0) -> None:
        self._tasks[name] = self._progress.add_task(name, total=total, completed=completed, metrics="")

    def advance(self, name: str, metrics: dict[str, float]) -> None:
        shown = "  ".join(f"{k.split('/')[-1]}={metrics[k]:.3g}" for k in SHOWN if k in metrics)
        self._progress.update(self._tasks[name], advance=1, metrics=shown)

    def status(self, name: str, text: str, completed: int | None = None) -> None:
        """Create or update an open-ended line (e.g. the rollout producers beside the trainer's `rl` bar)."""
        if name not in self._tasks:
            self._tasks[name] = self._progress.add_task(name, total=None, metrics="")
        self._progress.update(self._tasks[name], metrics=text, completed=completed)

    def note(self, text: str) -> None:
        if self.enabled:
            self._progress.console.log(text)
