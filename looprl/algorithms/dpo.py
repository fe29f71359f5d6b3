"""DPO: direct preference optimisation on pairs of trajectories.

Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is Secretly a
Reward Model" (arXiv:2305.18290), eq. 7. With h = log pi(y_w|x)/pi_ref(y_w|x) -
log pi(y_l|x)/pi_ref(y_l|x) (sequence log-probabilities, sums over tokens):

    L_DPO = -log sigmoid(beta * h)                                  (eq. 7)

and beta * log pi/pi_ref is the implicit reward of a response (section 4). Label smoothing
is conservative DPO (Mitchell, 2023, "A note on DPO with noisy preferences"): with
probability eps the label is flipped, so the loss is
-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).

For agents, a pair is the best and the worst of the K rollouts of one task (by return),
and a trajectory's log-probability sums only its sampled tokens: tool outputs and other
observations are under the loss mask's zeros. Conventions match TRL's DPOTrainer
(trl 1.16), checked by tests/algorithms/test_dpo_trl.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from looprl.algorithms.core import masked_sum


def sequence_logps(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) of each sequence: the sum of its masked token log-probs, (B, T) -> (B,)."""
    return masked_sum(token_logprobs, mask.to(token_logprobs.dtype), dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO eq. 7 (with cDPO's label smoothing), mean over the B pairs.

    Args:
        policy_chosen_logps: (B,) sequence log-prob sums of the preferred responses.
        policy_rejected_logps: (B,) of the dispreferred ones.
        ref_chosen_logps: (B,) the same under the reference policy.
        ref_rejected_logps: (B,)
        beta: the KL-strength beta; also scales the implicit rewards.
        label_smoothing: probability that a preference label is flipped, in [0, 0.5).

    Returns:
        The scalar loss and detached metrics, means over pairs: `rewards/chosen`,
        `rewards/rejected` (beta * log pi/pi_ref), `rewards/margins`, `rewards/accuracies`
        (share of pairs whose chosen reward is strictly larger).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"Expected label_smoothing in [0, 0.5), actually: {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    loss = losses.mean()
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        metrics = {
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        }
    return loss, metrics


def best_worst_pairs(rewards: torch.Tensor) -> list[tuple[int, int, int]]:
    """(g, best_k, worst_k) for each group of a (G, K) tensor of returns.

    Groups whose best and worst returns tie give no preference and are skipped; among
    equal returns the first index wins (both for best and for worst).

    >>> best_worst_pairs(torch.tensor([[0.0, 1.0, 1.0], [2.0, 2.0, 2.0], [3.0, 0.0, 0.0]]))
    [(0, 1, 0), (2, 0, 1)]
    """
    best = rewards.argmax(-1).tolist()  # torch returns the first index of the max
    worst = rewards.argmin(-1).tolist()
    return [
        (g, b, w) for g, (b, w) in enumerate(zip(best, worst))
        if rewards[g, b] > rewards[g, w]
    ]
