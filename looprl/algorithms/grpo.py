"""GRPO: group relative policy optimisation, with the DAPO and Dr. GRPO variants.

Shao et al., 2024, "DeepSeekMath" (arXiv:2402.03300), section 4.1. For each prompt, G
outputs are sampled; with outcome rewards every token of output i carries the group-
normalised reward (section 4.1.2)

    A_i = (R_i - mean(R)) / std(R)

and the objective (eq. 3) is a PPO clipped surrogate with a per-token ratio, a token-mean
within each output, a mean over the group, and a KL penalty to a reference policy with
the unbiased, always-positive estimator of eq. 4 (Schulman's "k3"):

    D_KL = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1

Variants, each one argument here:
- DAPO (Yu et al., 2025, arXiv:2503.14476): "Clip-Higher" (section 3.1) clips the ratio to
  [1 - eps_low, 1 + eps_high] with eps_high > eps_low (0.2 / 0.28); "Dynamic Sampling"
  (3.2) drops groups whose outputs all got the same reward (their advantages are all 0);
  the "Token-Level Policy Gradient Loss" (3.3) averages over every token of the batch,
  so long outputs are not down-weighted: `loss_agg="token-mean"`.
- Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training: A Critical
  Perspective", arXiv:2503.20783): no division by std(R) (`scale="none"`) and no division
  by the output length |o_i|; their code divides each output's token-sum by a constant,
  the generation budget: `loss_agg="seq-mean-token-sum-norm"` with `max_len`.

Conventions follow TRL's GRPOTrainer (trl 1.16), checked by tests/algorithms/test_grpo_trl.py:
the std is unbiased (Bessel), eps is added to the std, and the KL term is added to each
token's loss before aggregation.
"""

from __future__ import annotations

from typing import Literal

import torch

from looprl.algorithms.core import PolicyLossInputs, aggregate_loss, aggregation_unit, masked_mean
from looprl.config import LossAgg


def group_advantages(rewards: torch.Tensor, scale: Literal["std", "none"] = "std", eps: float = 1e-4) -> torch.Tensor:
    """(R - mean) / (std + eps) within each group of a (G, K) tensor of rewards.

    `scale="none"` is Dr. GRPO: R - mean only. The std is unbiased, as in TRL.

    >>> group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), scale="none").tolist()
    [[0.5, -0.5, -0.5, 0.5]]
    """
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"A group needs at least 2 rollouts per task, got K={k}")
    advantages = rewards - rewards.mean(-1, keepdim=True)
    if scale == "std":
        return advantages / (rewards.std(-1, keepdim=True) + eps)
    if scale == "none":
        return advantages
    raise ValueError(f"Expected scale 'std' or 'none', actually: {scale!r}")


def zero_variance_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(G,) True where every rollout of a group got the same reward (DAPO's dynamic sampling
    drops these: all their advantages are 0, so they carry no gradient)."""
    return rewards.amax(-1) == rewards.amin(-1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref), GRPO eq. 4: exp(d) - d - 1 with d = ref - logp."""
    delta = ref_logprobs - logprobs
    return torch.expm1(delta) - delta


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    loss_agg: LossAgg = "token-mean",
    max_len: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_importance_weight: bool = False,
    weights: torch.Tensor | None = None,
    global_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective (eq. 3), negated, on a minibatch.

    Args:
        logprobs: (B, T) under the policy being trained.
        old_logprobs: (B, T) under the behaviour policy.
        advantages: (B,) one advantage per sequence, applied to every token.
        mask: (B, T) 1 on sampled tokens (tool outputs and padding are 0).
        clip_low: the ratio is clipped below at 1 - clip_low.
        clip_high: and above at 1 + clip_high (DAPO's clip-higher when larger).
        loss_agg: how tokens are reduced; see `looprl.algorithms.core.aggregate_loss`.
            "token-mean" (DAPO, TRL's default "dapo"), "seq-mean-token-mean" (GRPO
            eq. 3), "seq-mean-token-sum-norm" (Dr. GRPO, with `max_len`).
        max_len: the constant normaliser of "seq-mean-token-sum-norm" (the generation budget).
        ref_logprobs: (B, T) under the reference policy; needed when `kl_coef` is not 0.
        kl_coef: beta of eq. 3; the penalty is added per token before aggregation.
        kl_importance_weight: multiply each token's KL term by its ratio pi / pi_old, so
            that off-policy samples give an unbiased KL gradient (DeepSeek-AI, 2025,
            "DeepSeek-V3.2", arXiv:2512.02556; TRL's `use_bias_correction_kl`, on by default).
        weights: optional detached (B, T) factor on each token's clipped term (not the KL
            term), e.g. `looprl.algorithms.core.behaviour_weights` for decoupled PPO.
        global_count: the minibatch's token or sequence count, so that micro-batch losses
            add up to the minibatch's (see `looprl.algorithms.core.aggregate_loss`).

    Returns:
        The scalar loss and detached metrics `loss`, `pg_loss`, `clipfrac`, `approx_kl`,
        `ratio_mean`, and `kl` (the token-mean k3 estimate) when `ref_logprobs` is given.
    """
    if advantages.dim() != 1:
        raise ValueError(f"Expected advantages of shape (B,), actually: {tuple(advantages.shape)}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # (B, 1)
    pg_losses = torch.max(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))  # (B, T)
    if weights is not None:
        pg_losses = pg_losses * weights
    per_token_loss = pg_losses
    kl = None if ref_logprobs is None else kl_k3(logprobs, ref_logprobs)  # (B, T)
    if kl_coef != 0.0:
        per_token_loss = pg_losses + kl_coef * (kl * ratio if kl_importance_weight else kl)
    loss = aggregate_loss(per_token_loss, mask, loss_agg, max_len, global_count)
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        own = loss if global_count is None else aggregate_loss(per_token_loss, mask, loss_agg, max_len)
        names = ["loss", "pg_loss", "clipfrac", "approx_kl", "ratio_mean"] + ([] if kl is None else ["kl"])
        values = [
            own,
            aggregate_loss(pg_losses, mask, loss_agg, max_len),
            masked_mean(clipped.to(mask.dtype), mask),
            # k3 estimator of KL(old || new) (Schulman, "Approximating KL divergence").
            masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            masked_mean(ratio, mask),
        ] + ([] if kl is None else [masked_mean(kl, mask)])
        metrics = dict(zip(names, torch.stack(values).tolist()))  # one copy to the host, not one per metric
    return loss, metrics


class GRPO:
    """GRPO as the trainer uses it (see `looprl.algorithms.LOOP` for the interface).

    Args:
        cfg: the `algorithm` section of the run config (a `GRPOConfig`).
        max_len: the Dr. GRPO divisor when `cfg.max_len` is None (the episode token limit).
    """

    def __init__(self, cfg, max_len: int):
        self.cfg = cfg
        self.max_len = cfg.max_len or max_len
        self.aggregates_over = aggregation_unit(cfg.loss_agg)
        self.needs_reference = cfg.kl_coef > 0

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        advantages = group_advantages(rewards, self.cfg.scale)
        keep = torch.ones_like(rewards, dtype=torch.bool)
        if self.cfg.filter_zero_variance:
            keep &= ~zero_variance_groups(rewards)[:, None]
        return advantages, keep

    def loss(self, inputs: PolicyLossInputs, global_count: float | None = None):
        """The GRPO loss on a batch (see `looprl.algorithms.loop.LOOP.loss`)."""
        return grpo_loss(
            inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.mask, self.cfg.clip_low,
            self.cfg.clip_high, loss_agg=self.cfg.loss_agg, max_len=self.max_len,
            ref_logprobs=inputs.ref_logprobs, kl_coef=self.cfg.kl_coef, weights=inputs.weights,
            global_count=global_count,
        )
