"""FlexSP planner: valid plans, the heuristic against the MILP and brute force, the cost-model fit."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from looprl.config import from_dict
from looprl.train.batch import micro_batches
from looprl.train.parallel import Parallel, SequencePlanner
from looprl.train.sp_planner import (
    PLANNERS,
    SPCostModel,
    calibrate,
    estimated_cost_model,
    fit_compute,
    heuristic_plan,
    lower_bound,
    plan,
    static_plan,
)
from looprl.train.update import adaptive_micro_batches

GB = 1e9
# A 7B-like model on 80 GB devices: 40k tokens fit at degree 1, 80k need 2, 160k need 4.
MODEL = SPCostModel(a1=2e-9, a2=1e-4, b=0.01, hidden=4096, layers=32,
                    bandwidth={2: 150 * GB, 4: 150 * GB, 8: 150 * GB, 16: 25 * GB},
                    model_state_bytes=40 * GB, activation_bytes_per_token=1e6)
CAP = 80 * GB


def random_lengths(rng: np.random.Generator, n: int) -> list[int]:
    return [int(x) for x in np.clip(rng.lognormal(np.log(8000), 1.2, size=n), 128, 150_000)]


def check_valid(p, lengths, world_size, model=MODEL, cap=CAP):
    assigned = sorted(i for g in p.groups for i in g.sequences)
    assert assigned == list(range(len(lengths)))
    assert sum(p.degrees) == world_size
    for g in p.groups:
        for i in g.sequences:
            assert model.memory(lengths[i], g.degree) <= cap
    for g, t in zip(p.groups, p.group_times):
        assert t == pytest.approx(sum(model.time(lengths[i], g.degree) for i in g.sequences))


@pytest.mark.parametrize("world_size", [1, 4, 8, 16])
def test_heuristic_and_static_plans_are_valid(world_size):
    rng = np.random.default_rng(world_size)
    lengths = random_lengths(rng, 3 * world_size)
    lengths[0] = 150_000  # needs degree 4
    if world_size < 4:
        with pytest.raises(ValueError, match="fits no degree"):
            plan(lengths, world_size, CAP, MODEL)
        return
    best = heuristic_plan(lengths, world_size, CAP, MODEL)
    check_valid(best, lengths, world_size)
    for degree in (4, 8, 16):
        if degree <= world_size:
            static = static_plan(lengths, world_size, degree, memory_cap=CAP, model=MODEL)
            check_valid(static, lengths, world_size)
            assert set(static.degrees) == {degree}
            assert best.time <= static.time + 1e-9


def test_impossible_inputs_raise():
    with pytest.raises(ValueError, match="fits no degree"):
        plan([10_000_000], 8, CAP, MODEL)
    with pytest.raises(ValueError, match="not a sum of the degrees"):
        plan([100], 6, CAP, MODEL, degrees=(4, 8))
    with pytest.raises(ValueError, match="Unknown planner 'greedy'; known: heuristic, milp"):
        plan([100], 2, CAP, MODEL, method="greedy")
    with pytest.raises(ValueError, match="divides world_size 8"):
        static_plan([100], 8, 3, memory_cap=CAP, model=MODEL)
    with pytest.raises(ValueError, match="fits no degree"):
        static_plan([150_000], 8, 2, memory_cap=CAP, model=MODEL)
    with pytest.raises(ValueError, match="No bandwidth for degree 32"):
        MODEL.comm_time(100, 32)
    with pytest.raises(ValueError, match="positive lengths"):
        plan([], 2, CAP, MODEL)


def brute_force(lengths, world_size, degrees=(1, 2, 4)) -> float:
    """The best makespan over every layout and every assignment (tiny instances only)."""
    layouts = {tuple(sorted(c)) for r in range(1, world_size + 1)
               for c in itertools.combinations_with_replacement(degrees, r) if sum(c) == world_size}
    best = np.inf
    for layout in layouts:
        for assign in itertools.product(range(len(layout)), repeat=len(lengths)):
            if any(MODEL.memory(s, layout[g]) > CAP for s, g in zip(lengths, assign)):
                continue
            loads = [0.0] * len(layout)
            for s, g in zip(lengths, assign):
                loads[g] += MODEL.time(s, layout[g])
            best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(3))
def test_milp_matches_brute_force(seed):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(100 + seed)
    lengths = random_lengths(rng, 5)
    exact = plan(lengths, 4, CAP, MODEL, degrees=(1, 2, 4), method="milp")
    check_valid(exact, lengths, 4)
    assert exact.optimal
    assert exact.time == pytest.approx(brute_force(lengths, 4), rel=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_heuristic_within_ten_percent_of_milp(seed):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(seed)
    world_size = (4, 8)[seed % 2]
    lengths = random_lengths(rng, 7)
    exact = plan(lengths, world_size, CAP, MODEL, method="milp")
    heuristic = plan(lengths, world_size, CAP, MODEL)
    assert exact.optimal
    assert heuristic.time >= exact.time * (1 - 1e-6)
    assert heuristic.time <= exact.time * 1.10
    assert lower_bound(lengths, world_size, CAP, MODEL) <= exact.time * (1 + 1e-9)


def test_fit_recovers_known_coefficients():
    lengths = [128, 256, 512, 1024, 2048]
    rng = np.random.default_rng(0)
    seconds = [(3e-8 * s * s + 2e-5 * s + 0.004) * (1 + 0.001 * rng.standard_normal()) for s in lengths]
    a1, a2, b = fit_compute(lengths, seconds)
    assert a1 == pytest.approx(3e-8, rel=0.02)
    assert a2 == pytest.approx(2e-5, rel=0.05)
    assert b == pytest.approx(0.004, rel=0.2)
    with pytest.raises(ValueError, match=">= 3 distinct lengths"):
        fit_compute([1, 1, 2], [0.1, 0.1, 0.2])


def test_calibrate_takes_the_fastest_repeat():
    calls = iter([5.0, 1e-6 * 100 + 0.01, 5.0, 1e-6 * 200 + 0.01, 5.0, 1e-6 * 400 + 0.01])
    model = calibrate(lambda s: next(calls), [100, 200, 400], hidden=8, layers=2, bandwidth={2: 1e9}, repeats=2)
    assert model.a2 == pytest.approx(1e-6, rel=1e-6) and model.b == pytest.approx(0.01, rel=1e-6)


def test_json_round_trip(tmp_path):
    path = tmp_path / "sp_cost.json"
    MODEL.save(path)
    assert SPCostModel.load(path) == MODEL
    with pytest.raises(ValueError, match="Unknown SPCostModel keys \\['alpha'\\]"):
        SPCostModel.from_json('{"alpha": 1}')


def test_planners_registry():
    assert sorted(PLANNERS) == ["heuristic", "milp"]


class _Ranks:
    """A stand-in for `Parallel` on `world` ranks seen from `rank`, without a process group."""

    def __init__(self, rank: int, world: int, degrees=(1, 2, 4)):
        cost = dataclasses.replace(estimated_cost_model(64, 2, 1e6, degrees), activation_bytes_per_token=1.0)
        groups = {(d, s): f"group{d}@{s}" for d in degrees if d > 1 for s in range(0, world - d + 1, d)}
        self.rank, self.world, self.is_main = rank, world, True  # each plans as rank 0 would: the plan is deterministic
        self.sequence_planner = SequencePlanner(degrees=tuple(degrees), groups=groups, cost=cost)

    def broadcast_object(self, obj):
        return obj


def _adaptive(lengths, rank, world, tokens=40):
    return adaptive_micro_batches(lengths, lambda items, budget=tokens: micro_batches(list(items), budget),
                                  lambda n: n, _Ranks(rank, world), tokens)


def test_adaptive_blocks_cover_every_row_once_within_the_tokens_a_rank_holds():
    lengths = [150, 30, 20, 90, 10, 35, 12, 70]
    seen, counts = {}, set()
    for rank in range(4):
        mine, group = _adaptive(lengths, rank, 4)
        d = 1 if group is None else int(group[len("group"):group.index("@")])
        start = 0 if group is None else int(group[group.index("@") + 1:])
        assert group is None or start % d == 0 and start <= rank < start + d  # aligned blocks, this rank's own
        counts.add(len(mine))  # every rank runs as many passes (None pads)
        for micro in (m for m in mine if m is not None):
            assert sum(lengths[i] for i in micro) <= 40 * d or len(micro) == 1
            assert all(-(-lengths[i] // d) <= 40 for i in micro)  # a rank holds at most 40 tokens of a row
            for i in micro:
                seen.setdefault(i, set()).add((d, start))
    assert len(counts) == 1
    assert sorted(seen) == list(range(len(lengths)))
    assert all(len(blocks) == 1 for blocks in seen.values())  # each row in one block (all its ranks)
    assert next(iter(seen[0]))[0] == 4  # 150 tokens need 4 ranks of 40


def test_a_row_no_block_can_hold_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"micro_batch_tokens=40 a rank at sequence-parallel degrees \(1, 2, 4\) over "
                                         r"4 processes, actually a row has 170 tokens"):
        _adaptive([10, 170], 0, 4)


def test_adaptive_sequence_parallelism_needs_processes_and_no_static_degree():
    with pytest.raises(ValueError, match="train.sequence_parallel_adaptive needs several processes"):
        Parallel().plan_sequences((1, 2), estimated_cost_model(64, 2, 1e6, (1, 2)))
    with pytest.raises(ValueError, match="Expect train.sequence_parallel=1 with train.sequence_parallel_adaptive"):
        from_dict({"train": {"sequence_parallel": 2, "sequence_parallel_adaptive": True}})
