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
from typing import Any

import torch

from looprl.rollout.collect import drop_metrics
from looprl.train.batch import policy_logprobs, reference_logprobs
from looprl.train.metrics import rollout_metrics, step_timings
from looprl.train.recipes import Stateless
from looprl.train.update import update_on_pairs

REFERENCE_FILE = "dpo_reference.pt"


class Reference:
    """Token log-probs under the reference policy (see the module docstring).

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


def build_reference(cfg, model, run_dir: Path, fresh: bool, write: bool = True) -> Reference:
    """The reference for a run: built now (`fresh`, after the warm-start; saved if `write`)
    or reloaded on resume."""
    if cfg.lora.enabled:
        return Reference(model)
    path = Path(run_dir) / REFERENCE_FILE
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    if fresh and write:
        tmp = path.with_suffix(".tmp")
        torch.save(frozen.state_dict(), tmp)
        os.replace(tmp, path)
    elif fresh:
        pass  # another rank writes it
    elif not path.is_file():
        raise FileNotFoundError(f"--resume: the DPO reference weights {str(path)!r} are missing; "
                                "they are written when the run starts and cannot be rebuilt")
    else:
        frozen.load_state_dict(torch.load(path, weights_only=True, map_location=next(model.parameters()).device))
    return Reference(model, frozen)


class OnlineDPO(Stateless):
    """One online DPO step: rollouts, best/worst pairs, `epochs` passes of pair minibatches.

    Built after the warm-start, which is what a full fine-tune's reference freezes.
    """

    data_parallel = True  # several ranks: each plays its share of the tasks, all train (looprl.train.parallel)

    def __init__(self, ctx, fresh: bool):
        self.player = ctx.player()
        self.reference = build_reference(ctx.cfg, ctx.model, ctx.run_dir, fresh, write=ctx.parallel.is_main)

    def step(self, ctx) -> dict[str, Any]:
        cfg = ctx.cfg
        t0 = time.perf_counter()
        collection = ctx.collect(self.player, ctx.sampler.sample(cfg.rollout.tasks_per_step), cfg.rollout.group_size)
        groups = collection.episodes
        t1 = time.perf_counter()
        rewards = torch.tensor([[t.reward for t in g] for g in groups], device="cpu")  # (G, K)
        pairs = [(groups[g][b], groups[g][w]) for g, b, w in ctx.algorithm.pairs(rewards)]
        train_metrics = update_on_pairs(cfg, ctx.algorithm, ctx.model, ctx.tokenizer.pad_token_id, ctx.optimizer,
                                        self.reference, pairs, parallel=ctx.parallel,
                                        before_step=ctx.before_optimizer_step)
        ctx.publish()
        t2 = time.perf_counter()
        return {
            **rollout_metrics(groups, rewards),
            **drop_metrics(collection.dropped),
            "rollout/pairs": len(pairs),
            "rollout/kept_frac": 2 * len(pairs) / rewards.numel(),
            **train_metrics,
            "policy_version": ctx.version,
            **step_timings(groups, t0, t1, t2),
        }
