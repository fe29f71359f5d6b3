"""The state-based check: diff the world against its start, compare with the expected diff.

As in AppWorld (Trivedi et al., 2024), a task passes iff the required changes happened
AND nothing else changed. `diff(before, after)` lists, per collection, the records
added (without ids, which depend on the order of calls), removed and changed (by field).
`mismatch(actual, expected, loose)` names the first difference between two diffs, or
returns None. Strings compare case- and whitespace-insensitively, ignoring a final
period; numbers within half a cent; `loose` replaces the exact comparison of some
fields of added records by a predicate (e.g. "the note's body holds every phone").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from looprl.envs.apps.world import COLLECTIONS

Loose = dict[str, dict[str, Callable[[Any], bool]]]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What changed from `before` to `after`: `{collection: {added, removed, changed}}`.

    Only collections that changed appear; `"balance"` appears when the balance changed.
    """
    changes: dict[str, Any] = {}
    for name in COLLECTIONS:
        old = {r["id"]: r for r in before[name]}
        new = {r["id"]: r for r in after[name]}
        added = [{k: v for k, v in r.items() if k != "id"} for i, r in new.items() if i not in old]
        removed = sorted(i for i in old if i not in new)
        changed = {
            i: {k: v for k, v in new[i].items() if old[i].get(k) != v}
            for i in old
            if i in new and new[i] != old[i]
        }
        if added or removed or changed:
            changes[name] = {"added": added, "removed": removed, "changed": changed}
    if before["balance"] != after["balance"]:
        changes["balance"] = after["balance"]
    return changes


def mismatch(actual: dict[str, Any], expected: dict[str, Any], loose: Loose) -> str | None:
    """How `actual` differs from `expected` (diffs from `diff`), or None if it does not."""
    for name in sorted(set(actual) | set(expected)):
        if name not in expected:
            return f"unexpected change to {name}"
        if name not in actual:
            return f"missing change to {name}"
        if name == "balance":
            if not same(actual[name], expected[name]):
                return "wrong balance"
            continue
        problem = _collection_mismatch(actual[name], expected[name], loose.get(name, {}))
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _collection_mismatch(
    actual: dict[str, Any], expected: dict[str, Any], loose: dict[str, Callable[[Any], bool]]
) -> str | None:
    if actual["removed"] != expected["removed"]:
        return f"removed ids {actual['removed']}, expected {expected['removed']}"
    if set(actual["changed"]) != set(expected["changed"]):
        return f"changed ids {sorted(actual['changed'])}, expected {sorted(expected['changed'])}"
    for i, fields in expected["changed"].items():
        if not _same_record(actual["changed"][i], fields, {}):
            return f"id {i} changed wrongly"
    unmatched = list(actual["added"])
    for pattern in expected["added"]:
        match = next((r for r in unmatched if _same_record(r, pattern, loose)), None)
        if match is None:
            return "a required record was not added"
        unmatched.remove(match)
    return "unexpected records were added" if unmatched else None


def _same_record(record: dict[str, Any], pattern: dict[str, Any], loose: dict[str, Any]) -> bool:
    if set(record) != set(pattern):
        return False
    return all(
        loose[k](v) if k in loose else same(v, pattern[k]) for k, v in record.items()
    )


def same(a: Any, b: Any) -> bool:
    """Equal up to case, spacing and a final period (strings) or half a cent (numbers).

    Example:
        >>> same(" Running late. ", "running  late"), same(10.004, 10), same("a", "b")
        (True, True, False)
    """
    if isinstance(a, str) and isinstance(b, str):
        return normalize(a) == normalize(b)
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers):
        return not isinstance(a, bool) and not isinstance(b, bool) and abs(a - b) < 0.005
    return a == b


def normalize(text: str) -> str:
    """Lower case, single spaces, no final period."""
    return " ".join(text.casefold().split()).rstrip(".").strip()


def contains_all(parts: list[str]) -> Callable[[Any], bool]:
    """A predicate: the value is a string holding every one of `parts` (normalized)."""
    return lambda value: isinstance(value, str) and all(
        normalize(p) in normalize(value) for p in parts
    )


def number_answer(truth: float) -> Callable[[str | None], bool]:
    """An answer check: the answer holds exactly one number, equal to `truth` (to 0.005).

    Example:
        >>> check = number_answer(45.2)
        >>> check("$45.20"), check("45.2 dollars"), check("1,045.2"), check("3 or 45.2")
        (True, True, False, False)
    """

    def check(answer: str | None) -> bool:
        numbers = _NUMBER.findall((answer or "").replace(",", ""))
        return len(numbers) == 1 and abs(float(numbers[0]) - truth) < 0.005

    return check


def digits_answer(truth: str) -> Callable[[str | None], bool]:
    """An answer check: the answer's digits are `truth`'s (a phone number)."""
    return lambda answer: _digits(answer or "") == _digits(truth)


def text_answer(truth: str) -> Callable[[str | None], bool]:
    """An answer check: the answer is `truth`, normalized."""
    return lambda answer: answer is not None and normalize(answer) == normalize(truth)


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isascii() and c.isdigit())
