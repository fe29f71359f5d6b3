"""Token-balanced partitions: of a minibatch across ranks, and of each rank's share into micro-batches.

Under data parallelism every rank runs its micro-batches in lockstep (FSDP gathers the
weights for every forward and backward), so a step lasts as long as its busiest rank,
and every rank must run as many micro-batches as the others. Packed rows have no
padding, so a micro-batch costs about its number of tokens: the partitions balance
sums of lengths.

The partitioning is the largest differencing method of Karmarkar and Karp ("The
differencing method of set partitioning", 1982), k-way as in verl's
`verl/utils/seqlen_balancing.py`.
"""

from __future__ import annotations

import heapq
import math
from typing import Sequence


def karmarkar_karp(weights: Sequence[float], k: int, equal_size: bool = False) -> list[list[int]]:
    """`k` parts of the indices of `weights` with sums as equal as the largest differencing method makes them.

    Every item starts as a partial partition (the item in one part, the others empty).
    The two partial partitions with the largest spread (heaviest part minus lightest)
    are merged, the heaviest part of one with the lightest of the other, until one is
    left. With `equal_size`, items start k at a time (the k lightest left, one to a
    part), so every part gets `len(weights) / k` of them. Deterministic: ties go to
    the lower index.

    Args:
        weights: one non-negative weight an item.
        k: parts, at least 1 (more than items: some parts are empty).
        equal_size: parts of equal counts; `len(weights)` must be a multiple of `k`.

    Returns:
        `k` lists of indices, each sorted, heaviest part first.

    A heuristic: here 16 against 14, where {8, 7} and {6, 5, 4} make 15 each.

    >>> karmarkar_karp([8, 7, 6, 5, 4], k=2)
    [[1, 3, 4], [0, 2]]
    >>> karmarkar_karp([1, 2, 3, 4], k=2, equal_size=True)
    [[0, 3], [1, 2]]
    """
    if k < 1:
        raise ValueError(f"Expected k >= 1 parts, actually {k}")
    if any(w < 0 for w in weights):
        raise ValueError(f"Expected non-negative weights, actually {min(weights)}")
    if equal_size and len(weights) % k:
        raise ValueError(f"Expected a multiple of k={k} items for equal_size, actually {len(weights)}")
    order = sorted(range(len(weights)), key=lambda i: (weights[i], i))
    step = k if equal_size else 1
    heap: list[tuple] = []
    for tie, offset in enumerate(range(0, len(order), step)):
        parts = [([i], weights[i]) for i in order[offset:offset + step]] + [([], 0)] * (k - step)
        heapq.heappush(heap, _entry(parts, tie))
    tie = len(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap)[-1], heapq.heappop(heap)[-1]
        # a is sorted heaviest first, b too: pair a's heaviest with b's lightest.
        merged = [(x + y, sx + sy) for (x, sx), (y, sy) in zip(a, reversed(b))]
        heapq.heappush(heap, _entry(merged, tie))
        tie += 1
    parts = heap[0][-1] if heap else [([], 0)] * k
    return [sorted(items) for items, _ in parts]


def _entry(parts: list[tuple[list[int], float]], tie: int) -> tuple:
    """A heap entry: the largest spread pops first, then the earliest made."""
    parts = sorted(parts, key=lambda p: (-p[1], min(p[0], default=math.inf)))
    return (-(parts[0][1] - parts[-1][1]), tie, parts)


def balanced_micro_batches(lengths: Sequence[int], world_size: int, max_tokens: int) -> list[list[list[int]]]:
    """Each rank's micro-batches (indices into `lengths`), as many on every rank, balanced by tokens.

    The items are split across ranks by `karmarkar_karp` on their lengths, then each
    rank's share into M micro-batches, the same M on every rank: the fewest for which
    every micro-batch holds at most `max_tokens` packed tokens (an item longer than
    that, alone). A rank with fewer items than M gets empty micro-batches, where the
    caller runs a zero-weight pass. Within a rank the micro-batches are balanced too
    and come heaviest first, so the j-th micro-batches of all ranks are alike.

    Args:
        lengths: tokens of each item (a packed micro-batch costs their sum).
        world_size: ranks, at least 1.
        max_tokens: packed tokens a micro-batch holds at most, at least 1.

    Returns:
        `world_size` lists of M micro-batches, each a sorted list of indices.

    >>> balanced_micro_batches([100, 30, 30, 20, 10, 10], world_size=2, max_tokens=60)
    [[[0], []], [[1, 4, 5], [2, 3]]]
    """
    if world_size < 1 or max_tokens < 1:
        raise ValueError(f"Expected world_size >= 1 and max_tokens >= 1, actually {world_size} and {max_tokens}")
    shares = karmarkar_karp(lengths, world_size)
    if not lengths:
        return [[] for _ in shares]
    # Fewer cannot fit, whatever the split: an item over the budget alone, the others by tokens.
    # As many as the largest share's items always fit (each item alone).
    largest = max(len(share) for share in shares)
    fewest = max(_fewest([lengths[i] for i in share], max_tokens) for share in shares)
    for count in range(min(fewest, largest), largest + 1):
        plans = [_split(share, lengths, count) for share in shares]
        if all(_fits(group, lengths, max_tokens) for plan in plans for group in plan):
            break
    return plans


def _fewest(lengths: Sequence[int], max_tokens: int) -> int:
    """A lower bound on the micro-batches `lengths` need under `max_tokens`."""
    over = [n for n in lengths if n > max_tokens]
    return len(over) + math.ceil((sum(lengths) - sum(over)) / max_tokens)


def _split(share: list[int], lengths: Sequence[int], count: int) -> list[list[int]]:
    """`share` in `count` token-balanced micro-batches, heaviest first."""
    parts = karmarkar_karp([lengths[i] for i in share], count)
    return [[share[j] for j in part] for part in parts]


def _fits(group: list[int], lengths: Sequence[int], max_tokens: int) -> bool:
    return len(group) <= 1 or sum(lengths[i] for i in group) <= max_tokens
