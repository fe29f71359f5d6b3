"""Decoupled PPO (`rollout.decoupled_loss`): the clipped ratio against the proximal policy,
each token weighted by pi_prox / pi_behaviour, checked against hand-computed numbers."""

import math

import pytest
import torch

from looprl.algorithms.core import behaviour_weights, clipped_policy_loss
from looprl.algorithms.grpo import grpo_loss

MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0])
PROX = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.7]])
# pi_prox / pi_behaviour per token: [[2, 0.5, 8], [1, 4, 3 (masked)]]
BEHAV = PROX - torch.log(torch.tensor([[2.0, 0.5, 8.0], [1.0, 4.0, 3.0]]))


def test_behaviour_weights_are_the_prox_over_behaviour_ratio_capped_to_zero():
    torch.testing.assert_close(behaviour_weights(PROX, BEHAV, MASK, cap=None),
                               torch.tensor([[2.0, 0.5, 8.0], [1.0, 4.0, 0.0]]))
    # Above the cap a token gets weight 0 (AReaL drops it), not the cap.
    torch.testing.assert_close(behaviour_weights(PROX, BEHAV, MASK, cap=5.0),
                               torch.tensor([[2.0, 0.5, 0.0], [1.0, 4.0, 0.0]]))
    assert not behaviour_weights(PROX.clone().requires_grad_(), BEHAV, MASK, cap=5.0).requires_grad


def _decoupled(ratios, cap=5.0):
    new = (PROX.detach() + torch.log(ratios)).requires_grad_()
    weights = behaviour_weights(PROX.detach(), BEHAV, MASK, cap)
    loss, metrics = clipped_policy_loss(new, PROX.detach(), ADV, MASK, 0.2, 0.2, weights=weights)
    loss.backward()
    return loss, metrics, new.grad


def test_decoupled_loss_weights_each_clipped_term_by_the_behaviour_weight():
    # Ratios against the proximal policy [[1.0, 1.5, 0.5], [0.5, 1.5, 3.0]], clip [0.8, 1.2]:
    # clipped terms (see test_core) [[-1.0, -1.2, -0.5], [1.6, 3.0, -]],
    # times weights [[2, 0.5, 0 (capped)], [1, 4, -]]:
    #   row 0: (-2.0 - 0.6 + 0) / 3 = -0.866667;  row 1: (1.6 + 12.0) / 2 = 6.8
    loss, metrics, grad = _decoupled(torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 3.0]]))
    assert loss.item() == pytest.approx((-2.6 / 3 + 6.8) / 2, rel=1e-6)
    # The clip fraction is the proximal ratio's, as without weights: 2 of 5.
    assert metrics["clipfrac"] == pytest.approx(0.4)
    # d/dlogp of -A * r * w: row 0 token 0: -1 * 1.0 * 2 / 3 / 2; token 1 clipped; token 2 capped
    #                       row 1 token 0 clipped; token 1: 2 * 1.5 * 4 / 2 / 2
    torch.testing.assert_close(grad, torch.tensor([[-1 / 3, 0.0, 0.0], [0.0, 3.0, 0.0]]))


def test_fresh_rollouts_make_the_decoupled_loss_the_plain_one():
    # Behaviour == proximal (s = 0): every weight is 1, so loss and gradient are PPO's.
    ratios = torch.tensor([[1.1, 0.7, 1.3], [0.9, 1.25, 2.0]])
    new = (PROX.detach() + torch.log(ratios)).requires_grad_()
    plain, _ = clipped_policy_loss(new, PROX.detach(), ADV, MASK, 0.2, 0.2)
    (plain_grad,) = torch.autograd.grad(plain, new)
    weights = behaviour_weights(PROX.detach(), PROX.detach(), MASK, cap=5.0)
    decoupled, _ = clipped_policy_loss(new, PROX.detach(), ADV, MASK, 0.2, 0.2, weights=weights)
    (decoupled_grad,) = torch.autograd.grad(decoupled, new)
    assert decoupled.item() == pytest.approx(plain.item(), rel=1e-7)
    torch.testing.assert_close(decoupled_grad, plain_grad)


def test_grpo_weights_the_policy_term_and_not_the_kl_term():
    new = PROX.detach().clone().requires_grad_()  # ratio 1 everywhere: each pg term is -A
    ref = PROX.detach() - 0.5  # kl_k3 = exp(-0.5) - 1 + 0.5 per token
    weights = torch.tensor([[2.0, 0.5, 0.0], [1.0, 4.0, 0.0]])
    loss, _ = grpo_loss(new, PROX.detach(), ADV, MASK, 0.2, 0.2, loss_agg="token-mean",
                        ref_logprobs=ref, kl_coef=0.1, weights=weights)
    kl = math.exp(-0.5) - 0.5
    # token-mean over 5 sampled tokens: pg -(2 + 0.5 + 0) * 1 + 2 * (1 + 4) = 7.5, plus 0.1 * kl each.
    assert loss.item() == pytest.approx((7.5 + 5 * 0.1 * kl) / 5, rel=1e-6)
