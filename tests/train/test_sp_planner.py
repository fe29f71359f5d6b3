"""FlexSP planner: valid plans, the heuristic against the MILP and brute force, the cost-model fit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from looprl.train.sp_planner import (
    PLANNERS,
    SPCostModel,
    calibrate,
    fit_compute,
    heuristic_plan,
    lower_bound,
    plan,
    static_plan,
)

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
