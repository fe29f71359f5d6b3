"""Evaluation records, their summary, and the paired change between two evaluations."""

from __future__ import annotations

import itertools
import math

import pytest

from looprl.train.evaluate import describe_change, paired_change, sign_test, summarize


def records(outcomes, tasks=None):
    return [{"seed": i, "task_id": (tasks or {}).get(i, f"t{i}"), "success": ok, "return": float(ok),
             "turns": 2, "tokens": 10, "truncated": False, "tool_results": 2, "tool_errors": i % 2}
            for i, ok in enumerate(outcomes)]


def brute_sign_test(a: int, b: int) -> float:
    """P(|gained - lost| >= |a - b|) over every equally likely split of the a + b changes."""
    n = a + b
    splits = list(itertools.product((0, 1), repeat=n))
    return sum(abs(2 * sum(s) - n) >= abs(a - b) for s in splits) / len(splits)


@pytest.mark.parametrize("a, b", [(0, 0), (1, 0), (3, 3), (5, 1), (0, 9), (7, 2), (10, 0)])
def test_sign_test_matches_enumerating_every_split(a, b):
    assert sign_test(a, b) == pytest.approx(brute_sign_test(a, b), abs=1e-12)


def test_sign_test_stays_finite_on_thousands_of_changes():
    assert sign_test(1000, 1000) == 1.0
    p = sign_test(1100, 900)
    assert 0 < p < 1e-4 and math.isfinite(p)


def test_paired_change_counts_only_episodes_whose_outcome_changed():
    before = records([True, True, False, False, False, True])
    after = records([True, False, True, True, False, True])
    change = paired_change(before, after)
    assert change == {"episodes": 6, "before": 0.5, "after": 4 / 6, "change": 1 / 6, "gained": 2, "lost": 1,
                      "p_value": 1.0}
    assert describe_change(change) == "+16.7 pts (2 gained, 1 lost; sign test p = 1)"


def test_paired_change_pairs_by_seed_not_by_position():
    before = records([True, False, False])
    after = list(reversed(records([True, False, True])))
    assert paired_change(before, after)["gained"] == 1 and paired_change(before, after)["lost"] == 0


def test_evaluations_of_different_tasks_do_not_pair():
    with pytest.raises(ValueError, match="same seeds"):
        paired_change(records([True, False]), records([True, False, True]))
    with pytest.raises(ValueError, match="seed 1 to be the same task"):
        paired_change(records([True, False]), records([True, False], tasks={1: "other"}))


def test_summarize_reads_records():
    summary = summarize(records([True, False, False, True]))
    assert summary["episodes"] == 4 and summary["success_rate"] == 0.5
    assert summary["tool_error_rate"] == 2 / 8  # 2 errors in 8 tool results
    assert summary["success_stderr"] == pytest.approx(0.25) and summary["mean_return"] == 0.5


def test_a_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import os

    from looprl.train.metrics import read_jsonl, write_text_atomic

    path = tmp_path / "eval" / "final_sampled.jsonl"
    write_text_atomic(path, '{"seed": 0}\n')
    assert read_jsonl(path) == [{"seed": 0}]

    def killed(*args):
        raise KeyboardInterrupt  # the process dies after the new text is written, before it replaces the old

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"seed": 1}\n')
    assert read_jsonl(path) == [{"seed": 0}]
