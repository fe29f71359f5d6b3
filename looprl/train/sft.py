"""Warm-start SFT on oracle trajectories, so RL starts from a policy that sometimes succeeds.

Own loop rather than TRL's SFTTrainer: the data are already token-exact trajectories
with a loss mask (the same layout RL trains on), so the loss is a masked token NLL.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from looprl.algorithms.core import masked_mean, masked_sum
from looprl.rollout.agent import ObservationTemplater, expert_trajectory
from looprl.train.batch import collate, micro_batches, policy_logprobs
from looprl.types import Trajectory


def expert_pool(make_env: Callable[[], object], tokenizer, seeds: Sequence[int]) -> list[Trajectory]:
    """Oracle episodes for `seeds`, tokenized as rollouts are."""
    templater = ObservationTemplater(tokenizer)
    pool = []
    for seed in seeds:
        env = make_env()
        pool.append(expert_trajectory(env, tokenizer, templater, seed=seed))
        env.close()
    return pool


def sft_loss(model, trajectories: Sequence[Trajectory], pad_id: int) -> torch.Tensor:
    """Mean NLL of the masked (assistant) tokens."""
    batch = collate(trajectories, pad_id, device=next(model.parameters()).device)
    return -masked_mean(policy_logprobs(model, batch), batch.loss_mask)


def sft_backward(model, trajectories: Sequence[Trajectory], pad_id: int, max_tokens: int | None) -> float:
    """Backward of `sft_loss` over `trajectories`, in micro-batches of at most `max_tokens`
    padded tokens (gradients accumulate; each micro-batch's summed NLL is divided by the
    whole batch's masked tokens, so the gradient is the one-pass one to float rounding).
    None: one pass. Returns the loss."""
    groups = [list(range(len(trajectories)))] if max_tokens is None else micro_batches(
        [len(t.input_ids) for t in trajectories], max_tokens)
    if len(groups) == 1:  # the plain pass, bit for bit as the tiny recipes were measured
        loss = sft_loss(model, trajectories, pad_id)
        loss.backward()
        return loss.item()
    device = next(model.parameters()).device
    batches = [collate([trajectories[i] for i in group], pad_id, device=device) for group in groups]
    total = max(float(sum(batch.loss_mask.sum() for batch in batches)), 1.0)
    loss_sum = torch.zeros((), device=device)
    for batch in batches:
        loss = -masked_sum(policy_logprobs(model, batch), batch.loss_mask) / total
        loss.backward()
        loss_sum += loss.detach()  # one host sync per step, not one per micro-batch
    return loss_sum.item()


def run_sft(
    model,
    pool: Sequence[Trajectory],
    pad_id: int,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
    max_seconds: float | None = None,
    micro_batch_tokens: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train on random minibatches of `pool` (each in micro-batches of at most
    `micro_batch_tokens` padded tokens; None: one pass); returns the final `loss`, `steps`
    and `seconds`."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start, loss_value, step = time.perf_counter(), float("nan"), 0
    for step in range(1, steps + 1):
        rows = rng.choice(len(pool), size=min(batch_size, len(pool)), replace=False)
        optimizer.zero_grad(set_to_none=True)
        loss_value = sft_backward(model, [pool[i] for i in rows], pad_id, micro_batch_tokens)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(step, loss_value)
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            break
    return {"loss": loss_value, "steps": step, "seconds": time.perf_counter() - start}
