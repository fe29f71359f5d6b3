"""Trajectories to padded tensors, and the policy's logprobs on them."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from looprl.train.logprobs import default_chunk_tokens, token_logprobs_chunked, token_logprobs_full
from looprl.train.ulysses import split_token_logprobs
from looprl.types import Trajectory


@dataclass
class Batch:
    """Right-padded tensors; everything after `input_ids` is aligned with the targets
    `input_ids[:, 1:]` (position t holds what predicts token t+1).

    Attributes:
        input_ids: (B, L)
        attention_mask: (B, L)
        loss_mask: (B, L-1) 1 on sampled target tokens.
        old_logprobs: (B, L-1) behaviour logprobs of the targets.
        advantages: (B,)
        segments: (B, L-1) turn index of each target token (for per-turn ratios).
        proximal_logprobs: (B, L-1) proximal-policy logprobs of the targets (decoupled
            PPO), or None when the trajectories carry none.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    segments: torch.Tensor
    proximal_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device` (built on the host, moved in one copy per tensor)."""
        return Batch(*(None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=True)
                       for f in dataclasses.fields(self)))


def collate(trajectories: Sequence[Trajectory], pad_id: int, advantages: Sequence[float] | None = None,
            device: torch.device | str | None = None) -> Batch:
    """Pad `trajectories` into a `Batch` on `device` (the policy's; None: the CPU)."""
    batch, length = len(trajectories), max(len(t.input_ids) for t in trajectories)
    host = {"device": "cpu"}  # built on the host, whatever torch's default device, then moved in one copy each
    with_proximal = [t.proximal_logprobs is not None for t in trajectories]
    if any(with_proximal) and not all(with_proximal):
        raise ValueError("Expected proximal_logprobs on every trajectory of a batch or on none, "
                         f"actually on {sum(with_proximal)} of {batch}")

    # Filled row by row in numpy, then wrapped: a slice assignment from a list is far cheaper
    # than a tensor per row (the values, float32-rounded alike, are the same).
    input_ids = np.full((batch, length), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, length), dtype=np.int64)
    loss_mask = np.zeros((batch, length), dtype=np.float32)
    logprobs = np.zeros((batch, length), dtype=np.float32)
    segments = np.zeros((batch, length), dtype=np.int64)
    proximal = np.zeros((batch, length), dtype=np.float32) if all(with_proximal) else None
    for row, traj in enumerate(trajectories):
        n = len(traj.input_ids)
        input_ids[row, :n] = traj.input_ids
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = traj.loss_mask
        logprobs[row, :n] = traj.behaviour_logprobs
        if proximal is not None:
            proximal[row, :n] = traj.proximal_logprobs
        for turn, (start, end) in enumerate(traj.turn_spans):
            segments[row, start:end] = turn
    input_ids, attention_mask, loss_mask, logprobs, segments = map(
        torch.from_numpy, (input_ids, attention_mask, loss_mask, logprobs, segments))
    proximal = None if proximal is None else torch.from_numpy(proximal)
    adv = torch.tensor(list(advantages) if advantages is not None else [0.0] * batch, dtype=torch.float32, **host)
    out = Batch(input_ids, attention_mask, loss_mask[:, 1:], logprobs[:, 1:], adv, segments[:, 1:],
                None if proximal is None else proximal[:, 1:])
    return out if device is None or torch.device(device).type == "cpu" else out.to(device)


def policy_logprobs(model, batch: Batch, temperature: float = 1.0, sequence_group=None) -> torch.Tensor:
    """Logprobs (B, L-1) of each target token under `model`, with the sampling temperature.

    Through `token_logprobs_chunked`: the LM head projects a chunk of tokens at a time,
    so the (B, L, vocabulary) logits never exist at once, in the forward or the backward.
    A batch whose logits fit in one chunk takes the plain full-logits pass instead: one
    chunk saves no memory, and the plain pass is the one earlier runs were measured with
    (its gradients equal the chunked ones only to float rounding). With a `sequence_group` of
    several ranks, they split each row (`ulysses.split_token_logprobs`; inside `split_sequences`).
    """
    if sequence_group is not None:
        return split_token_logprobs(model, batch.input_ids, sequence_group, temperature)
    targets = batch.input_ids[:, 1:]
    if targets.numel() <= default_chunk_tokens(model):
        return token_logprobs_full(model, batch.input_ids, batch.attention_mask, targets, temperature)
    return token_logprobs_chunked(model, batch.input_ids, batch.attention_mask, targets, temperature)


def micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split rows into groups of similar length whose padded size stays under `max_tokens`.

    Sorting by length before packing means one long trajectory no longer pads a whole
    minibatch (as verl's dynamic batch size does). A row longer than the budget gets a
    group of its own.

    >>> micro_batches([5, 100, 6, 90], max_tokens=200)
    [[0, 2], [3, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@torch.no_grad()
def reference_logprobs(model, batch: Batch, temperature: float = 1.0, sequence_group=None) -> torch.Tensor:
    """Logprobs under the reference policy: the same model with its LoRA adapter disabled,
    so the reference costs a forward pass, not a second copy of the weights."""
    with reference_policy(model):
        return policy_logprobs(model, batch, temperature, sequence_group)


@contextlib.contextmanager
def reference_policy(model) -> Iterator[None]:
    """Inside the block, `model` (a LoRA policy) computes as its reference: its adapter disabled."""
    from peft import PeftModel

    from looprl.train.zero import unwrap

    policy = unwrap(model)  # a DeepSpeed engine's (the forward still goes through the engine)
    if not isinstance(policy, PeftModel):
        raise ValueError("A KL penalty needs lora.enabled=true: the reference is the model with its adapter disabled")
    with policy.disable_adapter():
        yield
