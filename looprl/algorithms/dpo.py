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

IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", arXiv:2310.12036, eq. 17) regresses the log-ratio difference onto 1/(2 beta)
instead: L_IPO = (h - 1/(2 beta))^2, with each sequence's log-ratio averaged over its
tokens, as TRL does (the IPO authors' normalisation).

RPO (Pang et al., 2024, "Iterative Reasoning Preference Optimization", arXiv:2404.19733,
eq. 1) adds the chosen response's length-normalised NLL to the DPO loss, so that iterated
DPO raises the likelihood of good responses instead of only lowering that of bad ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from looprl.algorithms.core import PairLossInputs, batch_mean, masked_sum


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
    global_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO eq. 7 (with cDPO's label smoothing), mean over the B pairs (or their sum /
    `global_count`, the pairs of the whole minibatch).

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
    loss = batch_mean(losses, global_count)
    return loss, _reward_metrics(beta * chosen_logratios, beta * rejected_logratios)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 0.1,
    global_count: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """IPO eq. 17 on token-averaged log-ratios, mean over the B pairs (or their sum /
    `global_count`); (B,) tensors in.

    `chosen_tokens` / `rejected_tokens` are the (B,) numbers of sampled tokens. Metrics
    are those of `dpo_loss` (rewards are beta * the summed log-ratios, as in TRL).

    >>> ipo_loss(*torch.tensor([[-2.0], [-4.0], [-3.0], [-3.0], [2.0], [1.0]]), beta=0.5)[0].item()
    0.25
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    loss = batch_mean((h - 1 / (2 * beta)) ** 2, global_count)
    return loss, _reward_metrics(beta * chosen_logratios, beta * rejected_logratios)


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor,
               global_count: float | None = None) -> torch.Tensor:
    """RPO's NLL term: -log pi(y_w|x) / |y_w|, mean over the B pairs (or sum / `global_count`).

    >>> chosen_nll(torch.tensor([-4.0, -1.0]), torch.tensor([2.0, 1.0])).item()
    1.5
    """
    return batch_mean(-(chosen_logps / chosen_tokens.clamp(min=1)), global_count)


def _reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
    }


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


class DPO:
    """Online DPO as the trainer uses it (looprl/train/recipes/online_dpo.py runs the step).

    Args:
        cfg: the `algorithm` section of the run config (a `DPOConfig`).
    """

    needs_reference = True
    aggregates_over = "pairs"

    def __init__(self, cfg):
        self.cfg = cfg

    def pairs(self, rewards: torch.Tensor) -> list[tuple[int, int, int]]:
        """(g, chosen_k, rejected_k) per group of a (G, K) tensor of returns; ties give none."""
        return best_worst_pairs(rewards)

    def loss(self, pairs: PairLossInputs, global_count: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The configured loss on B pairs; `global_count` is the number of pairs in the
        minibatch (None: B). Metrics are means over these B pairs."""
        p = pairs
        if self.cfg.loss_type == "ipo":
            loss, metrics = ipo_loss(p.chosen_logps, p.rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps,
                                     p.chosen_tokens, p.rejected_tokens, self.cfg.beta, global_count)
        else:
            loss, metrics = dpo_loss(p.chosen_logps, p.rejected_logps, p.ref_chosen_logps, p.ref_rejected_logps,
                                     self.cfg.beta, self.cfg.label_smoothing, global_count)
        if self.cfg.nll_coef > 0:
            nll = chosen_nll(p.chosen_logps, p.chosen_tokens, global_count)
            loss = loss + self.cfg.nll_coef * nll
            metrics["nll"] = chosen_nll(p.chosen_logps, p.chosen_tokens).item()
        return loss, metrics
