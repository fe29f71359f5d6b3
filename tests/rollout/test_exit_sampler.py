"""The ExIt buffer: learnability, priorities, eviction, children, and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from looprl.rollout.exit_sampler import ExItSampler, StartingPoint, learnability
from looprl.train.checkpoint import CheckpointManager


def filled(scores, **kwargs) -> ExItSampler:
    sampler = ExItSampler(0, **kwargs)
    for i, score in enumerate(scores):
        sampler.add(StartingPoint(seed=100 + i, history=(f"a{i}",), attempts=1, score=score))
    return sampler


def test_learnability_is_the_variance_of_the_returns():
    assert learnability([1.0, 0.0, 1.0, 0.0]) == 0.25
    assert learnability([1.0, 1.0, 1.0, 0.0]) == pytest.approx(0.1875)  # p (1 - p) = 3/4 * 1/4
    assert learnability([0.0] * 6) == 0.0
    assert learnability([0.5, 1.5]) == 0.25


def test_probabilities_are_score_plus_floor_normalised():
    sampler = filled([0.25, 0.0, 0.09], floor=0.01)
    np.testing.assert_allclose(sampler.probabilities(), [0.26 / 0.37, 0.01 / 0.37, 0.10 / 0.37])


def test_eviction_drops_the_lowest_score_then_the_oldest():
    sampler = filled([0.1, 0.2, 0.1], capacity=2)
    assert [(e.uid, e.score) for e in sampler.entries] == [(1, 0.2), (2, 0.1)]  # uid 0 (oldest 0.1) went
    sampler.add(StartingPoint(seed=7, score=0.05))  # lower than all: evicted at once
    assert [e.uid for e in sampler.entries] == [1, 2] and sampler.next_uid == 4
    sampler.add(StartingPoint(seed=8, score=0.15))
    assert [e.uid for e in sampler.entries] == [1, 4]


def test_update_rescores_the_start_and_adds_a_learnable_child():
    sampler = filled([0.0], children=1, max_attempts=2)
    start = sampler.entries[0]
    score = sampler.update(start, [1.0, 0.0, 0.0, 0.0], [["x", "y"], None, None, None])
    assert score == pytest.approx(0.1875)
    assert sampler.entries[0].score == pytest.approx(0.1875)  # re-scored in place
    child = sampler.entries[1]
    assert (child.seed, child.history, child.attempts, child.score) == (100, ("x", "y"), 2, pytest.approx(0.1875))


def test_no_child_from_zero_variance_too_deep_or_unfinished_groups():
    sampler = filled([0.2], max_attempts=1)
    start = sampler.entries[0]  # already 1 attempt: a child would hold 2 > max_attempts
    sampler.update(start, [1.0, 0.0], [["x"], ["y"]])
    sampler.update(StartingPoint(seed=5), [1.0, 1.0], [["x"], ["y"]])  # no variance
    sampler.update(StartingPoint(seed=6), [1.0, 0.0], [None, None])  # no attempt ended
    assert len(sampler.entries) == 1
    sampler.update(StartingPoint(seed=9), [1.0, 0.0], [["x"], None])  # a fresh task's child: kept
    assert sampler.entries[-1].history == ("x",) and sampler.entries[-1].attempts == 1


def test_sample_fresh_buffered_without_replacement_and_modes():
    assert all(not s.history for s in filled([0.1, 0.2], p_fresh=1.0).sample(5))
    starts = filled([0.1, 0.2], p_fresh=0.0, p_diverge=1.0).sample(3)
    buffered = [s for s in starts if s.history]
    assert len(buffered) == 2 and {s.uid for s in buffered} == {0, 1}  # each entry once, then fresh
    assert all(s.modes == ("diverge",) for s in buffered)
    assert buffered[0].reset_options == {"history": list(buffered[0].history), "modes": ["diverge"]}


def test_state_dict_through_a_checkpoint_restores_the_buffer_and_its_draws(tmp_path):
    sampler = filled([0.25, 0.0, 0.1875], p_fresh=0.3, p_diverge=0.5)
    sampler.sample(4)  # advance the generator
    manager = CheckpointManager(tmp_path)
    manager.save(3, model_state={}, extra={"sampler": sampler.state_dict()}, blocking=True)
    restored = ExItSampler(99, p_fresh=0.3, p_diverge=0.5)
    restored.load_state_dict(CheckpointManager.load(manager.latest()).extra["sampler"])
    assert restored.entries == sampler.entries and restored.next_uid == sampler.next_uid
    for _ in range(3):
        assert restored.sample(6) == sampler.sample(6)
        restored.update(restored.entries[0], [1.0, 0.0], [["z"], ["w"]])
        sampler.update(sampler.entries[0], [1.0, 0.0], [["z"], ["w"]])
    assert json.dumps(restored.state_dict()) == json.dumps(sampler.state_dict())


def test_loading_a_plain_sampler_state_is_a_clear_error():
    with pytest.raises(ValueError, match="no ExIt buffer"):
        ExItSampler(0).load_state_dict({"bit_generator": {}})


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="p_fresh"):
        ExItSampler(0, p_fresh=1.5)
    with pytest.raises(ValueError, match="capacity"):
        ExItSampler(0, capacity=0)
