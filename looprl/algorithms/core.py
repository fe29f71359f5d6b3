"""Pure tensor functions shared by the algorithms: masked reductions, logprobs, the
clipped policy-gradient surrogate, and the typed inputs of the losses. No model, no
config: tensors in, tensors out."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PolicyLossInputs:
    """What a policy-gradient loss (LOOP, GRPO) reads, for one (micro-)batch of B rows.

    Attributes:
        logprobs: (B, T) under the policy being trained (with grad).
        old_logprobs: (B, T) under the behaviour policy (or the proximal one, decoupled PPO).
        advantages: (B,) one advantage per row, applied to every token.
        mask: (B, T) 1 on sampled tokens.
        turns: (B, T) the turn index of each token (for per-turn ratios).
        ref_logprobs: (B, T) under the reference policy, when the loss has a KL term.
        weights: detached (B, T) factor on each token's clipped term (decoupled PPO).
    """

    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    turns: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    weights: torch.Tensor | None = None


@dataclass
class PairLossInputs:
    """What a preference loss (DPO, IPO) reads, for B pairs: (B,) sequence log-probs of
    the chosen and rejected sides under the policy and the reference, and their (B,)
    numbers of sampled tokens."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def batch_mean(x: torch.Tensor, global_count: float | None = None) -> torch.Tensor:
    """Mean of (B,) per-row values, or their sum / `global_count` (the rows of the whole
    minibatch this batch is part of), so that micro-batch losses add up to the minibatch's."""
    return x.mean() if global_count is None else x.sum() / global_count


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is 1 (0 where the mask is empty)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def sequence_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean within each sequence, then mean over sequences: (B, T) -> ()."""
    return masked_mean(x, mask, dim=-1).mean()


def aggregate_loss(
    x: torch.Tensor, mask: torch.Tensor, loss_agg: str, max_len: int | None = None,
    global_count: float | None = None,
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar; the modes are verl's `loss_agg_mode` names.

    - "token-mean": sum over every masked token of the batch / their number (DAPO).
    - "seq-mean-token-mean": token-mean within each sequence, then mean over sequences
      (GRPO, Shao et al., 2024, eq. 3).
    - "seq-mean-token-sum-norm": each sequence's token-sum / `max_len`, then mean over
      sequences (Dr. GRPO's constant normaliser, Liu et al., 2025).

    The normaliser sits here, as in verl's `agg_loss`: with `global_count` (the number of
    masked tokens, for "token-mean", or of sequences, for the others, in the whole
    minibatch this batch is a part of) the sum is divided by it instead of by this
    batch's own count, so the losses of a minibatch's micro-batches add up to the
    minibatch's loss, and their gradients to its gradient, by construction.
    """
    if loss_agg == "token-mean":
        return masked_mean(x, mask) if global_count is None else masked_sum(x, mask) / global_count
    if loss_agg == "seq-mean-token-mean":
        return batch_mean(masked_mean(x, mask, dim=-1), global_count)
    if loss_agg == "seq-mean-token-sum-norm":
        if max_len is None or max_len <= 0:
            raise ValueError(f"'seq-mean-token-sum-norm' needs a positive max_len, actually: {max_len}")
        return batch_mean(masked_sum(x, mask, dim=-1) / max_len, global_count)
    raise ValueError(
        "Expected loss_agg 'token-mean', 'seq-mean-token-mean' or 'seq-mean-token-sum-norm', "
        f"actually: {loss_agg!r}"
    )


def aggregation_unit(loss_agg: str) -> str:
    """What a loss reduced by `loss_agg` averages over, "tokens" or "sequences": the unit of
    the `global_count` the training loop passes to `aggregate_loss`."""
    return "tokens" if loss_agg == "token-mean" else "sequences"


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[ids] without materialising the full log-softmax: (B, T, V) -> (B, T)."""
    logits = logits.float()
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def segment_mean(x: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the masked tokens of each segment, broadcast back to its tokens.

    Args:
        x: (B, T) values.
        mask: (B, T) 1 where a token counts.
        segments: (B, T) non-negative segment index of each token within its row
            (e.g. the turn number); its value where `mask` is 0 does not matter.
    """
    batch, _ = x.shape
    n_seg = int(segments.max().item()) + 1 if segments.numel() else 1
    flat = (torch.arange(batch, device=x.device)[:, None] * n_seg + segments.clamp(min=0)).flatten()
    mask = mask.to(x.dtype)
    sums = torch.zeros(batch * n_seg, dtype=x.dtype, device=x.device).index_add(0, flat, (x * mask).flatten())
    counts = torch.zeros(batch * n_seg, dtype=x.dtype, device=x.device).index_add(0, flat, mask.flatten())
    return (sums / counts.clamp(min=1))[flat].view_as(x)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    segments: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    loss_agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    global_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al., 2017, eq. 7) with a per-token ratio.

    The ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO's clip-higher when they
    differ). With `segments`, each token uses the geometric-mean ratio of its segment
    (a turn or the whole trajectory, as in GSPO) instead of its own. The loss is reduced
    by `aggregate_loss`: by default the token-mean within each sequence, then the mean
    over sequences.

    Args:
        logprobs: (B, T) under the policy being trained.
        old_logprobs: (B, T) under the behaviour policy.
        advantages: (B,) one advantage per sequence, applied to every token.
        mask: (B, T) 1 on sampled tokens.
        clip_low: lower clip range.
        clip_high: upper clip range.
        segments: optional (B, T) segment index per token.
        weights: optional detached (B, T) factor on each token's clipped term, e.g.
            `behaviour_weights` when `old_logprobs` are the proximal policy's.
        loss_agg: how tokens are reduced; see `aggregate_loss`.
        max_len: the constant divisor of "seq-mean-token-sum-norm".
        global_count: the minibatch's token or sequence count (see `aggregate_loss`).

    Returns:
        The scalar loss and detached metrics `pg_loss`, `clipfrac`, `approx_kl`,
        `ratio_mean`: means over this batch (`pg_loss` normalised by its own count).
    """
    mask = mask.to(logprobs.dtype)
    token_log_ratio = logprobs - old_logprobs  # (B, T)
    log_ratio = token_log_ratio if segments is None else segment_mean(token_log_ratio, mask, segments)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]  # (B, 1)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = torch.max(pg_loss1, pg_loss2)
    if weights is not None:
        per_token = per_token * weights
    pg_loss = aggregate_loss(per_token, mask, loss_agg, max_len, global_count)
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
        own = pg_loss if global_count is None else aggregate_loss(per_token, mask, loss_agg, max_len)
        values = torch.stack([
            own,
            masked_mean(clipped.to(mask.dtype), mask),
            # k3 estimator of KL(old || new) (Schulman, "Approximating KL divergence").
            masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, mask),
            masked_mean(ratio, mask),
        ]).tolist()  # one copy to the host per batch, not one per metric
    return pg_loss, dict(zip(("pg_loss", "clipfrac", "approx_kl", "ratio_mean"), values))


def behaviour_weights(
    proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, cap: float | None
) -> torch.Tensor:
    """Per-token importance weights pi_prox / pi_behav of decoupled PPO (Hilton et al., 2022,
    "Batch size-invariance for policy optimization"; AReaL, Fu et al., 2025): (B, T) -> (B, T), detached.

    With stale rollouts the clipped ratio is taken against the proximal policy (the
    weights the update starts from), so the trust region is around the current policy,
    and this weight corrects for the samples having come from the older behaviour
    policy. Tokens whose weight exceeds `cap` get weight 0 (they still count in the
    loss's denominator), as AReaL's `behav_imp_weight_cap` does; None keeps every token.
    """
    with torch.no_grad():
        weights = torch.exp(proximal_logprobs - behaviour_logprobs) * mask.to(proximal_logprobs.dtype)
        if cap is not None:
            weights = torch.where(weights <= cap, weights, torch.zeros_like(weights))
    return weights
