"""Token-balanced partitions: every index once, ranks even by tokens, as many micro-batches on each."""

from __future__ import annotations

import doctest
import math
import random

import pytest

from looprl.train import balance
from looprl.train.balance import balanced_micro_batches, karmarkar_karp


def long_tailed(n: int, seed: int = 0) -> list[int]:
    """Lognormal lengths, median 100, clipped to 16..1024: a few long episodes among many short ones."""
    rng = random.Random(seed)
    return [min(1024, max(16, round(rng.lognormvariate(math.log(100), 1.0)))) for _ in range(n)]


def test_doctests_pass():
    assert doctest.testmod(balance).failed == 0


@pytest.mark.parametrize("k", [1, 2, 3, 8, 40])
@pytest.mark.parametrize("n", [0, 1, 7, 33])
def test_karmarkar_karp_covers_every_index_once(n, k):
    weights = long_tailed(n)
    parts = karmarkar_karp(weights, k)
    assert len(parts) == k
    assert sorted(i for p in parts for i in p) == list(range(n))
    sums = [sum(weights[i] for i in p) for p in parts]
    assert sums == sorted(sums, reverse=True)  # heaviest first


def test_karmarkar_karp_equal_size_gives_equal_counts():
    weights = long_tailed(24)
    parts = karmarkar_karp(weights, 4, equal_size=True)
    assert [len(p) for p in parts] == [6, 6, 6, 6]
    assert sorted(i for p in parts for i in p) == list(range(24))


def test_karmarkar_karp_beats_greedy_on_the_textbook_case():
    # Greedy (heaviest to the lightest part) gives {8, 5, 4} and {7, 6}: 17 against 13.
    parts = karmarkar_karp([8, 7, 6, 5, 4], 2)
    assert sorted(sum([8, 7, 6, 5, 4][i] for i in p) for p in parts) == [14, 16]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ranks_are_balanced_by_tokens_far_better_than_round_robin(world):
    lengths = long_tailed(64)  # a minibatch (the configs take 24 to 96 trajectories)
    plans = balanced_micro_batches(lengths, world, max_tokens=4096)
    tokens = [sum(lengths[i] for mb in plan for i in mb) for plan in plans]
    round_robin = [sum(lengths[r::world]) for r in range(world)]
    ratio, rr_ratio = max(tokens) / min(tokens), max(round_robin) / min(round_robin)
    assert ratio < 1.02, tokens
    assert rr_ratio > 1.1 and rr_ratio - 1 > 10 * (ratio - 1), (tokens, round_robin)


@pytest.mark.parametrize("world,budget", [(1, 4096), (2, 1000), (3, 512), (8, 4096), (16, 300)])
def test_every_index_once_every_rank_as_many_micro_batches_each_under_the_budget(world, budget):
    lengths = long_tailed(100, seed=world)
    plans = balanced_micro_batches(lengths, world, budget)
    assert len(plans) == world
    assert len({len(plan) for plan in plans}) == 1  # the same count on every rank
    assert sorted(i for plan in plans for mb in plan for i in mb) == list(range(100))
    for plan in plans:
        for mb in plan:
            assert mb == sorted(mb)
            assert len(mb) <= 1 or sum(lengths[i] for i in mb) <= budget
    # No more micro-batches than the busiest rank needs at least (an item over the budget
    # alone, the others by tokens), but one.
    fewest = max(sum(lengths[i] > budget for mb in plan for i in mb)
                 + math.ceil(sum(lengths[i] for mb in plan for i in mb if lengths[i] <= budget) / budget)
                 for plan in plans)
    assert fewest <= len(plans[0]) <= fewest + 1


def test_a_rank_short_of_work_gets_empty_micro_batches():
    # One rank takes the 900-token item, over the budget, alone; the other needs two micro-batches.
    plans = balanced_micro_batches([900, 300, 300, 200, 100], world_size=2, max_tokens=500)
    assert plans == [[[0], []], [[2, 3], [1, 4]]]  # 500 and 400 tokens
    assert balanced_micro_batches([5], world_size=3, max_tokens=10) == [[[0]], [[]], [[]]]
    assert balanced_micro_batches([], world_size=2, max_tokens=10) == [[], []]


def test_deterministic():
    lengths = long_tailed(200)
    assert balanced_micro_batches(lengths, 4, 2048) == balanced_micro_batches(list(lengths), 4, 2048)


@pytest.mark.parametrize("call,message", [
    (lambda: karmarkar_karp([1, 2], 0), "Expected k >= 1 parts, actually 0"),
    (lambda: karmarkar_karp([1, -2], 2), "Expected non-negative weights, actually -2"),
    (lambda: karmarkar_karp([1, 2, 3], 2, equal_size=True), "Expected a multiple of k=2 items for equal_size, actually 3"),
    (lambda: balanced_micro_batches([1], 0, 10), "Expected world_size >= 1 and max_tokens >= 1, actually 0 and 10"),
    (lambda: balanced_micro_batches([1], 2, 0), "Expected world_size >= 1 and max_tokens >= 1, actually 2 and 0"),
])
def test_bad_input_says_what_was_expected(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == message
