"""DeepSpeed ZeRO-1/2/3 (`train.backend: deepspeed`, `train.zero_stage`): what `Parallel` does
differently from FSDP2 when DeepSpeed shards the policy.

- **Engine.** `deepspeed.initialize` wraps the policy and the run's own torch AdamW
  (`zero_allow_untested_optimizer`). Gradient accumulation is the caller's
  (`managed_gradient_accumulation: false`): every `loss.backward()` only accumulates and
  `engine.step()` is the boundary, so a minibatch takes as many micro-batches as it
  needs and the loss keeps the normaliser `minibatch_update` gives it (the minibatch's
  global count over the world size; DeepSpeed averages gradients over ranks, as FSDP does).
  The engine clips to the global norm (`gradient_clipping`) inside `step()`.
- **Forward.** Through the engine (the run's `ctx.model` is the engine once sharded): its
  forward hooks the backward that follows, which is how a plain `loss.backward()` reaches
  ZeRO's gradient reduction. The chunked log-prob pass, which calls the body and the head
  apart, would bypass it, so the full-logits path is taken (`looprl.train.logprobs`).
- **Full state.** The trainable parameters, whole (ZeRO-3: gathered with
  `deepspeed.zero.GatheredParameters`), and the optimizer state in the one-process format
  (`deepspeed.utils.safe_get_full_optimizer_state` per parameter), so checkpoints are
  one-process files written by rank 0 and any world size resumes them.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

import torch

log = logging.getLogger("looprl.train")

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def deepspeed_config(stage: int, grad_clip: float, world: int) -> dict:
    """The engine's config: ZeRO `stage`, float32, one nominal micro-batch per rank and step
    (looprl plans the micro-batches itself: see the module docstring)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
               stage: int, grad_clip: float, world: int):
    """The DeepSpeed engine over `model` and its optimizer (ZeRO's wrapper of `build_optimizer(model)`)."""
    import deepspeed

    # The warm start's last gradients do not belong to RL (and ZeRO-3's zero_grad fails on
    # CPU gradients it did not make: it records them on a CUDA stream).
    model.zero_grad(set_to_none=True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model),
                                                   config=deepspeed_config(stage, grad_clip, world))
    log.info("DeepSpeed ZeRO-%d over %d ranks; the log-prob pass takes the full-logits path", stage, world)
    return engine, optimizer


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The policy inside a DeepSpeed engine (which forwards attribute access to it), else `model`."""
    deepspeed = sys.modules.get("deepspeed")  # imported by the runs that use it, and only by them
    return model.module if deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine) else model


def trainable_params(module: torch.nn.Module, names: Sequence[str]) -> list[torch.nn.Parameter]:
    params = dict(module.named_parameters())
    return [params[name] for name in names]


def full_state(module: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors `names` of the engine's `module`, whole, on every rank (ZeRO-3: a collective)."""
    import deepspeed

    params = trainable_params(module, names)
    with deepspeed.zero.GatheredParameters(params):  # ZeRO-1/2: the parameters are whole already
        return {name: p.detach().clone() for name, p in zip(names, params)}


def full_optimizer_state(module: torch.nn.Module, optimizer, names: Sequence[str]) -> dict:
    """AdamW's state in the one-process format (parameters numbered in `names`' order), on
    every rank (a collective per tensor)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(names)))}
              for g in optimizer.optimizer.param_groups]
    if len(groups) != 1:
        raise ValueError(f"Expected the one parameter group build_optimizer makes, actually: {len(groups)}")
    steps = [s["step"] for s in optimizer.optimizer.state.values() if "step" in s]
    if not steps:  # no step taken yet
        return {"state": {}, "param_groups": groups}
    step = steps[0]
    state = {i: {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).detach().clone()
                                          for k in ADAM_MOMENTS}}
             for i, p in enumerate(trainable_params(module, names))}
    return {"state": state, "param_groups": groups}


def load_optimizer_state(module: torch.nn.Module, optimizer, state: dict, names: Sequence[str], stage: int) -> None:
    """Load a one-process AdamW state (see `full_optimizer_state`) into ZeRO's partitions."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

    if not state["state"]:
        return
    inner = optimizer.optimizer
    # This rank's flat float32 partitions, which AdamW steps (and keys its state by).
    flats = optimizer.fp32_partitioned_groups_flat if stage == 3 else optimizer.single_partition_of_fp32_groups
    if not all("exp_avg" in inner.state[flat] for flat in flats):
        # AdamW creates its state at its first step: create it (zero moments) without stepping,
        # and (ZeRO-1/2) point each parameter's view of it there, as ZeRO does after a step.
        for flat in flats:
            inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
        if stage < 3:
            for params, flat in zip(optimizer.bit16_groups, flats):
                lazy_init_hp_params_optimizer_state(params, flat, inner.state)
    for i, p in enumerate(trainable_params(module, names)):
        for key in ADAM_MOMENTS:
            safe_set_full_optimizer_state(p, state["state"][i][key], key)
    step = next(iter(state["state"].values()))["step"]
    for flat in flats:
        inner.state[flat]["step"] = step.clone()
