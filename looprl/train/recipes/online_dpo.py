"""Online (iterative) DPO: each step, rollouts -> best/worst pair per group -> DPO epochs.

Online DPO samples its preference pairs from the current policy instead of a fixed
dataset (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback",
arXiv:2402.04792; Xiong et al., 2024, "Iterative Preference Learning from Human
Feedback", arXiv:2312.11456). Here the judge is the environment: of the K rollouts of a
task, the one with the highest return is chosen and the one with the lowest is rejected
(groups whose returns all tie give no pair). The loss is `looprl.algorithms.dpo`'s, on
sequence log-probs that sum only the sampled tokens of each trajectory (loss mask 1):
the prompt and the tool outputs are the same kind of context for both and are not the
policy's choices.

The reference policy:
  - with `lora.enabled`, the model with its adapter disabled (one extra forward, no
    second copy of the weights); the config forbids a warm-start then, since SFT would
    train the adapter and leave the reference un-warm-started;
  - with full fine-tuning, a frozen copy of the weights at the end of the warm-start,
    saved as `run_dir/dpo_reference.pt` so a resumed run keeps the same reference. It
    costs one more copy of the model in memory and on disk, which is nothing for the
    tiny recipes and the price TRL's DPOTrainer pays too.
The reference log-probs are computed once per step, before the updates (the reference
does not move; TRL's `precompute_ref_log_probs`).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from looprl.algorithms.dpo import sequence_logps
from looprl.rollout.collect import collect_step_groups
from looprl.train.batch import collate, policy_logprobs, reference_logprobs
from looprl.train.metrics import rollout_metrics, step_timings

REFERENCE_FILE = "dpo_reference.pt"

# The algorithm's metric names -> the names the run logs.
METRIC_NAMES = {"rewards/chosen": "train/chosen_reward", "rewards/rejected": "train/rejected_reward",
            "rewards/margins": "train/reward_margin", "rewards/accuracies": "train/reward_accuracy"}


class Reference:
    """Sequence log-probs under the reference policy (see the module docstring).

    Args:
        model: the policy being trained.
        frozen: a frozen copy of its initial weights, or None to disable the LoRA adapter.
    """

    def __init__(self, model, frozen=None):
        self.model, self.frozen = model, frozen

    @torch.no_grad()
    def logprobs(self, batch, temperature: float) -> torch.Tensor:
        if self.frozen is None:
            return reference_logprobs(self.model, batch, temperature)
        return policy_logprobs(self.frozen, batch, temperature)


def build_reference(cfg, model, run_dir: Path, fresh: bool) -> Reference:
    """The reference for a run: built now (`fresh`, after the warm-start) or reloaded on resume."""
    if cfg.lora.enabled:
        return Reference(model)
    path = Path(run_dir) / REFERENCE_FILE
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    if fresh:
        tmp = path.with_suffix(".tmp")
        torch.save(frozen.state_dict(), tmp)
        os.replace(tmp, path)
    elif not path.is_file():
        raise FileNotFoundError(f"--resume: the DPO reference weights {str(path)!r} are missing; "
                                "they are written when the run starts and cannot be rebuilt")
    else:
        frozen.load_state_dict(torch.load(path, weights_only=True))
    return Reference(model, frozen)


def dpo_step(cfg, algorithm, model, tokenizer, engine, optimizer, sampler, reference: Reference) -> dict[str, float]:
    """One online DPO step: rollouts, best/worst pairs, `epochs` passes of pair minibatches."""
    t0 = time.perf_counter()
    groups = collect_step_groups(cfg, engine, tokenizer, sampler.sample(cfg.rollout.tasks_per_step))
    t1 = time.perf_counter()
    rewards = torch.tensor([[t.reward for t in g] for g in groups])  # (G, K)
    pairs = [(groups[g][b], groups[g][w]) for g, b, w in algorithm.pairs(rewards)]
    train_metrics = update_on_pairs(cfg, algorithm, model, tokenizer.pad_token_id, optimizer, reference, pairs)
    engine.update_weights()
    t2 = time.perf_counter()
    return {
        **rollout_metrics(groups, rewards),
        "rollout/pairs": len(pairs),
        "rollout/kept_frac": 2 * len(pairs) / rewards.numel(),
        **train_metrics,
        "policy_version": engine.version,
        **step_timings(groups, t0, t1, t2),
    }


def update_on_pairs(cfg, algorithm, model, pad_id: int, optimizer, reference: Reference,
                    pairs: Sequence[tuple]) -> dict[str, float]:
    """`epochs` passes of shuffled pair minibatches, one optimizer step each."""
    if not pairs:
        return {"train/optimizer_steps": 0}
    update, temperature = cfg.algorithm, cfg.rollout.temperature
    ref = episode_logps(lambda b: reference.logprobs(b, temperature), [t for p in pairs for t in p], pad_id,
                        update.micro_batch_tokens).view(-1, 2)  # (P, 2): chosen, rejected
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(update.epochs):
        order = torch.randperm(len(pairs)).tolist()
        for i in range(0, len(order), update.minibatch_size):
            rows = order[i:i + update.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            for group in _micro_groups([pairs[j] for j in rows], update.micro_batch_tokens):
                idx = [rows[g] for g in group]
                weight = len(idx) / len(rows)
                metrics = _micro_step(cfg, algorithm, model, pad_id, [pairs[j] for j in idx], ref[idx], weight)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * weight
            sums["train/grad_norm"] = sums.get("train/grad_norm", 0.0) + torch.nn.utils.clip_grad_norm_(
                params, cfg.optim.grad_clip).item()
            optimizer.step()
            steps += 1
    return {**{k: v / steps for k, v in sums.items()}, "train/optimizer_steps": steps, "train/lr": cfg.optim.lr}


def _micro_step(cfg, algorithm, model, pad_id: int, pairs: Sequence[tuple], ref: torch.Tensor, weight: float):
    """Forward chosen and rejected of some pairs together, backward their share of the loss."""
    episodes = [t for p in pairs for t in p]  # chosen_0, rejected_0, chosen_1, ...
    logps = episode_logps(lambda b: policy_logprobs(model, b, cfg.rollout.temperature), episodes, pad_id,
                          max_tokens=None).view(-1, 2)  # (P, 2)
    tokens = torch.tensor([float(t.num_sampled_tokens) for t in episodes]).view(-1, 2)
    loss, metrics = algorithm.loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], tokens[:, 0], tokens[:, 1])
    (loss * weight).backward()
    # `train/dpo_loss` is the whole loss (with RPO's NLL term when nll_coef > 0; `train/nll` then).
    return {"train/dpo_loss": loss.item(), **{METRIC_NAMES.get(k, f"train/{k}"): v for k, v in metrics.items()}}


def episode_logps(token_logprobs_fn, episodes: Sequence, pad_id: int, max_tokens: int | None) -> torch.Tensor:
    """(N,) log pi(episode): the sum over each episode's chunks of their sampled-token logprobs.

    `token_logprobs_fn(batch) -> (B, L-1)`; with `max_tokens` the chunks go through it in
    length-sorted groups of at most that many padded tokens, else all at once.
    """
    chunks = [(i, c) for i, ep in enumerate(episodes) for c in ep.chunks]
    lengths = [len(c.input_ids) for _, c in chunks]
    groups = _pack(lengths, [1] * len(chunks), max_tokens) if max_tokens else [list(range(len(chunks)))]
    out = torch.zeros(len(episodes))
    for group in groups:
        batch = collate([chunks[j][1] for j in group], pad_id)
        seq = sequence_logps(token_logprobs_fn(batch), batch.loss_mask)  # (B,)
        out = out.index_add(0, torch.tensor([chunks[j][0] for j in group]), seq)
    return out


def _micro_groups(pairs: Sequence[tuple], max_tokens: int) -> list[list[int]]:
    """Pairs grouped so that each forward (both sides, all chunks) pads to at most `max_tokens`."""
    lengths = [max(len(c.input_ids) for t in p for c in t.chunks) for p in pairs]
    rows = [sum(len(t.chunks) for t in p) for p in pairs]
    return _pack(lengths, rows, max_tokens)


def _pack(lengths: Sequence[int], rows: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Length-sorted groups whose padded size (rows x longest) stays under `max_tokens`;
    an item over the budget gets a group of its own.

    >>> _pack([5, 100, 6, 90], [2, 2, 2, 2], max_tokens=400)
    [[0, 2], [3, 1]]
    """
    groups: list[list[int]] = []
    used = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (used + rows[i]) * lengths[i] <= max_tokens:
            groups[-1].append(i)
            used += rows[i]
        else:
            groups.append([i])
            used = rows[i]
    return groups
