"""What a run folder holds, read as `looprl train` writes it: config, metrics, results, evaluations."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunFiles:
    """The files of one run folder.

    Attributes:
        path: the run folder.
        config_text: `config.yaml`, as written (the resolved config).
        metrics: `metrics.jsonl`, one record per line (`step`, `time`, `rollout/...`, ...).
        results: `results.json` (empty while the run has not finished).
        evals: per `(tag, mode)`, the records of `eval/<tag>_<mode>.jsonl`, in the order the
            run evaluated them.
        lost: per `(tag, mode)`, the episodes lost to their environment (`..._lost.jsonl`).
    """

    path: Path
    config_text: str
    metrics: list[dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict)
    evals: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    lost: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run folder; a folder without `config.yaml` and `metrics.jsonl` is refused."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"Expect a run folder, actually {path} is not a folder")
    missing = [name for name in ("config.yaml", "metrics.jsonl") if not (path / name).is_file()]
    if missing:
        raise ValueError(f"Expect a run folder holding config.yaml and metrics.jsonl (as `looprl train` writes), "
                         f"actually {path} has no {' or '.join(missing)}")
    results_path = path / "results.json"
    run = RunFiles(path=path, config_text=(path / "config.yaml").read_text(),
                   metrics=_read_jsonl(path / "metrics.jsonl"),
                   results=json.loads(results_path.read_text()) if results_path.is_file() else {})
    order = _tag_order(run.metrics)
    for file in sorted((path / "eval").glob("*.jsonl"), key=lambda f: _eval_sort_key(f, order)):
        name, is_lost = (file.stem[: -len("_lost")], True) if file.stem.endswith("_lost") else (file.stem, False)
        tag, _, mode = name.rpartition("_")
        if tag:
            (run.lost if is_lost else run.evals)[(tag, mode)] = _read_jsonl(file)
    return run


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object a line; a torn last line (a run still writing, or killed) is left out."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"Expect one JSON object per line in {path}, actually line {i + 1}: {e}") from e
    return records


def _tag_order(metrics: list[dict[str, Any]]) -> dict[str, int]:
    """Evaluation tags in the order the run logged them (`eval/<tag>/<mode>/...`)."""
    order: dict[str, int] = {}
    for record in metrics:
        for key in record:
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "eval":
                order.setdefault(parts[1], len(order))
    return order


def _eval_sort_key(file: Path, order: dict[str, int]) -> tuple[int, str]:
    tag = file.stem.removesuffix("_lost").rpartition("_")[0]
    return order.get(tag, len(order)), file.name
