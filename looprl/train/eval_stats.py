"""What a comparison table reports of an evaluation: success with a confidence interval,
pass@k and pass^k over several samples per task.

- Success carries the Wilson score interval (95%), which stays inside [0, 1] and keeps its
  coverage near 0% and 100%, where the normal approximation's does not. It treats every
  episode as an independent trial; with several samples per task they are not (a task's
  samples share its difficulty), so the interval is then too narrow.
- pass@k is the chance that at least one of k samples solves a task; its unbiased estimator
  from n >= k samples with c successes is 1 - C(n-c, k) / C(n, k) (Chen et al. 2021,
  "Evaluating Large Language Models Trained on Code", eq. 1), averaged over tasks.
- pass^k is the chance that all k samples solve it (Yao et al. 2024, tau-bench), unbiased
  as C(c, k) / C(n, k).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% by default).

    >>> [round(x, 4) for x in wilson_interval(0, 10)]
    [0.0, 0.2775]
    """
    if n <= 0:
        raise ValueError(f"Expect a positive number of trials, actually: {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one task from `n` samples, `c` of them successes.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), pass_at_k(4, 0, 2)
    (0.25, 1.0, 0.0)
    """
    _check(n, c, k)
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    """Unbiased pass^k of one task (all k samples succeed) from `n` samples, `c` successes.

    >>> pass_hat_k(4, 2, 2), pass_hat_k(4, 4, 4)
    (0.16666666666666666, 1.0)
    """
    _check(n, c, k)
    return math.comb(c, k) / math.comb(n, k)


def _check(n: int, c: int, k: int) -> None:
    if not 0 <= c <= n:
        raise ValueError(f"Expect 0 <= successes <= samples, actually {c} of {n}")
    if not 1 <= k <= n:
        raise ValueError(f"Expect 1 <= k <= samples per task ({n}), actually: k = {k}")


def compare_summary(records: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """Success with its Wilson interval, and pass@k and pass^k for each k, over the tasks of
    `records` (grouped by `seed`; every task must have the same number of samples, >= max k)."""
    by_task: dict[int, list[bool]] = defaultdict(list)
    for r in records:
        by_task[r["seed"]].append(bool(r["success"]))
    counts = {len(v) for v in by_task.values()}
    if len(counts) != 1:
        raise ValueError(f"Expect every task to have the same number of samples, actually: {sorted(counts)}")
    (n,) = counts
    successes = sum(sum(v) for v in by_task.values())
    low, high = wilson_interval(successes, len(records))
    tasks = len(by_task)
    return {
        "tasks": tasks, "samples": n, "success_rate": successes / len(records), "success_ci95": [low, high],
        "pass_at_k": {k: sum(pass_at_k(n, sum(v), k) for v in by_task.values()) / tasks for k in ks},
        "pass_hat_k": {k: sum(pass_hat_k(n, sum(v), k) for v in by_task.values()) / tasks for k in ks},
    }
