"""Shared test helpers: a `RunContext` around hand-built parts, for driving one recipe step."""

from __future__ import annotations

from pathlib import Path

from looprl.algorithms import build_algorithm
from looprl.rollout.weight_sync import SharedWeights
from looprl.train.context import RunContext
from looprl.train.progress import RunProgress


class NoSync:
    """A weight sync that only records the versions published."""

    def __init__(self, engine=None):
        self.engine, self.versions = engine, []

    def publish(self, state, version):
        self.versions.append(version)
        if self.engine is not None:
            self.engine.version = version


def make_context(cfg, model, tokenizer, optimizer, engine, sampler, run_dir: Path | str = ".") -> RunContext:
    """A run's context without a run folder's logger (a step does not log)."""
    sync = SharedWeights(engine) if hasattr(engine, "generate") else NoSync(engine)
    return RunContext(cfg=cfg, model=model, tokenizer=tokenizer, optimizer=optimizer, algorithm=build_algorithm(cfg),
                      sampler=sampler, engine=engine, sync=sync, run_dir=Path(run_dir), logger=None,
                      progress=RunProgress(enabled=False))
