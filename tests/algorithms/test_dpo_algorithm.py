"""The `DPO` object the online step uses: loss choice, IPO and RPO's NLL term, pairs."""

from __future__ import annotations

import math

import pytest
import torch

from looprl.algorithms import build_algorithm
from looprl.algorithms.core import PairLossInputs
from looprl.algorithms.dpo import DPO, dpo_loss
from looprl.config import from_dict

# (B,) = 1 pair: policy chosen/rejected, reference chosen/rejected, sampled-token counts.
PC, PR, RC, RR = torch.tensor([-2.0]), torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-3.0])
NC, NR = torch.tensor([2.0]), torch.tensor([1.0])


def algorithm(**fields):
    return build_algorithm(from_dict({"lora": {"enabled": False}, "algorithm": {"name": "dpo", **fields}}))


def test_build_algorithm_gives_dpo_and_sigmoid_loss_is_dpo_eq_7():
    algo = algorithm(beta=0.5)
    assert isinstance(algo, DPO) and algo.needs_reference
    loss, metrics = algo.loss(PairLossInputs(PC, PR, RC, RR, NC, NR))
    # h = (-2 + 3) - (-4 + 3) = 2; -log sigmoid(0.5 * 2)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))
    assert metrics["rewards/margins"] == pytest.approx(1.0) and metrics["rewards/accuracies"] == 1.0


def test_ipo_regresses_the_token_averaged_log_ratio_gap_onto_one_over_two_beta():
    loss, _ = algorithm(beta=0.5, loss_type="ipo").loss(PairLossInputs(PC, PR, RC, RR, NC, NR))
    assert loss.item() == pytest.approx((1 / 2 - (-1 / 1) - 1 / (2 * 0.5)) ** 2)


def test_nll_coef_adds_rpo_per_token_nll_of_the_chosen():
    plain, _ = dpo_loss(PC, PR, RC, RR, beta=0.1)
    loss, metrics = algorithm(nll_coef=0.5).loss(PairLossInputs(PC, PR, RC, RR, NC, NR))
    assert metrics["nll"] == pytest.approx(1.0)  # -(-2) / 2 tokens
    assert loss.item() == pytest.approx(plain.item() + 0.5 * 1.0)


def test_pairs_skip_tied_groups():
    rewards = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.2, 0.0, 0.2]])
    assert algorithm().pairs(rewards) == [(0, 1, 0), (2, 0, 1)]
