"""The shared tensor functions, checked against hand-computed numbers (no model)."""

import math

import pytest
import torch

from looprl.algorithms.core import (
    clipped_policy_loss,
    masked_mean,
    segment_mean,
    sequence_token_mean,
    token_logprobs,
)

# One hand example used by several tests: clip range [0.8, 1.2] (clip_low = clip_high = 0.2).
#
# Row 0, A = +1, ratios [1.0, 1.5, 0.5], all sampled:
#   1.0 inside                    -> max(-1.0, -1.0) = -1.0
#   1.5 > 1.2 and A > 0           -> max(-1.5, -1.2) = -1.2   clipped
#   0.5 < 0.8 but A > 0           -> max(-0.5, -0.8) = -0.5   not clipped
#   token mean: -2.7 / 3 = -0.9
# Row 1, A = -2, ratios [0.5, 1.5, 3.0], last token masked out:
#   0.5 < 0.8 and A < 0           -> max(1.0, 1.6) = 1.6      clipped
#   1.5 > 1.2 but A < 0           -> max(3.0, 2.4) = 3.0      not clipped
#   token mean: 4.6 / 2 = 2.3
# loss = (-0.9 + 2.3) / 2 = 0.7;  clipfrac = 2 clipped / 5 sampled = 0.4
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [0.5, 1.5, 3.0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.7]])


def _example(ratios=RATIOS):
    new = (OLD + torch.log(ratios)).requires_grad_()
    loss, metrics = clipped_policy_loss(new, OLD, ADV, MASK, clip_low=0.2, clip_high=0.2)
    loss.backward()
    return loss, metrics, new.grad


def test_clipped_policy_loss_value_and_metrics():
    loss, metrics, _ = _example()
    assert loss.item() == pytest.approx(0.7, rel=1e-6)
    assert metrics["pg_loss"] == pytest.approx(0.7, rel=1e-6)
    assert metrics["clipfrac"] == pytest.approx(0.4)
    # k3 = (r - 1) - log r per sampled token:
    #   r = 1.0 -> 0;  r = 1.5 -> 0.5 - ln 1.5 = 0.094535;  r = 0.5 -> -0.5 + ln 2 = 0.193147
    #   sampled ratios 1.0, 1.5, 0.5, 0.5, 1.5 -> (0 + 2*0.094535 + 2*0.193147) / 5 = 0.115073
    k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731
    assert metrics["approx_kl"] == pytest.approx((k3(1.0) + 2 * k3(1.5) + 2 * k3(0.5)) / 5, rel=1e-5)
    # The masked-out ratio 3.0 does not count: (1 + 1.5 + 0.5 + 0.5 + 1.5) / 5 = 1.0
    assert metrics["ratio_mean"] == pytest.approx(1.0, rel=1e-6)


def test_clipped_policy_loss_gradient_is_zero_where_the_clip_is_active():
    # d/dlogp of -A * r is -A * r; each token is weighted 1 / (its row's token count) / B.
    #   row 0: token 0: -1 * 1.0 / 3 / 2 = -1/6;  token 1 clipped: 0;  token 2: -1 * 0.5 / 3 / 2 = -1/12
    #   row 1: token 0 clipped: 0;  token 1: 2 * 1.5 / 2 / 2 = 0.75;  token 2 masked: 0
    _, _, grad = _example()
    expected = torch.tensor([[-1 / 6, 0.0, -1 / 12], [0.0, 0.75, 0.0]])
    torch.testing.assert_close(grad, expected)


def test_masked_positions_change_neither_loss_nor_gradient():
    loss, metrics, grad = _example()
    other = RATIOS.clone()
    other[1, 2] = 0.01  # the masked-out token
    loss2, metrics2, grad2 = _example(other)
    assert loss2.item() == loss.item()
    assert metrics2 == metrics
    torch.testing.assert_close(grad2, grad)


def test_short_sequence_weighs_as_much_as_a_long_one():
    # Ratio 1 everywhere, so each token's term is -A.
    # Row 0: 1 sampled token, A = +1 -> row mean -1.  Row 1: 3 tokens, A = -1 -> row mean +1.
    # Sequence mean: (-1 + 1) / 2 = 0  (a global token mean would give (-1 + 3) / 4 = 0.5).
    # Gradient: row 0 token: -1 / 1 / 2 = -0.5;  row 1 tokens: +1 / 3 / 2 = 1/6 each.
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = clipped_policy_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]), mask, 0.2, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.0, 0.0], [1 / 6, 1 / 6, 1 / 6]]))
    assert sequence_token_mean(torch.tensor([[2.0, 9.0, 9.0], [1.0, 2.0, 3.0]]), mask).item() == 2.0  # (2 + 2) / 2


def test_segment_mean_averages_masked_tokens_of_each_turn():
    # Row 0: turn 0 = tokens 0-1, turn 1 = tokens 2-4; token 2 is an observation (masked).
    #   turn 0: (0.2 + 0.0) / 2 = 0.1;  turn 1: (-0.1 - 0.2) / 2 = -0.15 (the 5.0 is ignored)
    # Row 1: one segment over all tokens: (1 + 2 + 3 + 4 + 5) / 5 = 3 (rows do not mix).
    x = torch.tensor([[0.2, 0.0, 5.0, -0.1, -0.2], [1.0, 2.0, 3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
    segments = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = torch.tensor([[0.1, 0.1, -0.15, -0.15, -0.15], [3.0, 3.0, 3.0, 3.0, 3.0]])
    torch.testing.assert_close(segment_mean(x, mask, segments), expected)


TURN_LOG_RATIOS = torch.tensor([[0.2, 0.0, 5.0, -0.1, -0.2]])
TURN_MASK = torch.tensor([[1, 1, 0, 1, 1]])
TURNS = torch.tensor([[0, 0, 1, 1, 1]])


def test_per_turn_ratio_is_exp_of_the_turns_mean_log_ratio():
    # Turn ratios: exp(0.1) = 1.105171, exp(-0.15) = 0.860708. Range [0.8, 1.2]: neither clipped.
    # A = +1: loss = -(2 * 1.105171 + 2 * 0.860708) / 4 = -0.982939
    # Gradient: turn 0 tokens each -r0 * (1/2) * 2 tokens / 4 = -r0 / 4; turn 1 likewise -r1 / 4.
    old = torch.zeros(1, 5)
    new = TURN_LOG_RATIOS.clone().requires_grad_()
    loss, metrics = clipped_policy_loss(new, old, torch.tensor([1.0]), TURN_MASK, 0.2, 0.2, segments=TURNS)
    loss.backward()
    r0, r1 = math.exp(0.1), math.exp(-0.15)
    assert loss.item() == pytest.approx(-(r0 + r1) / 2, rel=1e-6)
    assert metrics["ratio_mean"] == pytest.approx((r0 + r1) / 2, rel=1e-6)
    torch.testing.assert_close(new.grad, torch.tensor([[-r0 / 4, -r0 / 4, 0.0, -r1 / 4, -r1 / 4]]))
    # approx_kl stays per token: k3(x) = e^x - 1 - x over 0.2, 0.0, -0.1, -0.2.
    k3 = lambda x: math.expm1(x) - x  # noqa: E731
    assert metrics["approx_kl"] == pytest.approx((k3(0.2) + k3(0.0) + k3(-0.1) + k3(-0.2)) / 4, rel=1e-5)


def test_per_turn_ratio_is_clipped_as_a_whole_turn():
    # LOOP range [1/1.1, 1.1] = [0.90909, 1.1], A = +1.
    # Turn 0: ratio 1.105171 > 1.1 -> -1.1 (clipped, both tokens);  turn 1: 0.860708 -> -0.860708.
    # loss = -(2 * 1.1 + 2 * 0.860708) / 4 = -0.980354;  clipfrac = 2 / 4.
    old = torch.zeros(1, 5)
    new = TURN_LOG_RATIOS.clone().requires_grad_()
    loss, metrics = clipped_policy_loss(new, old, torch.tensor([1.0]), TURN_MASK, 1 - 1 / 1.1, 0.1, segments=TURNS)
    loss.backward()
    assert loss.item() == pytest.approx(-(1.1 + math.exp(-0.15)) / 2, rel=1e-6)
    assert metrics["clipfrac"] == pytest.approx(0.5)
    assert new.grad[0, :2].tolist() == [0.0, 0.0]
    assert new.grad[0, 3].item() == pytest.approx(-math.exp(-0.15) / 4, rel=1e-6)


def test_per_trajectory_ratio_is_exp_of_the_mean_log_ratio():
    # One segment: exp((0.2 + 0.0 - 0.1 - 0.2) / 4) = exp(-0.025) = 0.975310 on every token.
    old = torch.zeros(1, 5)
    loss, metrics = clipped_policy_loss(TURN_LOG_RATIOS, old, torch.tensor([-1.0]), TURN_MASK, 0.2, 0.2,
                                        segments=torch.zeros(1, 5, dtype=torch.long))
    assert metrics["ratio_mean"] == pytest.approx(math.exp(-0.025), rel=1e-6)
    assert loss.item() == pytest.approx(math.exp(-0.025), rel=1e-6)  # A = -1: -A * r


def test_masked_mean_with_empty_mask_is_zero():
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0
    assert masked_mean(x, torch.tensor([[0, 0], [1, 1]]), dim=-1).tolist() == [0.0, 4.0]
    assert masked_mean(x, torch.tensor([[1, 0], [0, 1]])).item() == 3.0  # (1 + 5) / 2


def test_token_logprobs_equals_log_softmax_gather():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 11, generator=gen) * 3
    ids = torch.randint(0, 11, (2, 4), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, ids), expected)
    assert token_logprobs(logits.bfloat16(), ids).dtype == torch.float32
