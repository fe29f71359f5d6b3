"""DPO, checked against hand-computed numbers (no model)."""

import math

import pytest
import torch

from looprl.algorithms.dpo import best_worst_pairs, dpo_loss, sequence_logps


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sequence_logps_sum_only_the_masked_tokens():
    # Row 0: a single turn, last column is padding: -1 - 2 = -3.
    # Row 1: two turns with an observation (masked) between them: -0.5 - 1 = -1.5.
    token_logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    assert sequence_logps(token_logprobs, mask).tolist() == [-3.0, -1.5]
    assert sequence_logps(token_logprobs, mask.bool()).tolist() == [-3.0, -1.5]


# Two pairs, beta = 0.1.
#   pair 0: chosen logratio -10 - (-11) = 1, rejected -12 - (-11) = -1 -> h = 2, beta h = 0.2
#   pair 1: chosen logratio -5 - (-5) = 0,  rejected -4 - (-5) = 1    -> h = -1, beta h = -0.1
# loss = mean(-log sigmoid(beta h)) = (softplus(-0.2) + softplus(0.1)) / 2 = (0.598139 + 0.744397) / 2
# rewards/chosen = mean(0.1 * 1, 0.1 * 0) = 0.05;  rewards/rejected = mean(-0.1, 0.1) = 0
# rewards/margins = mean(0.2, -0.1) = 0.05;  rewards/accuracies = 1 of 2 = 0.5
POLICY_CHOSEN = torch.tensor([-10.0, -5.0])
POLICY_REJECTED = torch.tensor([-12.0, -4.0])
REF_CHOSEN = torch.tensor([-11.0, -5.0])
REF_REJECTED = torch.tensor([-11.0, -5.0])


def test_dpo_loss_is_eq7_with_trl_metrics():
    loss, metrics = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1)
    assert loss.item() == pytest.approx((softplus(-0.2) + softplus(0.1)) / 2, rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(0.05, rel=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(0.0, abs=1e-7)
    assert metrics["rewards/margins"] == pytest.approx(0.05, rel=1e-6)
    assert metrics["rewards/accuracies"] == 0.5


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    # d/d chosen of -log sigmoid(beta h) = -beta sigmoid(-beta h); halved by the mean over 2 pairs.
    #   pair 0: -0.1 * sigmoid(-0.2) / 2 = -0.0225083;  pair 1: -0.1 * sigmoid(0.1) / 2 = -0.0262491
    # d/d rejected is the opposite.
    chosen = POLICY_CHOSEN.clone().requires_grad_()
    rejected = POLICY_REJECTED.clone().requires_grad_()
    loss, _ = dpo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, beta=0.1)
    loss.backward()
    expected = torch.tensor([-0.1 * sigmoid(-0.2) / 2, -0.1 * sigmoid(0.1) / 2])
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)


def test_dpo_beta_scales_the_margin():
    # beta = 1: beta h = 2 and -1 -> (softplus(-2) + softplus(1)) / 2; rewards scale with beta.
    loss, metrics = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=1.0)
    assert loss.item() == pytest.approx((softplus(-2.0) + softplus(1.0)) / 2, rel=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(0.5, rel=1e-6)


def test_label_smoothing_is_conservative_dpo():
    # eps = 0.1: (1 - eps) softplus(-beta h) + eps softplus(beta h) per pair.
    #   pair 0: 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139
    #   pair 1: 0.9 * 0.744397 + 0.1 * 0.644397 = 0.734397
    loss, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.1, label_smoothing=0.1)
    pair0 = 0.9 * softplus(-0.2) + 0.1 * softplus(0.2)
    pair1 = 0.9 * softplus(0.1) + 0.1 * softplus(-0.1)
    assert loss.item() == pytest.approx((pair0 + pair1) / 2, rel=1e-6)


def test_equal_log_ratios_give_log_2_and_no_accuracy():
    # h = 0: -log sigmoid(0) = ln 2, and a tie is not counted as accurate.
    x = torch.tensor([-3.0])
    loss, metrics = dpo_loss(x, x, x, x)
    assert loss.item() == pytest.approx(math.log(2))
    assert metrics["rewards/accuracies"] == 0.0
    assert metrics["rewards/margins"] == 0.0


def test_dpo_loss_rejects_label_smoothing_of_a_half_or_more():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match=r"label_smoothing in \[0, 0.5\), actually: 0.5"):
        dpo_loss(x, x, x, x, label_smoothing=0.5)


def test_best_worst_pairs_skip_ties_and_take_first_indices():
    rewards = torch.tensor([
        [0.0, 1.0, 1.0],   # best: first 1 (k=1); worst k=0
        [2.0, 2.0, 2.0],   # all equal: skipped
        [3.0, 0.0, 0.0],   # best k=0; worst: first 0 (k=1)
        [0.5, -1.0, 2.0],  # best k=2; worst k=1
    ])
    assert best_worst_pairs(rewards) == [(0, 1, 0), (2, 0, 1), (3, 2, 1)]
    assert best_worst_pairs(torch.ones(2, 4)) == []
    assert all(isinstance(i, int) for pair in best_worst_pairs(rewards) for i in pair)
