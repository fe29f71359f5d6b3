"""Reward functions for verifiable single-turn tasks: `(completion, answer, **kw) -> float`.

Each is a small pure function that never raises on any `str`
completion, however long or strange; extra keyword arguments (such as the row's
`prompt`, which `DatasetEnv` passes) are accepted and ignored. Name one in
`DatasetEnv(reward_fn="looprl.envs.rewards:numeric_match")`.
"""

from __future__ import annotations

import math
import re
from typing import Any

# A decimal number with optional thousands commas ("1,234") and fraction; digits with
# misplaced commas ("1,2,3") read as several numbers, as in a list. A sign counts only
# where it cannot be an operator: "x = -5" is -5, but "3-5" is 3 and 5.
_NUMBER = re.compile(r"(?:(?<![\w)])[-+])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def normalize(text: str) -> str:
    """`text` case-folded, with each run of whitespace made one space, stripped.

    Example:
        >>> normalize("  The  Answer\\n is 42 ")
        'the answer is 42'
    """
    return " ".join(text.casefold().split())


def exact_match(completion: str, answer: str, **kw: Any) -> float:
    """1.0 if the completion equals the answer up to whitespace and case, else 0.0.

    Example:
        >>> exact_match("  Paris ", "paris"), exact_match("Paris, France", "Paris")
        (1.0, 0.0)
    """
    return 1.0 if normalize(completion) == normalize(answer) else 0.0


def contains(completion: str, answer: str, **kw: Any) -> float:
    """1.0 if the answer appears in the completion (up to whitespace and case), else 0.0.

    An empty answer matches nothing, so that it cannot reward every completion.

    Example:
        >>> contains("I think it is PARIS.", "Paris"), contains("London", "Paris")
        (1.0, 0.0)
        >>> contains("anything", "  ")
        0.0
    """
    needle = normalize(answer)
    return 1.0 if needle and needle in normalize(completion) else 0.0


def last_number(text: str) -> float | None:
    """The last decimal number written in `text` (`"1,234.5"` reads 1234.5), or None.

    Example:
        >>> last_number("3 apples and 1,250.5 pears"), last_number("x = -7."), last_number("3-5")
        (1250.5, -7.0, 5.0)
        >>> last_number("no digits")
    """
    last = None
    for last in _NUMBER.finditer(text):  # keeps only the last match: O(1) memory
        pass
    if last is None:
        return None
    value = float(last.group().replace(",", ""))
    return value if math.isfinite(value) else None


def numeric_match(completion: str, answer: str, **kw: Any) -> float:
    """1.0 if the last numbers in the completion and the answer are equal, else 0.0.

    Equal means within 1e-6, or a relative 1e-9 for large values. Reading the answer's
    last number too lets answers like GSM8K's `"... #### 72"` be used as they are.

    Example:
        >>> numeric_match("So the total is $1,200.", "1200")
        1.0
        >>> numeric_match("x = 0.5 or 3", "1/2"), numeric_match("no number", "4")
        (0.0, 0.0)
        >>> numeric_match("The answer is 72", "She sold 48 + 24 = 72 clips. #### 72")
        1.0
    """
    got, expected = last_number(completion), last_number(answer)
    if got is None or expected is None:
        return 0.0
    return 1.0 if math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-6) else 0.0
