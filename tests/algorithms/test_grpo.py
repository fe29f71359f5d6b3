"""GRPO and its variants (DAPO, Dr. GRPO), checked against hand-computed numbers (no model).

Also tests `core.aggregate_loss`, the token reduction the GRPO modes are built on.
"""

import math

import pytest
import torch

from looprl.algorithms.core import aggregate_loss
from looprl.algorithms.grpo import group_advantages, grpo_loss, kl_k3, zero_variance_groups

# --- group_advantages -------------------------------------------------------------------


def test_group_advantages_divide_by_the_unbiased_std_plus_eps():
    # [1, 0, 0, 1]: mean 0.5; unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.577350.
    #   A = +-0.5 / (0.577350 + 1e-4) = +-0.865876  (a biased std of 0.5 would give +-1).
    # [3, 1, 2]: mean 2; unbiased var = (1 + 1 + 0) / 2 = 1 -> A = [1, -1, 0] / 1.0001.
    a = 0.5 / (1 / math.sqrt(3) + 1e-4)
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]))
    torch.testing.assert_close(adv, torch.tensor([[a, -a, -a, a]]))
    adv = group_advantages(torch.tensor([[3.0, 1.0, 2.0]]))
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, 0.0]]) / 1.0001)
    # eps is added to the std, not to the variance: eps = 1 -> [1, -1, 0] / (1 + 1)
    adv = group_advantages(torch.tensor([[3.0, 1.0, 2.0]]), eps=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, 0.0]]))


def test_group_advantages_keep_groups_apart_and_equal_rewards_give_zero():
    # Row 0: mean 1, std 1 -> [1, -1, 0] / 1.0001.  Row 1: std 0 -> 0 / 1e-4 = 0 (not NaN).
    adv = group_advantages(torch.tensor([[2.0, 0.0, 1.0], [7.0, 7.0, 7.0]]))
    torch.testing.assert_close(adv, torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]]) / torch.tensor([[1.0001], [1.0]]))


def test_dr_grpo_advantages_only_subtract_the_mean():
    # [3, 1, 2] -> [1, -1, 0];  [0.5, 0, 0, 0] -> mean 0.125 -> [0.375, -0.125, -0.125, -0.125]
    torch.testing.assert_close(group_advantages(torch.tensor([[3.0, 1.0, 2.0]]), scale="none"),
                               torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(group_advantages(torch.tensor([[0.5, 0.0, 0.0, 0.0]]), scale="none"),
                               torch.tensor([[0.375, -0.125, -0.125, -0.125]]))


def test_group_advantages_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"at least 2 rollouts per task, got K=1"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match=r"Expected scale 'std' or 'none', actually: 'batch'"):
        group_advantages(torch.tensor([[1.0, 0.0]]), scale="batch")


# --- zero_variance_groups (DAPO dynamic sampling) ---------------------------------------


def test_zero_variance_groups_are_those_with_one_reward_value():
    rewards = torch.tensor([
        [1.0, 1.0, 1.0],   # all solved          -> dropped
        [0.0, 0.0, 0.0],   # all failed          -> dropped
        [1.0, 0.0, 1.0],   # mixed               -> kept
        [0.5, 0.5, 0.25],  # one differs         -> kept
    ])
    assert zero_variance_groups(rewards).tolist() == [True, True, False, False]
    # Their advantages are exactly the zeros that dynamic sampling saves the compute of.
    adv = group_advantages(rewards)
    assert (adv[zero_variance_groups(rewards)] == 0).all()
    assert (adv[~zero_variance_groups(rewards)].abs().sum(-1) > 0).all()


def test_dropping_zero_variance_groups_undilutes_the_token_mean():
    # Two groups of K = 2, every ratio 1, so each token's loss is -A.
    # Group 0 rewards [1, 0] -> A = [0.5, -0.5] / (0.707107 + 1e-4); rows of 1 and 3 tokens.
    # Group 1 rewards [1, 1] -> A = [0, 0]; rows of 2 tokens each.
    # token-mean with group 1: (-a * 1 + a * 3) / (1 + 3 + 2 + 2) = 2a / 8;  without: 2a / 4.
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    adv = group_advantages(rewards).flatten()  # (4,)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]])
    zeros = torch.zeros(4, 3)
    loss_all, _ = grpo_loss(zeros, zeros, adv, mask, 0.2, 0.28, loss_agg="token-mean")
    keep = (~zero_variance_groups(rewards)).repeat_interleave(2)  # (4,) per rollout
    loss_kept, _ = grpo_loss(zeros[keep], zeros[keep], adv[keep], mask[keep], 0.2, 0.28, loss_agg="token-mean")
    assert loss_all.item() == pytest.approx(2 * a / 8, rel=1e-6)
    assert loss_kept.item() == pytest.approx(2 * a / 4, rel=1e-6)


# --- grpo_loss ---------------------------------------------------------------------------

# DAPO clip-higher range [1 - 0.2, 1 + 0.28] = [0.8, 1.28].
#
# Row 0, A = +1, ratios [1.0, 1.5, 0.5], all sampled:
#   1.0 inside                 -> max(-1.0, -1.0)  = -1.0
#   1.5 > 1.28 and A > 0       -> max(-1.5, -1.28) = -1.28  clipped
#   0.5 < 0.8 but A > 0        -> max(-0.5, -0.8)  = -0.5   not clipped
#   sum -2.78 over 3 tokens
# Row 1, A = -2, ratios [0.5, 1.5, 3.0], last token masked out:
#   0.5 < 0.8 and A < 0        -> max(1.0, 1.6) = 1.6       clipped
#   1.5 > 1.28 but A < 0       -> max(3.0, 2.56) = 3.0      not clipped
#   sum 4.6 over 2 tokens
# token-mean:               (-2.78 + 4.6) / 5            = 0.364
# seq-mean-token-mean:      (-2.78 / 3 + 4.6 / 2) / 2    = 0.686667
# seq-mean-token-sum-norm:  (-2.78 / 4 + 4.6 / 4) / 2    = 0.2275   (max_len = 4)
# clipfrac = 2 / 5
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 3.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.7]])


def _example(loss_agg, ratios=RATIOS, clip_high=0.28, **kw):
    new = (OLD + torch.log(ratios)).requires_grad_()
    loss, metrics = grpo_loss(new, OLD, ADV, MASK, clip_low=0.2, clip_high=clip_high, loss_agg=loss_agg, **kw)
    loss.backward()
    return loss, metrics, new.grad


@pytest.mark.parametrize(("loss_agg", "max_len", "expected"), [
    ("token-mean", None, (-2.78 + 4.6) / 5),
    ("seq-mean-token-mean", None, (-2.78 / 3 + 4.6 / 2) / 2),
    ("seq-mean-token-sum-norm", 4, (-2.78 / 4 + 4.6 / 4) / 2),
])
def test_grpo_loss_value_in_each_aggregation_mode(loss_agg, max_len, expected):
    loss, metrics, _ = _example(loss_agg, max_len=max_len)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["pg_loss"] == pytest.approx(expected, rel=1e-6)  # no KL term
    assert metrics["clipfrac"] == pytest.approx(0.4)
    # The masked-out ratio 3.0 does not count: (1 + 1.5 + 0.5 + 0.5 + 1.5) / 5 = 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.0, rel=1e-6)
    k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731
    assert metrics["approx_kl"] == pytest.approx((k3(1.0) + 2 * k3(1.5) + 2 * k3(0.5)) / 5, rel=1e-5)
    assert "kl" not in metrics


def test_clip_higher_lets_positive_tokens_rise_further():
    # Symmetric 0.2: the 1.5 token of row 0 is clipped at 1.2 -> row 0 sum -2.7.
    #   token-mean (-2.7 + 4.6) / 5 = 0.38, vs 0.364 with clip_high = 0.28.
    # clip_high only moves the upper bound: row 1 (A < 0) is unchanged.
    loss, _, _ = _example("token-mean", clip_high=0.2)
    assert loss.item() == pytest.approx(0.38, rel=1e-6)


@pytest.mark.parametrize(("loss_agg", "max_len", "expected"), [
    # d/dlogp of -A * r is -A * r where not clipped, times the token's weight:
    # token-mean: 1/5 each.  row 0: -1.0/5, 0 (clipped), -0.5/5;  row 1: 0 (clipped), 2*1.5/5, 0 (masked)
    ("token-mean", None, [[-0.2, 0.0, -0.1], [0.0, 0.6, 0.0]]),
    # seq-mean-token-mean: 1/(3*2) in row 0, 1/(2*2) in row 1.
    ("seq-mean-token-mean", None, [[-1 / 6, 0.0, -0.5 / 6], [0.0, 3.0 / 4, 0.0]]),
    # seq-mean-token-sum-norm, max_len 4: 1/(4*2) everywhere.
    ("seq-mean-token-sum-norm", 4, [[-1 / 8, 0.0, -0.5 / 8], [0.0, 3.0 / 8, 0.0]]),
])
def test_grpo_loss_gradient_weights_tokens_by_mode(loss_agg, max_len, expected):
    _, _, grad = _example(loss_agg, max_len=max_len)
    torch.testing.assert_close(grad, torch.tensor(expected))


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_masked_positions_change_neither_loss_nor_gradient(loss_agg):
    ref = OLD - 0.3
    loss, metrics, grad = _example(loss_agg, max_len=4, ref_logprobs=ref, kl_coef=0.1)
    ratios = RATIOS.clone()
    ratios[1, 2] = 0.01  # the masked-out token
    other_ref = ref.clone()
    other_ref[1, 2] = 7.0
    loss2, metrics2, grad2 = _example(loss_agg, ratios=ratios, max_len=4, ref_logprobs=other_ref, kl_coef=0.1)
    assert loss2.item() == loss.item()
    assert metrics2 == metrics
    torch.testing.assert_close(grad2, grad)


# KL example: logprobs = old = 0 (ratio 1, so each token's policy term is -A), A = [+1, -1].
# d = ref - logp: row 0 [ln 2, 0], row 1 [-ln 2, (masked)].
# k3(d) = e^d - d - 1:  k3(ln 2) = 1 - ln 2 = 0.306853;  k3(0) = 0;  k3(-ln 2) = ln 2 - 0.5 = 0.193147
# With kl_coef 0.1, per token: row 0 [-1 + 0.0306853, -1];  row 1 [1 + 0.0193147]
#   token-mean: (-1 + 0.05) / 3 = -0.316667;  without KL: -1/3.
#   kl metric: (0.306853 + 0 + 0.193147) / 3 = 0.5 / 3
# d k3 / d logp = 1 - e^d: -1, 0, +0.5; so the token-mean gradient is
#   row 0: (-1 + 0.1 * -1) / 3, (-1 + 0) / 3;  row 1: (1 + 0.1 * 0.5) / 3
LN2 = math.log(2)
KL_REF = torch.tensor([[LN2, 0.0], [-LN2, 5.0]])
KL_MASK = torch.tensor([[1, 1], [1, 0]])
KL_ADV = torch.tensor([1.0, -1.0])


def test_kl_k3_is_grpo_eq4():
    k3 = kl_k3(torch.zeros(2, 2), KL_REF)
    torch.testing.assert_close(k3[:, 0], torch.tensor([1 - LN2, LN2 - 0.5]))
    assert k3[0, 1].item() == 0.0
    # pi_ref / pi - log(pi_ref / pi) - 1 with pi = 0.25, pi_ref = 0.5: 2 - ln 2 - 1
    assert kl_k3(torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])).item() == pytest.approx(1 - LN2)


def test_kl_penalty_is_added_per_token_before_aggregation():
    logp = torch.zeros(2, 2, requires_grad=True)
    loss, metrics = grpo_loss(logp, torch.zeros(2, 2), KL_ADV, KL_MASK, 0.2, 0.2,
                              loss_agg="token-mean", ref_logprobs=KL_REF, kl_coef=0.1)
    loss.backward()
    assert loss.item() == pytest.approx((-1 + 0.05) / 3, rel=1e-6)
    assert metrics["pg_loss"] == pytest.approx(-1 / 3, rel=1e-6)
    assert metrics["kl"] == pytest.approx(0.5 / 3, rel=1e-6)
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1 / 3, -1 / 3], [1.05 / 3, 0.0]]))


def test_kl_penalty_follows_the_aggregation_mode():
    # seq-mean-token-mean: row 0 (-1 + 0.0306853 - 1) / 2;  row 1 (1 + 0.0193147) / 1; mean of the two.
    loss, _ = grpo_loss(torch.zeros(2, 2), torch.zeros(2, 2), KL_ADV, KL_MASK, 0.2, 0.2,
                        loss_agg="seq-mean-token-mean", ref_logprobs=KL_REF, kl_coef=0.1)
    row0 = (-2 + 0.1 * (1 - LN2)) / 2
    row1 = 1 + 0.1 * (LN2 - 0.5)
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)  # = 0.0173287


def test_kl_importance_weight_multiplies_the_kl_term_by_the_ratio():
    # One token, ratio 1.1 (inside the clip), A = 0: the loss is the KL term alone.
    # d = ref - logp = -0.2 -> k3 = e^-0.2 + 0.2 - 1 = 0.018731;  weighted: 1.1 * 0.018731.
    old = torch.zeros(1, 1)
    logp = torch.log(torch.tensor([[1.1]]))
    ref = logp - 0.2
    k3 = math.exp(-0.2) + 0.2 - 1
    plain, _ = grpo_loss(logp, old, torch.zeros(1), torch.ones(1, 1), 0.2, 0.2, ref_logprobs=ref, kl_coef=1.0)
    weighted, metrics = grpo_loss(logp, old, torch.zeros(1), torch.ones(1, 1), 0.2, 0.2,
                                  ref_logprobs=ref, kl_coef=1.0, kl_importance_weight=True)
    assert plain.item() == pytest.approx(k3, rel=1e-5)
    assert weighted.item() == pytest.approx(1.1 * k3, rel=1e-5)
    assert metrics["kl"] == pytest.approx(k3, rel=1e-5)  # the metric stays the plain estimate


def test_ref_logprobs_without_kl_coef_only_add_the_metric():
    args = (torch.zeros(2, 2), torch.zeros(2, 2), KL_ADV, KL_MASK, 0.2, 0.2)
    loss, metrics = grpo_loss(*args, ref_logprobs=KL_REF)
    assert loss.item() == pytest.approx(-1 / 3, rel=1e-6)
    assert metrics["kl"] == pytest.approx(0.5 / 3, rel=1e-6)


def test_grpo_loss_rejects_bad_arguments():
    args = (torch.zeros(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"kl_coef=0.1 needs ref_logprobs"):
        grpo_loss(*args, KL_ADV, KL_MASK, 0.2, 0.2, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"advantages of shape \(B,\), actually: \(2, 1\)"):
        grpo_loss(*args, KL_ADV[:, None], KL_MASK, 0.2, 0.2)
    with pytest.raises(ValueError, match=r"needs a positive max_len, actually: None"):
        grpo_loss(*args, KL_ADV, KL_MASK, 0.2, 0.2, loss_agg="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"Expected loss_agg .* actually: 'seq-mean'"):
        grpo_loss(*args, KL_ADV, KL_MASK, 0.2, 0.2, loss_agg="seq-mean")


# --- core.aggregate_loss -----------------------------------------------------------------


def test_aggregate_loss_modes_on_rows_of_different_lengths():
    # Row 0: one token, 4.  Row 1: three tokens, 1 + 2 + 3 = 6.
    # token-mean (4 + 6) / 4 = 2.5;  seq-mean-token-mean (4 + 2) / 2 = 3;
    # seq-mean-token-sum-norm, max_len 3: (4/3 + 6/3) / 2 = 5/3
    x = torch.tensor([[4.0, 9.0, 9.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    assert aggregate_loss(x, mask, "token-mean").item() == pytest.approx(2.5)
    assert aggregate_loss(x, mask, "seq-mean-token-mean").item() == pytest.approx(3.0)
    assert aggregate_loss(x, mask, "seq-mean-token-sum-norm", max_len=3).item() == pytest.approx(5 / 3)
    # An empty row counts as 0 in the sequence means and adds nothing to the token mean.
    mask = torch.tensor([[0, 0, 0], [1, 1, 1]])
    assert aggregate_loss(x, mask, "token-mean").item() == pytest.approx(2.0)
    assert aggregate_loss(x, mask, "seq-mean-token-mean").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"positive max_len, actually: 0"):
        aggregate_loss(x, mask, "seq-mean-token-sum-norm", max_len=0)
