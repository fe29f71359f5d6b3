"""How trained weights reach the samplers: one `WeightSync.publish(state, version)` contract.

The run owns the policy version; after each optimizer step it publishes the trained
tensors and the new version to whatever samples its rollouts:

- `SharedWeights`: an engine that samples from the trainer's own model object (the
  synchronous `hf` engine): the weights are already there, only the version moves;
- `SnapshotEngine.publish`: a private copy, updated between two `generate` calls (the
  local asynchronous producers);
- `looprl.rollout.ray_producers.RayActorPool.publish`: Ray rollout actors, through the
  object store;
- `looprl.rollout.vllm_engine.VLLMEngine.publish`: vLLM's weights (the adapter with LoRA);
- `looprl.rollout.openai_engine.OpenAIEngine.publish`: a remote server (`looprl serve`
  loads them from a file; others are refused with a message).

`SnapshotEngine` below is an `HFEngine` over its own copy of the policy, so rollouts
never see half-updated weights.

With asynchronous rollouts the trainer updates its model while the engine samples.
`SnapshotEngine` samples from a deep copy taken when it is built; after an optimizer
step the trainer pushes the tensors it trains (`push`: every weight in a full
fine-tune, only the adapter tensors with LoRA) and the new version number. A push waits
for the `generate` call in progress and happens between two calls, never during one.

In-flight episodes continue on the new weights (partial rollouts, as in AReaL and
PipelineRL): every completion is tagged with the version that sampled it, each token's
behaviour logprob comes from the weights that sampled it (so the PPO ratio stays a
correct importance weight), and an episode's `policy_version` is the oldest version
behind any of its turns, which is what the staleness bound is checked against.
"""

from __future__ import annotations

import copy as _copy
import threading
from typing import Protocol, Sequence

import torch

from looprl.rollout.engine import Completion, GenerationRequest, HFEngine


class WeightSync(Protocol):
    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Serve `state` (parameter name -> tensor: the trained ones) as policy `version`."""


class SharedWeights:
    """The sync of an engine that shares the trainer's model: nothing to copy."""

    def __init__(self, engine):
        self.engine = engine

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.engine.version = version  # prefixes cached under older versions are dropped by it


class SnapshotEngine(HFEngine):
    """`HFEngine` sampling from a private copy of `model`, updated by `push`.

    Args:
        model: the trainer's policy (plain or peft-wrapped); it is copied, not shared.
        tokenizer: its tokenizer.
        version: the policy version of `model`'s current weights.
        max_batch_size: the most sequences in one `generate` call.
        copy: copy `model` (False: `model` is private to the engine already, as in a
            Ray rollout actor that built its own).
        prefix_cache: keep each episode's keys and values between its turns (a push
            drops them: they were computed by the old weights).
        shared_prefix: first turns that start alike prefill their common prefix once.
    """

    def __init__(self, model, tokenizer, version: int, max_batch_size: int = 64, copy: bool = True,
                 prefix_cache: bool = True, shared_prefix: bool = False):
        snapshot = _copy.deepcopy(model) if copy else model
        snapshot.requires_grad_(False)
        snapshot.eval()
        super().__init__(snapshot, tokenizer, max_batch_size=max_batch_size, prefix_cache=prefix_cache,
                         shared_prefix=shared_prefix)
        self.version = version
        self.pushed_tensors = 0  # tensors moved by the last push (tests check LoRA moves only adapters)
        self._lock = threading.Lock()
        self._params = dict(snapshot.named_parameters())

    def generate_batch(self, requests: Sequence[GenerationRequest], keys=None) -> list[Completion]:
        with self._lock:
            return super().generate_batch(requests, keys)

    def push(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Copy `state` (parameter name -> tensor, e.g. the trainer's trainable
        parameters) into the snapshot and set its version; waits for a running `generate`."""
        unknown = set(state) - set(self._params)
        if unknown:
            raise ValueError(f"Weight sync: the engine's model has no parameters {sorted(unknown)[:5]}")
        with self._lock, torch.no_grad():
            for name, value in state.items():
                self._params[name].copy_(value)
            self.version = version
            self.pushed_tensors = len(state)

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """`WeightSync.publish`: the same as `push`."""
        self.push(state, version)

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        raise TypeError("SnapshotEngine receives weights through push(state, version), which names the version")
