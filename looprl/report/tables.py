"""The evaluation table and the episodes the trajectory viewer lists, from a run's eval records."""

from __future__ import annotations

from typing import Any

from looprl.report.run import RunFiles
from looprl.train.eval_stats import wilson_interval


def eval_rows(run: RunFiles) -> list[dict[str, Any]]:
    """One row per evaluation (tag, mode): success with its 95% interval, mean return, turns,
    tokens, the truncated fraction, the tool-error rate and the episodes lost to their environment."""
    rows = []
    for (tag, mode), records in run.evals.items():
        n = len(records)
        if n == 0:
            continue
        wins = sum(bool(r["success"]) for r in records)
        lo, hi = wilson_interval(wins, n)
        rows.append({
            "tag": tag, "mode": mode, "episodes": n, "lost": len(run.lost.get((tag, mode), [])),
            "success": wins / n, "ci_low": lo, "ci_high": hi,
            "mean_return": sum(r["return"] for r in records) / n,
            "mean_turns": sum(r["turns"] for r in records) / n,
            "mean_tokens": sum(r["tokens"] for r in records) / n,
            "truncated": sum(bool(r["truncated"]) for r in records) / n,
            "tool_error_rate": _tool_error_rate(records),
        })
    return rows


def _tool_error_rate(records: list[dict[str, Any]]) -> float | None:
    """Tool results that were errors, over all tool results; None for records written before
    evaluation counted them, or when no tool was called."""
    if any("tool_results" not in r for r in records):
        return None
    results = sum(r["tool_results"] for r in records)
    return sum(r["tool_errors"] for r in records) / results if results else None


def episodes(run: RunFiles) -> list[dict[str, Any]]:
    """Every evaluation episode for the viewer, each with an `id` of `<tag>/<mode>/<seed>` (the
    page's `#episode=` fragment). A record's `messages` (the chat: role, content), when it
    holds them, are what the viewer shows turn by turn."""
    return [{"id": f"{tag}/{mode}/{r['seed']}", "eval": f"{tag}/{mode}", **r}
            for (tag, mode), records in run.evals.items() for r in records]
