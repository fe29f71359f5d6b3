"""LOOP (leave-one-out PPO), checked against hand-computed numbers."""

import math

import pytest
import torch

from looprl.algorithms.core import clipped_policy_loss
from looprl.algorithms.loop import clip_range, keep_mask, leave_one_out_advantages, loop_loss


def test_leave_one_out_is_return_minus_mean_of_the_others():
    # K = 4. R=1: 1 - (0+0+1)/3 = 2/3.  R=0: 0 - (1+0+1)/3 = -2/3.
    adv = leave_one_out_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3]]))


def test_leave_one_out_on_several_groups_keeps_groups_apart():
    rewards = torch.tensor([
        [1.0, 0.0, 0.0],  # 1 - 0 = 1;  0 - (1+0)/2 = -0.5 (twice)
        [2.0, 2.0, 2.0],  # equal returns: every advantage 0
        [3.0, 1.0, 2.0],  # 3 - (1+2)/2 = 1.5;  1 - (3+2)/2 = -1.5;  2 - (3+1)/2 = 0
    ])
    expected = torch.tensor([[1.0, -0.5, -0.5], [0.0, 0.0, 0.0], [1.5, -1.5, 0.0]])
    torch.testing.assert_close(leave_one_out_advantages(rewards), expected)


def test_leave_one_out_normalize_std_divides_by_the_group_std():
    # [1, 0, 0, 1]: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 1/sqrt(3).
    # (2/3) / (1/sqrt(3)) = 2/sqrt(3) = 1.1547.  A group of equal returns stays 0 (not NaN).
    adv = leave_one_out_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [5.0, 5.0, 5.0, 5.0]]), normalize_std=True)
    a = 2 / math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0]]), rtol=1e-5, atol=1e-5)


def test_leave_one_out_needs_two_rollouts():
    with pytest.raises(ValueError, match=r"at least 2 rollouts per task, got K=1"):
        leave_one_out_advantages(torch.tensor([[1.0], [0.0]]))


def test_keep_mask_drops_advantages_below_threshold():
    adv = torch.tensor([0.0, 0.005, -0.009, 0.01, -0.01, 0.5, -2.0], dtype=torch.float64)
    expected = [False, False, False, True, True, True, True]  # |A| < 0.01 dropped, 0.01 kept
    assert keep_mask(adv, threshold=0.01).tolist() == expected
    assert keep_mask(adv).tolist() == expected  # 0.01 is the default (LOOP)
    assert keep_mask(adv, threshold=0.6).tolist() == [False] * 6 + [True]


def test_clip_range_is_loops_asymmetric_range():
    clip_low, clip_high = clip_range(0.1)
    # [1/(1+eps), 1+eps] = [0.90909, 1.1]  ->  clip_low = 1 - 1/1.1 = 0.090909
    assert clip_low == pytest.approx(1 - 1 / 1.1)
    assert clip_high == pytest.approx(0.1)


def test_loop_loss_clips_below_at_one_over_one_plus_eps():
    # ratio 0.905 lies inside a symmetric [0.9, 1.1] but below LOOP's 1/1.1 = 0.90909.
    # A = -1: pg_loss1 = 0.905, pg_loss2 = 0.90909, max -> 0.90909 (clipped).
    old = torch.zeros(1, 1)
    new = torch.log(torch.tensor([[0.905]])).requires_grad_()
    loss, metrics = loop_loss(new, old, torch.tensor([-1.0]), torch.ones(1, 1), eps=0.1)
    assert loss.item() == pytest.approx(1 / 1.1, rel=1e-6)
    assert metrics["clipfrac"] == 1.0
    loss.backward()
    assert new.grad.item() == 0.0
    # The symmetric range would not clip it: loss is the raw ratio term.
    sym, sym_metrics = clipped_policy_loss(new, old, torch.tensor([-1.0]), torch.ones(1, 1), 0.1, 0.1)
    assert sym.item() == pytest.approx(0.905, rel=1e-6)
    assert sym_metrics["clipfrac"] == 0.0


def test_loop_loss_matches_hand_computed_values():
    # LOOP range for eps = 0.1: [0.90909, 1.1].
    # Row 0, A = +1, ratios [1.05, 1.2, 0.8]:
    #   1.05 inside          -> -1.05
    #   1.2 > 1.1, A > 0     -> max(-1.2, -1.1) = -1.1   (clipped)
    #   0.8 < 0.909, A > 0   -> max(-0.8, -0.909) = -0.8 (not clipped: the low side only binds A < 0)
    #   token mean (-1.05 - 1.1 - 0.8) / 3 = -0.98333
    # Row 1, A = -0.5, ratios [0.8, 1.2, (masked)]:
    #   0.8 < 0.909, A < 0   -> max(0.4, 0.5*0.90909) = 0.454545 (clipped)
    #   1.2, A < 0           -> max(0.6, 0.55) = 0.6            (not clipped)
    #   token mean (0.454545 + 0.6) / 2 = 0.527273
    # loss = (-0.98333 + 0.527273) / 2 = -0.228030
    old = torch.full((2, 3), -1.0)
    ratios = torch.tensor([[1.05, 1.2, 0.8], [0.8, 1.2, 3.0]])
    new = old + torch.log(ratios)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = loop_loss(new, old, torch.tensor([1.0, -0.5]), mask, eps=0.1)
    row0 = (-1.05 - 1.1 - 0.8) / 3
    row1 = (0.5 / 1.1 + 0.6) / 2
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-5)
    assert metrics["pg_loss"] == pytest.approx(loss.item())
    assert metrics["clipfrac"] == pytest.approx(2 / 5)
    assert metrics["ratio_mean"] == pytest.approx((1.05 + 1.2 + 0.8 + 0.8 + 1.2) / 5, rel=1e-5)


def test_loop_loss_token_mean_weighs_every_token_of_the_batch_alike():
    # Advantages +1 on a 1-token row and -1 on a 3-token row, all ratios 1: per token
    # -1 and +1. The paper's seq-mean-token-mean gives (-1 + 1) / 2 = 0: the long failed
    # row weighs as much as the short success. token-mean gives (-1 + 3) / 4 = 0.5, and the
    # sum over max_len = 8 gives (-1/8 + 3/8) / 2 = 0.125.
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    assert loop_loss(logp, logp, adv, mask)[0].item() == pytest.approx(0.0)
    assert loop_loss(logp, logp, adv, mask, loss_agg="token-mean")[0].item() == pytest.approx(0.5)
    assert loop_loss(logp, logp, adv, mask, loss_agg="seq-mean-token-sum-norm", max_len=8)[0].item() == \
        pytest.approx(0.125)


@pytest.mark.parametrize("loss_agg, unit", [("seq-mean-token-mean", "sequences"), ("token-mean", "tokens"),
                                            ("seq-mean-token-sum-norm", "sequences")])
def test_loop_combines_micro_batches_by_the_unit_its_loss_averages_over(loss_agg, unit):
    from looprl.algorithms import build_algorithm
    from looprl.config import from_dict

    cfg = from_dict({"algorithm": {"name": "loop", "loss_agg": loss_agg}, "env": {"max_tokens": 300}})
    algorithm = build_algorithm(cfg)
    assert algorithm.aggregates_over == unit
    assert algorithm.max_len == 300


def test_loop_config_rejects_an_unknown_loss_agg():
    from looprl.config import from_dict

    with pytest.raises(ValueError, match="loss_agg"):
        from_dict({"algorithm": {"name": "loop", "loss_agg": "sum"}})
