"""LOOP: leave-one-out PPO for long-horizon interactive agents.

Chen et al., 2025, "Reinforcement Learning for Long-Horizon Interactive LLM Agents"
(arXiv:2502.01600), section 4 and Algorithm 1. For each task, K rollouts are sampled;
the advantage of rollout i is its return minus the mean return of the other K-1
(the leave-one-out baseline of Kool et al., 2019), with no value network:

    A_i = R_i - 1/(K-1) * sum_{j != i} R_j                     (LOOP eq. 4)

Every sampled token of rollout i carries A_i in a PPO clipped objective with a
per-token ratio and the asymmetric range [1/(1+eps), 1+eps] (eps = 0.1); losses are a
token-mean within each rollout. Rollouts with |A_i| < 0.01 carry no signal and are
dropped. No KL penalty. Options: normalise advantages by the group's std (off in the
paper), and compute the ratio per turn or per trajectory instead of per token. The
paper's ablations (AppWorld, section 5) favour exactly the defaults: per-token over
per-turn over per-trajectory ratios, no std normalisation, no KL.

One more option, `loss_agg`, is not in the paper: the token-mean within each rollout
weighs each token of a rollout of L tokens by A_i / L, so a long failed rollout (one that
rambles until the token limit) is hardly penalised per token. `loss_agg="token-mean"`
(DAPO, section 3.3) weighs every token of the batch alike instead; see
`looprl.algorithms.core.aggregate_loss` for the modes.
"""

from __future__ import annotations

import torch

from looprl.algorithms.core import PolicyLossInputs, aggregation_unit, clipped_policy_loss
from looprl.config import LoopConfig


def leave_one_out_advantages(rewards: torch.Tensor, normalize_std: bool = False) -> torch.Tensor:
    """LOOP eq. 4 on a (G, K) tensor of returns: G tasks, K rollouts each.

    Equivalent to K/(K-1) * (R_i - mean_j R_j).

    >>> leave_one_out_advantages(torch.tensor([[1.0, 0.0, 0.0]])).tolist()
    [[1.0, -0.5, -0.5]]
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"Leave-one-out needs at least 2 rollouts per task, got K={k}")
    others_mean = (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)
    advantages = rewards - others_mean
    if normalize_std:
        advantages = advantages / (rewards.std(-1, keepdim=True) + 1e-6)
    return advantages


def keep_mask(advantages: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Rollouts whose advantage is large enough to train on (LOOP drops |A| < 0.01)."""
    return advantages.abs() >= threshold


def clip_range(eps: float) -> tuple[float, float]:
    """LOOP's asymmetric range [1/(1+eps), 1+eps] as (clip_low, clip_high)."""
    return 1 - 1 / (1 + eps), eps


def loop_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps: float = 0.1,
    segments: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    loss_agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    global_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The LOOP policy loss on a minibatch: (B, T) logprobs, (B,) advantages, optional
    (B, T) per-token `weights` and the minibatch's `global_count` (see `clipped_policy_loss`)."""
    clip_low, clip_high = clip_range(eps)
    return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, segments, weights,
                               loss_agg, max_len, global_count)


class LOOP:
    """LOOP as the trainer uses it: advantages for a step's groups, then the loss.

    Args:
        cfg: the `algorithm` section of the run config.
        max_len: the "seq-mean-token-sum-norm" divisor when `cfg.max_len` is None (the
            episode token limit).
    """

    needs_reference = False  # LOOP has no KL term

    def __init__(self, cfg: LoopConfig, max_len: int | None = None):
        if not isinstance(cfg, LoopConfig):
            raise TypeError(f"LOOP needs a LoopConfig, actually: {type(cfg).__name__}")
        self.cfg = cfg
        self.max_len = cfg.max_len or max_len
        self.aggregates_over = aggregation_unit(cfg.loss_agg)

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, K) returns -> (G, K) advantages and the (G, K) mask of rollouts to train on."""
        advantages = leave_one_out_advantages(rewards, self.cfg.normalize_std)
        return advantages, keep_mask(advantages, self.cfg.adv_threshold)

    def loss(self, inputs: PolicyLossInputs, global_count: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The clipped loss on a batch; `global_count` is the minibatch's count of
        `aggregates_over` units (None: this batch's own)."""
        turns = inputs.turns
        segments = {"token": None, "turn": turns, "trajectory": torch.zeros_like(turns)}[self.cfg.ratio_level]
        return loop_loss(inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.mask, self.cfg.clip_eps,
                         segments, inputs.weights, self.cfg.loss_agg, self.max_len, global_count)
