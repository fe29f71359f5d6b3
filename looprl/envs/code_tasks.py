"""The task bank of `looprl/Code-v0`: small function families with parameters.

A `Family` is a kind of function ("the sum of the k largest numbers"); its parameters
(`k`) are drawn per task from a few fixed choices, which makes a *problem*: a
description and a reference solution (what the oracle submits). Test inputs are drawn
from a per-task seed, and the expected outputs come from running the reference
solution here, in the trusted process.

Descriptions and solutions are `string.Template`s over the parameters plus the
variables `derive` computes from them (wording, operators, whole expressions).
Reference solutions avoid anything whose result depends on hash order (iterating a
`set` of strings), because the sandbox fixes `PYTHONHASHSEED` and this process may not.
"""

from __future__ import annotations

import itertools
import math
import random
import string
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Params = dict[str, Any]


@dataclass(frozen=True)
class Family:
    """One family of functions.

    Attributes:
        name: The function's name.
        level: 1 (easy), 2 (medium) or 3 (hard).
        signature: The `def` line without the colon, e.g. `def f(nums: list[int]) -> int`.
        params: Each parameter's possible values.
        describe: The task text, a template.
        solution: The reference solution, a template (dedented).
        inputs: Draws one argument list from a `random.Random` and the parameters.
        derive: More template variables, computed from the parameters.
        valid: Which parameter combinations make sense (all by default).
    """

    name: str
    level: int
    signature: str
    params: dict[str, tuple[Any, ...]]
    describe: str
    solution: str
    inputs: Callable[[random.Random, Params], list[Any]]
    derive: Callable[[Params], dict[str, Any]] = field(default=lambda p: {})
    valid: Callable[[Params], bool] = field(default=lambda p: True)

    def all_params(self) -> list[Params]:
        """Every valid combination of parameter values, in a fixed order."""
        names = list(self.params)
        combinations = (
            dict(zip(names, values, strict=True))
            for values in itertools.product(*self.params.values())
        )
        return [params for params in combinations if self.valid(params)]

    def description(self, params: Params) -> str:
        return self._fill(self.describe, params)

    def reference(self, params: Params) -> str:
        return textwrap.dedent(self._fill(self.solution, params)).lstrip("\n")

    def _fill(self, template: str, params: Params) -> str:
        return string.Template(template).substitute({**params, **self.derive(params)})


# --- inputs and wording ----------------------------------------------------------


def _ints(rng: random.Random, low: int, high: int, max_len: int) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(0, max_len))]


def _words(rng: random.Random, sep: str, max_words: int, letters: str) -> str:
    words = (
        "".join(rng.choice(letters) for _ in range(rng.randint(1, 7)))
        for _ in range(rng.randint(0, max_words))
    )
    return sep.join(words)


def _text(rng: random.Random, alphabet: str, max_len: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


def _number(rng: random.Random, small: int, large: int, low: int = 0) -> int:
    """Half the time a small number (edge cases), else one up to `large`."""
    return rng.choice([rng.randint(low, small), rng.randint(low, large)])


def _grid(rng: random.Random, high: int) -> list[Any]:
    rows, cols = rng.randint(0, 5), rng.randint(1, 5)
    return [[[rng.randint(0, high) for _ in range(cols)] for _ in range(rows)]]


def _ordinal(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


MIXED = string.ascii_letters + "  ,.!?-"


# --- level 1 ---------------------------------------------------------------------

SUM_LARGEST = Family(
    name="sum_largest",
    level=1,
    signature="def sum_largest(nums: list[int]) -> int",
    params={"k": tuple(range(1, 9))},
    derive=lambda p: {
        "task": "the largest number in `nums`, or 0 if it is empty"
        if p["k"] == 1
        else f"the sum of the {p['k']} largest numbers in `nums` (the sum of all of them if "
        f"it has fewer than {p['k']})"
    },
    describe="Return $task.",
    solution="""
        def sum_largest(nums):
            return sum(sorted(nums, reverse=True)[:$k])
    """,
    inputs=lambda rng, p: [_ints(rng, -50, 50, 9)],
)

COUNT_LETTERS = Family(
    name="count_letters",
    level=1,
    signature="def count_letters(s: str) -> int",
    params={"letters": ("aeiou", "aeiouy", "rstln", "xyz", "bcdfg", "aei", "ou", "hjkmp")},
    describe='Return how many characters of `s` are one of the letters "$letters", ignoring case.',
    solution="""
        def count_letters(s):
            return sum(1 for c in s.lower() if c in "$letters")
    """,
    inputs=lambda rng, p: [_text(rng, MIXED, 30)],
)

REVERSE_WORDS = Family(
    name="reverse_words",
    level=1,
    signature="def reverse_words(s: str) -> str",
    params={"sep": (" ", ",", "-", "_", "/", ";")},
    describe="`s` is made of words separated by the character '$sep'. Return `s` with the "
    "letters of each word reversed, keeping the words and separators in place.",
    solution="""
        def reverse_words(s):
            return "$sep".join(word[::-1] for word in s.split("$sep"))
    """,
    inputs=lambda rng, p: [_words(rng, p["sep"], 6, string.ascii_letters)],
)

ROTATE = Family(
    name="rotate",
    level=1,
    signature="def rotate(nums: list[int]) -> list[int]",
    params={"k": tuple(range(1, 13)), "direction": ("left", "right")},
    derive=lambda p: {
        "steps": _plural(p["k"], "step"),
        "move": "the first element to the end"
        if p["direction"] == "left"
        else "the last element to the front",
        "rotated": "nums[k:] + nums[:k]" if p["direction"] == "left" else "nums[-k:] + nums[:-k]",
    },
    describe="Return `nums` rotated $steps to the $direction: each step moves $move.",
    solution="""
        def rotate(nums):
            if not nums:
                return []
            k = $k % len(nums)
            return $rotated
    """,
    inputs=lambda rng, p: [_ints(rng, 0, 9, 8)],
)

CLAMP = Family(
    name="clamp",
    level=1,
    signature="def clamp(nums: list[int]) -> list[int]",
    params={"low": tuple(range(-30, 2)), "high": tuple(range(5, 51))},
    describe="Return `nums` with every number below $low replaced by $low and every number "
    "above $high replaced by $high.",
    solution="""
        def clamp(nums):
            return [min(max(x, $low), $high) for x in nums]
    """,
    inputs=lambda rng, p: [_ints(rng, -60, 60, 8)],
)

COUNT_MULTIPLES = Family(
    name="count_multiples",
    level=1,
    signature="def count_multiples(nums: list[int]) -> int",
    params={"d": tuple(range(2, 21)), "negate": (False, True)},
    derive=lambda p: {"not_": "not " * p["negate"], "compare": "!=" if p["negate"] else "=="},
    describe="Return how many numbers in `nums` are ${not_}divisible by $d.",
    solution="""
        def count_multiples(nums):
            return sum(1 for x in nums if x % $d $compare 0)
    """,
    inputs=lambda rng, p: [_ints(rng, -100, 100, 10)],
)


def _palindrome_input(rng: random.Random, p: Params) -> list[Any]:
    half = _text(rng, "abAB c,", 6)
    text = half + rng.choice(["", "a", " ", "B"]) + half[::-1]
    if rng.random() < 0.4:  # break the symmetry
        text = _text(rng, "abAB c,", 9)
    elif rng.random() < 0.3:
        text = text.swapcase() if rng.random() < 0.5 else text.replace("a", "A", 1)
    return [text]


_IGNORED = {  # what is removed: (wording, the filter that keeps the rest)
    "nothing": ("", "True"),
    "spaces": (" after removing every space", 'c != " "'),
    "non-letters": (" after removing every character that is not a letter", "c.isalpha()"),
}

IS_PALINDROME = Family(
    name="is_palindrome",
    level=1,
    signature="def is_palindrome(s: str) -> bool",
    params={"ignore": tuple(_IGNORED), "ignore_case": (False, True)},
    derive=lambda p: {
        "removing": _IGNORED[p["ignore"]][0],
        "keep": _IGNORED[p["ignore"]][1],
        "case": ", ignoring case" if p["ignore_case"] else " (case matters)",
        "fold": ".lower()" if p["ignore_case"] else "",
    },
    describe="Return True if `s` reads the same forwards and backwards$removing$case, else False.",
    solution="""
        def is_palindrome(s):
            t = "".join(c for c in s if $keep)$fold
            return t == t[::-1]
    """,
    inputs=_palindrome_input,
)

DIGIT_POWER_SUM = Family(
    name="digit_power_sum",
    level=1,
    signature="def digit_power_sum(n: int) -> int",
    params={"p": (1, 2, 3, 4, 5, 6), "base": (2, 8, 10, 16)},
    describe="Write `n` (n >= 0) in base $base and return the sum of its digits, each raised "
    "to the power $p.",
    solution="""
        def digit_power_sum(n):
            total = 0
            while n:
                n, digit = divmod(n, $base)
                total += digit ** $p
            return total
    """,
    inputs=lambda rng, p: [_number(rng, 20, 10**6)],
)

CAESAR = Family(
    name="caesar",
    level=1,
    signature="def caesar(s: str) -> str",
    params={"k": tuple(range(1, 26))},
    derive=lambda p: {"places": _plural(p["k"], "place")},
    describe="Shift every ASCII letter of `s` $places forward in the alphabet, wrapping from "
    "z to a and keeping its case; leave every other character unchanged. Return the result.",
    solution="""
        def caesar(s):
            out = []
            for c in s:
                if "a" <= c <= "z":
                    out.append(chr((ord(c) - 97 + $k) % 26 + 97))
                elif "A" <= c <= "Z":
                    out.append(chr((ord(c) - 65 + $k) % 26 + 65))
                else:
                    out.append(c)
            return "".join(out)
    """,
    inputs=lambda rng, p: [_text(rng, MIXED + "xyzXYZ09", 25)],
)

LONG_WORDS = Family(
    name="long_words",
    level=1,
    signature="def long_words(s: str) -> list[str]",
    params={"length": (2, 3, 4, 5, 6, 7)},  # words have 1-7 letters
    describe="`s` holds words separated by single spaces. Return the list of its words that "
    "have at least $length letters, in order.",
    solution="""
        def long_words(s):
            return [word for word in s.split(" ") if len(word) >= $length]
    """,
    inputs=lambda rng, p: [_words(rng, " ", 8, string.ascii_lowercase)],
)

CHUNK_TOTALS = Family(
    name="chunk_totals",
    level=1,
    signature="def chunk_totals(nums: list[int]) -> list[int]",
    params={"k": tuple(range(2, 11)), "op": ("sum", "max", "min")},
    describe="Split `nums` into consecutive chunks of $k numbers (the last chunk may be "
    "shorter) and return the $op of each chunk, in order.",
    solution="""
        def chunk_totals(nums):
            return [$op(nums[i:i + $k]) for i in range(0, len(nums), $k)]
    """,
    inputs=lambda rng, p: [_ints(rng, -20, 20, 13)],
)

TO_BASE = Family(
    name="to_base",
    level=1,
    signature="def to_base(n: int) -> str",
    params={"base": tuple(range(2, 17))},
    describe="Return `n` (n >= 0) written in base $base as a string, with digits 0-9 then "
    'lowercase letters a-f; 0 is "0".',
    solution="""
        def to_base(n):
            digits = "0123456789abcdef"
            out = digits[n % $base]
            while n >= $base:
                n //= $base
                out = digits[n % $base] + out
            return out
    """,
    inputs=lambda rng, p: [_number(rng, 40, 10**7)],
)

COUNT_DIGIT = Family(
    name="count_digit",
    level=1,
    signature="def count_digit(n: int) -> int",
    params={"base": (2, 3, 4, 5, 6, 7, 8, 9), "digit": (0, 1, 2, 3)},
    valid=lambda p: p["digit"] < p["base"],
    describe='Write `n` (n >= 0) in base $base (0 is written "0") and return how many of its '
    "digits are $digit.",
    solution="""
        def count_digit(n):
            if n == 0:
                return int($digit == 0)
            count = 0
            while n:
                n, d = divmod(n, $base)
                count += int(d == $digit)
            return count
    """,
    inputs=lambda rng, p: [_number(rng, 30, 10**6)],
)

ALTERNATE_CASE = Family(
    name="alternate_case",
    level=1,
    signature="def alternate_case(s: str) -> str",
    params={"k": tuple(range(2, 10)), "upper": (True, False)},
    derive=lambda p: {
        "kth": _ordinal(p["k"]),
        "twice": _ordinal(2 * p["k"]),
        "case": "upper" if p["upper"] else "lower",
        "other": "lower" if p["upper"] else "upper",
    },
    describe="Return `s` with every $kth character (the $kth, $twice, ...) in $case case and "
    "every other character in $other case.",
    solution="""
        def alternate_case(s):
            return "".join(
                c.$case() if (i + 1) % $k == 0 else c.$other() for i, c in enumerate(s)
            )
    """,
    inputs=lambda rng, p: [_text(rng, string.ascii_letters + " ", 20)],
)

# --- level 2 ---------------------------------------------------------------------

FIB_MOD = Family(
    name="fib_mod",
    level=2,
    signature="def fib_mod(n: int) -> int",
    params={"m": (7, 10, 13, 97, 100, 1000, 1009), "first": (0, 1, 2), "second": (1, 3)},
    describe="The sequence F has F(0) = $first, F(1) = $second and F(n) = F(n - 1) + F(n - 2). "
    "Return F(n) modulo $m, for 0 <= n <= 10000.",
    solution="""
        def fib_mod(n):
            a, b = $first, $second
            for _ in range(n):
                a, b = b, (a + b) % $m
            return a % $m
    """,
    inputs=lambda rng, p: [_number(rng, 10, 10000)],
)

_RLE_EXAMPLES = {
    (True, False): "3a1b",
    (True, True): "3ab",
    (False, False): "a3b1",
    (False, True): "a3b",
}

RUN_LENGTH = Family(
    name="run_length",
    level=2,
    signature="def run_length(s: str) -> str",
    params={"count_first": (True, False), "omit_ones": (False, True)},
    derive=lambda p: {
        "order": "its length followed by the character"
        if p["count_first"]
        else "the character followed by its length",
        "ones": ", but a run of length 1 as the character alone" if p["omit_ones"] else "",
        "example": _RLE_EXAMPLES[p["count_first"], p["omit_ones"]],
        "count": '"" if n == 1 else str(n)' if p["omit_ones"] else "str(n)",
        "piece": "count + s[i]" if p["count_first"] else "s[i] + count",
    },
    describe="Run-length encode `s` (letters only): write each run of equal characters as "
    '$order$ones. For example "aaab" becomes "$example".',
    solution="""
        def run_length(s):
            out = []
            i = 0
            while i < len(s):
                j = i
                while j < len(s) and s[j] == s[i]:
                    j += 1
                n = j - i
                count = $count
                out.append($piece)
                i = j
            return "".join(out)
    """,
    inputs=lambda rng, p: [
        "".join(rng.choice("abc") * rng.randint(1, 4) for _ in range(rng.randint(0, 6)))
    ],
)

KTH_DISTINCT = Family(
    name="kth_distinct",
    level=2,
    signature="def kth_distinct(nums: list[int]) -> int | None",
    params={"k": (1, 2, 3, 4), "largest": (False, True)},
    derive=lambda p: {
        "kth": _ordinal(p["k"]) + " " if p["k"] > 1 else "",
        "which": "largest" if p["largest"] else "smallest",
    },
    describe="Return the $kth$which distinct value in `nums` (equal numbers count once), or "
    "None if it has fewer than $k distinct values.",
    solution="""
        def kth_distinct(nums):
            values = sorted(set(nums), reverse=$largest)
            return values[$k - 1] if len(values) >= $k else None
    """,
    inputs=lambda rng, p: [_ints(rng, -5, 5, 9)],
)

_COLLATZ = {
    "steps": "the number of replacements made",
    "peak": "the largest value reached (n itself included)",
    "odd": "how many odd values were replaced",
}

COLLATZ = Family(
    name="collatz",
    level=2,
    signature="def collatz(n: int) -> int",
    params={"what": tuple(_COLLATZ), "multiplier": (1, 3)},
    derive=lambda p: {
        "odd_step": "n" if p["multiplier"] == 1 else "3 * n",
        "answer": _COLLATZ[p["what"]],
    },
    describe="Starting from n >= 1, repeatedly replace n by n // 2 if it is even and by "
    "$odd_step + 1 if it is odd, until n is 1. Return $answer.",
    solution="""
        def collatz(n):
            steps, peak, odd = 0, n, 0
            while n != 1:
                steps += 1
                odd += n % 2
                n = n // 2 if n % 2 == 0 else $multiplier * n + 1
                peak = max(peak, n)
            return $what
    """,
    inputs=lambda rng, p: [_number(rng, 30, 5000, low=1)],
)

SUM_DIVISIBLE = Family(
    name="sum_divisible",
    level=2,
    signature="def sum_divisible(n: int) -> int",
    params={"a": (2, 3, 4, 5), "b": (5, 6, 7, 9, 11)},
    valid=lambda p: p["b"] % p["a"] != 0,
    describe="Return the sum of all integers from 1 to `n` (inclusive) that are divisible by "
    "$a or by $b (0 when n < 1).",
    solution="""
        def sum_divisible(n):
            return sum(x for x in range(1, n + 1) if x % $a == 0 or x % $b == 0)
    """,
    inputs=lambda rng, p: [rng.choice([rng.randint(-2, 20), rng.randint(0, 3000)])],
)

COUNT_PRIMES = Family(
    name="count_primes",
    level=2,
    signature="def count_primes(n: int) -> int",
    params={"m": (3, 4, 5, 6, 10), "r": (1, 2, 3, 4, 5, 7, 9)},
    valid=lambda p: p["r"] < p["m"] and math.gcd(p["r"], p["m"]) == 1,
    describe="Return how many prime numbers p <= `n` have p % $m == $r.",
    solution="""
        def count_primes(n):
            if n < 2:
                return 0
            sieve = [True] * (n + 1)
            sieve[0] = sieve[1] = False
            for i in range(2, int(n ** 0.5) + 1):
                if sieve[i]:
                    for j in range(i * i, n + 1, i):
                        sieve[j] = False
            return sum(1 for p in range(n + 1) if sieve[p] and p % $m == $r)
    """,
    inputs=lambda rng, p: [_number(rng, 30, 5000)],
)

DEDUPE = Family(
    name="dedupe",
    level=2,
    signature="def dedupe(nums: list[int]) -> list[int]",
    params={"keep": ("first", "last"), "by_abs": (False, True)},
    derive=lambda p: {
        "equal": " in absolute value (like 3 and -3)" if p["by_abs"] else "",
        "scan": "nums" if p["keep"] == "first" else "reversed(nums)",
        "key": "abs(x)" if p["by_abs"] else "x",
        "kept": "out" if p["keep"] == "first" else "out[::-1]",
    },
    describe="Return `nums` without repeats: of the numbers that are equal$equal, keep only "
    "the $keep occurrence, and keep the kept numbers in their order.",
    solution="""
        def dedupe(nums):
            seen = set()
            out = []
            for x in $scan:
                if $key not in seen:
                    seen.add($key)
                    out.append(x)
            return $kept
    """,
    inputs=lambda rng, p: [_ints(rng, -4, 4, 10)],
)

_RUNS = {
    "equal": ("equal to", "=="),
    "increasing": ("greater than", ">"),
    "non-decreasing": ("at least", ">="),
    "decreasing": ("less than", "<"),
}

LONGEST_RUN = Family(
    name="longest_run",
    level=2,
    signature="def longest_run(nums: list[int]) -> int",
    params={"kind": tuple(_RUNS)},
    derive=lambda p: {"relation": _RUNS[p["kind"]][0], "compare": _RUNS[p["kind"]][1]},
    describe="Return the length of the longest stretch of consecutive elements of `nums` in "
    "which each element is $relation the one before it (0 for an empty list).",
    solution="""
        def longest_run(nums):
            best = run = 0
            for i, x in enumerate(nums):
                run = run + 1 if i > 0 and x $compare nums[i - 1] else 1
                best = max(best, run)
            return best
    """,
    inputs=lambda rng, p: [_ints(rng, 0, 4, 12)],
)

PAIR_COUNT = Family(
    name="pair_count",
    level=2,
    signature="def pair_count(nums: list[int]) -> int",
    params={"target": tuple(range(0, 21, 2)), "op": ("sum", "difference")},
    valid=lambda p: p["op"] == "sum" or p["target"] <= 12,  # no two inputs differ by more than 12
    derive=lambda p: {
        "pair": "nums[i] + nums[j]" if p["op"] == "sum" else "abs(nums[i] - nums[j])"
    },
    describe="Return how many pairs of positions i < j have $pair == $target.",
    solution="""
        def pair_count(nums):
            return sum(
                1
                for i in range(len(nums))
                for j in range(i + 1, len(nums))
                if $pair == $target
            )
    """,
    inputs=lambda rng, p: [_ints(rng, 0, 12, 10)],
)


def _brackets_input(rng: random.Random, p: Params) -> list[Any]:
    pairs = [p["pairs"][i : i + 2] for i in range(0, len(p["pairs"]), 2)]
    if rng.random() < 0.5:  # a balanced string, maybe damaged below
        text = ""
        for _ in range(rng.randint(0, 5)):
            opening, closing = rng.choice(pairs)
            text = rng.choice([opening + text + closing, text + opening + closing])
    else:
        text = "".join(rng.choice(p["pairs"]) for _ in range(rng.randint(1, 8)))
    if rng.random() < 0.3:
        position = rng.randint(0, len(text))
        text = text[:position] + rng.choice("xy 1") + text[position:]
    return [text]


BALANCED = Family(
    name="balanced",
    level=2,
    signature="def balanced(s: str) -> bool",
    params={"pairs": ("()", "()[]", "()[]{}", "<>()", "[]{}", "{}<>")},
    describe="Return True if the brackets in `s` are balanced and properly nested, else False. "
    'The bracket pairs are the consecutive pairs in "$pairs"; every other character is '
    "ignored.",
    solution="""
        def balanced(s):
            pairs = "$pairs"
            opening = {pairs[i + 1]: pairs[i] for i in range(0, len(pairs), 2)}
            stack = []
            for c in s:
                if c in opening.values():
                    stack.append(c)
                elif c in opening:
                    if not stack or stack.pop() != opening[c]:
                        return False
            return not stack
    """,
    inputs=_brackets_input,
)


def _sorted_lists(rng: random.Random, p: Params) -> list[Any]:
    descending = p["order"] == "descending"
    return [
        sorted(_ints(rng, 0, 15, 6), reverse=descending),
        sorted(_ints(rng, 0, 15, 6), reverse=descending),
    ]


MERGE_SORTED = Family(
    name="merge_sorted",
    level=2,
    signature="def merge_sorted(a: list[int], b: list[int]) -> list[int]",
    params={"order": ("ascending", "descending"), "unique": (False, True)},
    derive=lambda p: {
        "holding": "holding every value that appears in either, once."
        if p["unique"]
        else "holding all their elements (repeats kept).",
        "descending": p["order"] == "descending",
        "result": "[x for i, x in enumerate(merged) if i == 0 or x != merged[i - 1]]"
        if p["unique"]
        else "merged",
    },
    describe="`a` and `b` are sorted in $order order. Return one list in $order order $holding",
    solution="""
        def merge_sorted(a, b):
            merged = sorted(a + b, reverse=$descending)
            return $result
    """,
    inputs=_sorted_lists,
)

WINDOWS = Family(
    name="windows",
    level=2,
    signature="def windows(nums: list[int]) -> list[int]",
    params={"k": (2, 3, 4, 5), "op": ("sum", "max", "min")},
    describe="Return the $op of every window of $k consecutive elements of `nums`, from left "
    "to right (an empty list if it has fewer than $k elements).",
    solution="""
        def windows(nums):
            return [$op(nums[i:i + $k]) for i in range(len(nums) - $k + 1)]
    """,
    inputs=lambda rng, p: [_ints(rng, -9, 9, 10)],
)

COUNT_PATTERN = Family(
    name="count_pattern",
    level=2,
    signature="def count_pattern(s: str) -> int",
    params={
        "pattern": ("aa", "ab", "aba", "bab", "abb", "bb", "ba", "aab"),
        "overlap": (True, False),
    },
    derive=lambda p: {
        "counting": "counting overlapping occurrences."
        if p["overlap"]
        else "counting non-overlapping occurrences found from left to right.",
        "count": f'sum(1 for i in range(len(s)) if s.startswith("{p["pattern"]}", i))'
        if p["overlap"]
        else f's.count("{p["pattern"]}")',
    },
    describe='Return how many times "$pattern" occurs in `s`, $counting',
    solution="""
        def count_pattern(s):
            return $count
    """,
    inputs=lambda rng, p: [_text(rng, "ab", 16)],
)

PASCAL_ROW = Family(
    name="pascal_row",
    level=2,
    signature="def pascal_row(n: int) -> list[int]",
    params={"m": (2, 3, 5, 7, 10, 100, 1000)},
    describe="Return row `n` of Pascal's triangle (row 0 is [1], row 2 is [1, 2, 1]) with "
    "every entry taken modulo $m, for 0 <= n <= 300.",
    solution="""
        def pascal_row(n):
            row = [1 % $m]
            for _ in range(n):
                row = [(a + b) % $m for a, b in zip([0] + row, row + [0])]
            return row
    """,
    inputs=lambda rng, p: [_number(rng, 8, 300)],
)

INTERLEAVE = Family(
    name="interleave",
    level=2,
    signature="def interleave(a: list[int], b: list[int]) -> list[int]",
    params={"take": (1, 2, 3), "first": ("a", "b")},
    derive=lambda p: {
        "elements": _plural(p["take"], "element"),
        "order": "a, b" if p["first"] == "a" else "b, a",
    },
    describe="Return a list that takes $elements at a time from `a` and `b` in turn, starting "
    "with `$first`; once one list runs out, append the rest of the other.",
    solution="""
        def interleave(a, b):
            first, second = $order
            out = []
            i = 0
            while i < len(first) or i < len(second):
                out += first[i:i + $take] + second[i:i + $take]
                i += $take
            return out
    """,
    inputs=lambda rng, p: [_ints(rng, 0, 9, 7), _ints(rng, 10, 19, 7)],
)

# --- level 3 ---------------------------------------------------------------------

MIN_COINS = Family(
    name="min_coins",
    level=3,
    signature="def min_coins(amount: int) -> int",
    params={"coins": ((1, 3, 4), (1, 5, 6, 9), (2, 5), (3, 7), (1, 7, 10), (4, 6, 9), (5, 8, 13))},
    describe="With unlimited coins of the values $coins, return the fewest coins that add up "
    "to `amount` (0 <= amount <= 500), or -1 if no combination does.",
    solution="""
        def min_coins(amount):
            best = [0] + [-1] * amount
            for total in range(1, amount + 1):
                options = [best[total - c] for c in $coins if c <= total and best[total - c] >= 0]
                best[total] = min(options) + 1 if options else -1
            return best[amount]
    """,
    inputs=lambda rng, p: [_number(rng, 30, 500)],
)

COUNT_WAYS = Family(
    name="count_ways",
    level=3,
    signature="def count_ways(amount: int) -> int",
    params={
        "coins": ((1, 2, 5), (2, 3, 7), (1, 5, 10, 25), (3, 4, 10), (2, 5, 11)),
        "m": (1000, 10007),
    },
    describe="With unlimited coins of the values $coins, return the number of different "
    "multisets of coins (order does not matter) that add up to `amount` "
    "(0 <= amount <= 500), modulo $m.",
    solution="""
        def count_ways(amount):
            ways = [1] + [0] * amount
            for c in $coins:
                for total in range(c, amount + 1):
                    ways[total] = (ways[total] + ways[total - c]) % $m
            return ways[amount] % $m
    """,
    inputs=lambda rng, p: [_number(rng, 20, 500)],
)

_SUBSEQUENCE = {
    ("increasing", True): ">",
    ("increasing", False): ">=",
    ("decreasing", True): "<",
    ("decreasing", False): "<=",
}

LONGEST_SUBSEQUENCE = Family(
    name="longest_subsequence",
    level=3,
    signature="def longest_subsequence(nums: list[int]) -> int",
    params={"direction": ("increasing", "decreasing"), "strict": (True, False)},
    derive=lambda p: {
        "how": "strictly " if p["strict"] else "non-strictly (equal neighbours allowed) ",
        "compare": _SUBSEQUENCE[p["direction"], p["strict"]],
    },
    describe="Return the length of the longest subsequence of `nums` (elements in their "
    "original order, not necessarily adjacent) that is $how$direction; 0 for an empty list.",
    solution="""
        def longest_subsequence(nums):
            best = [1] * len(nums)
            for i in range(len(nums)):
                for j in range(i):
                    if nums[i] $compare nums[j]:
                        best[i] = max(best[i], best[j] + 1)
            return max(best, default=0)
    """,
    inputs=lambda rng, p: [_ints(rng, 0, 9, 14)],
)

SPIRAL = Family(
    name="spiral",
    level=3,
    signature="def spiral(grid: list[list[int]]) -> list[int]",
    params={"clockwise": (True, False)},
    derive=lambda p: {
        "path": "right along the top row, then down, left and up (clockwise)"
        if p["clockwise"]
        else "down the left column, then right, up and left (counterclockwise)",
        # Counterclockwise from the top-left corner is clockwise on the transposed grid.
        "start": "grid" if p["clockwise"] else "zip(*grid)",
    },
    describe="`grid` is a rectangular list of rows. Return its elements in spiral order, "
    "starting at the top-left corner and going $path, moving inwards; [] for an empty grid.",
    solution="""
        def spiral(grid):
            out = []
            grid = [list(row) for row in $start]
            while grid:
                out += grid.pop(0)
                grid = [list(row) for row in zip(*grid)][::-1]
            return out
    """,
    inputs=lambda rng, p: _grid(rng, 9),
)

ISLANDS = Family(
    name="islands",
    level=3,
    signature="def islands(grid: list[list[int]]) -> int",
    params={"diagonal": (False, True)},
    derive=lambda p: {
        "connected": "horizontally, vertically or diagonally."
        if p["diagonal"]
        else "horizontally or vertically (not diagonally).",
        "steps": [
            (dr, dc)
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
            if (dr or dc) and (p["diagonal"] or not (dr and dc))
        ],
    },
    describe="`grid` is a rectangular list of rows of 0s (water) and 1s (land). Return the "
    "number of islands: groups of land cells connected $connected",
    solution="""
        def islands(grid):
            seen = set()
            count = 0
            for r in range(len(grid)):
                for c in range(len(grid[r])):
                    if grid[r][c] != 1 or (r, c) in seen:
                        continue
                    count += 1
                    seen.add((r, c))
                    stack = [(r, c)]
                    while stack:
                        i, j = stack.pop()
                        for di, dj in $steps:
                            a, b = i + di, j + dj
                            inside = 0 <= a < len(grid) and 0 <= b < len(grid[a])
                            if inside and grid[a][b] == 1 and (a, b) not in seen:
                                seen.add((a, b))
                                stack.append((a, b))
            return count
    """,
    inputs=lambda rng, p: _grid(rng, 1),
)

FAMILIES: tuple[Family, ...] = (
    SUM_LARGEST,
    COUNT_LETTERS,
    REVERSE_WORDS,
    ROTATE,
    CLAMP,
    COUNT_MULTIPLES,
    IS_PALINDROME,
    DIGIT_POWER_SUM,
    CAESAR,
    LONG_WORDS,
    CHUNK_TOTALS,
    TO_BASE,
    COUNT_DIGIT,
    ALTERNATE_CASE,
    FIB_MOD,
    RUN_LENGTH,
    KTH_DISTINCT,
    COLLATZ,
    SUM_DIVISIBLE,
    COUNT_PRIMES,
    DEDUPE,
    LONGEST_RUN,
    PAIR_COUNT,
    BALANCED,
    MERGE_SORTED,
    WINDOWS,
    COUNT_PATTERN,
    PASCAL_ROW,
    INTERLEAVE,
    MIN_COINS,
    COUNT_WAYS,
    LONGEST_SUBSEQUENCE,
    SPIRAL,
    ISLANDS,
)
FAMILIES_BY_NAME = {family.name: family for family in FAMILIES}
