"""The training loop: SFT warm-start, then RL steps of rollout -> advantages -> PPO epochs.

One RL step (LOOP's Algorithm 1; GRPO differs only in its advantages and loss):
  1. sample `tasks_per_step` task seeds, play `group_size` episodes of each;
  2. leave-one-out advantages per group; drop rollouts with |A| < threshold;
  3. `epochs` passes of shuffled minibatches, one optimizer step per minibatch;
  4. the engine shares the model, so it samples the new weights next step (version + 1).
Checkpoints hold the trainable weights, optimizer, sampler and RNG state, so a resumed
run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from looprl.algorithms import build_algorithm
from looprl.algorithms.core import behaviour_weights, masked_mean
from looprl.algorithms.grpo import kl_k3
from looprl.config import DPOConfig, RunConfig, from_dict, to_yaml
from looprl.envs import make_env
from looprl.rollout.collect import collect_step_groups
from looprl.rollout.engine import HFEngine
from looprl.rollout.sampler import TaskSampler
from looprl.train.async_loop import AsyncRollouts, running
from looprl.train.batch import collate, micro_batches, policy_logprobs, reference_logprobs
from looprl.train.checkpoint import CheckpointManager, restore_rng_state
from looprl.train.dpo_online import build_reference, dpo_step
from looprl.train.evaluate import describe_change, evaluate_episodes, paired_change, summarize
from looprl.train.exit import build_exit_sampler, exit_step, expert_env_factory
from looprl.train.export import save_model_folder
from looprl.train.metrics import (MetricsLogger, init_wandb, read_jsonl, rollout_metrics, step_timings,
                                  write_text_atomic)
from looprl.train.models import merge_lora
from looprl.train.policy import build_policy, load_trainable_state, trainable_state
from looprl.train.progress import RunProgress
from looprl.train.sft import expert_pool, run_sft
from looprl.train.stop import GracefulStop
from looprl.types import Episode, Trajectory


def train(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run a whole recipe; returns the evaluation results (also in `results.json`)."""
    make_env(cfg.env.id, **cfg.env.kwargs).close()  # fail fast on a bad env id or kwargs
    if isinstance(cfg.algorithm, DPOConfig) and cfg.algorithm.dataset is not None:
        from looprl.train.dpo_offline import train_offline_dpo  # imports TRL: only for offline DPO

        return train_offline_dpo(cfg, resume)
    model, tokenizer, run_dir, engine = start_run(cfg)
    algorithm = build_algorithm(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
    )
    sampler = build_exit_sampler(cfg) if cfg.exit.enabled else TaskSampler(cfg.seed)  # ExIt: buffer in "sampler"
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep_last=cfg.train.keep_checkpoints)
    state: dict[str, Any] = {"step": 0, "results": {}}

    latest = checkpoints.latest() if resume else None
    if resume and latest is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    if latest is not None:
        state = _restore(latest, model, optimizer, sampler, engine)
    wandb_run = init_wandb(cfg.wandb.enabled, cfg.wandb.mode, cfg.wandb.project, cfg.name, run_dir,
                           cfg.model_dump(mode="json"))
    logger = MetricsLogger(run_dir, resume_step=state["step"] if latest else None, wandb_run=wandb_run)
    progress = RunProgress(enabled=cfg.progress)

    def save(blocking: bool = False) -> None:
        checkpoints.save(
            state["step"], model_state=trainable_state(model), optimizer_state=optimizer.state_dict(),
            blocking=blocking,
            extra={"policy_version": engine.version, "config": cfg.model_dump(mode="json"),
                   "sampler": sampler.state_dict(), "results": state["results"]},
        )

    with progress:
        if latest is None:
            _warm_start(cfg, model, tokenizer, engine, logger, progress, state, run_dir)
        step_fn = _step_fn(cfg, model, run_dir, fresh=latest is None)  # before the first save: DPO's reference
        if latest is None:
            save()
        start = time.perf_counter()
        progress.start("rl", cfg.train.steps, completed=state["step"])
        with GracefulStop() as stop, running(step_fn, stop, progress):  # async: stops its producers on exit
            while state["step"] < cfg.train.steps and not stop.requested:
                if cfg.train.max_seconds is not None and time.perf_counter() - start >= cfg.train.max_seconds:
                    break
                metrics = step_fn(cfg, algorithm, model, tokenizer, engine, optimizer, sampler)
                if metrics is None:  # async rollouts: stopped while waiting for a batch, nothing trained
                    break
                state["step"] += 1
                logger.log(metrics, state["step"])
                progress.advance("rl", metrics)
                if state["step"] % cfg.train.save_every == 0:
                    save()
        state["results"]["rl"] = {"steps": state["step"], "seconds": time.perf_counter() - start}
        if stop.requested:
            progress.note(f"stopped at step {state['step']}: saving a checkpoint; continue with --resume")
            save(blocking=True)
            logger.close()
            raise KeyboardInterrupt
        state["results"]["final"] = _evaluate_all(cfg, engine, tokenizer, logger, progress, state["step"], "final",
                                                  run_dir)
        state["results"].pop("change", None)  # a resumed run's checkpoint may hold an earlier one
        if change := _paired_changes(cfg, logger, progress, state["step"], run_dir):
            state["results"]["change"] = change
        save(blocking=True)
    logger.close()
    write_text_atomic(run_dir / "results.json", json.dumps(state["results"], indent=2))
    return state["results"]


def _step_fn(cfg: RunConfig, model, run_dir: Path, fresh: bool):
    """`rl_step`, ExIt's step, the async rollouts' step, or online DPO's step with its reference policy
    (taken after the warm-start)."""
    if cfg.exit.enabled:
        return exit_step
    if cfg.rollout.mode == "async":
        return AsyncRollouts(cfg, run_dir)
    if not isinstance(cfg.algorithm, DPOConfig):
        return rl_step
    return functools.partial(dpo_step, reference=build_reference(cfg, model, run_dir, fresh))


def rl_step(cfg: RunConfig, algorithm, model, tokenizer, engine: HFEngine, optimizer,
            sampler: TaskSampler) -> dict[str, float]:
    """One RL step: rollouts, the algorithm's advantages, epochs of minibatch updates."""
    t0 = time.perf_counter()
    groups = collect_step_groups(cfg, engine, tokenizer, sampler.sample(cfg.rollout.tasks_per_step))
    t1 = time.perf_counter()
    rewards = torch.tensor([[t.reward for t in g] for g in groups])  # (G, K), one return per episode
    advantages, keep = algorithm.advantages(rewards)  # (G, K), (G, K)
    kept = chunk_rows(groups, advantages, keep)
    train_metrics = _update(cfg, algorithm, model, tokenizer, optimizer, kept)
    engine.update_weights()
    t2 = time.perf_counter()
    return {
        **rollout_metrics(groups, rewards, kept=int(keep.sum().item())),
        **train_metrics,
        "policy_version": engine.version,
        **step_timings(groups, t0, t1, t2),
    }


def chunk_rows(groups: list[list[Trajectory | Episode]], advantages: torch.Tensor,
               keep: torch.Tensor) -> list[tuple[Trajectory, float]]:
    """The training rows of the kept episodes: every chunk with its episode's advantage.

    Advantages are per episode (a group is K episodes of one task); an episode played
    with a context window trains as several chunks, which all get its advantage. A
    `Trajectory`'s only chunk is itself.

    Args:
        groups: (G, K) episodes.
        advantages: (G, K) per-episode advantages.
        keep: (G, K) mask of the episodes to train on.
    """
    return [(chunk, a) for g, adv, k in zip(groups, advantages.tolist(), keep.tolist())
            for episode, a, ok in zip(g, adv, k) if ok for chunk in episode.chunks]


def _update(cfg: RunConfig, algorithm, model, tokenizer, optimizer,
            kept: list[tuple[Trajectory, float]]) -> dict[str, float]:
    """`epochs` passes of shuffled minibatches over the kept rollouts, one optimizer step each."""
    if not kept:
        return {"train/optimizer_steps": 0}
    update = cfg.algorithm
    params = [p for p in model.parameters() if p.requires_grad]
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(update.epochs):
        order = torch.randperm(len(kept)).tolist()
        for i in range(0, len(order), update.minibatch_size):
            rows = [kept[j] for j in order[i:i + update.minibatch_size]]
            optimizer.zero_grad(set_to_none=True)
            for group, weight in _micro_groups(algorithm, rows, update.micro_batch_tokens):
                metrics = _micro_step(cfg, algorithm, model, tokenizer, [rows[g] for g in group], weight)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * weight
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + torch.nn.utils.clip_grad_norm_(
                params, cfg.optim.grad_clip).item()
            optimizer.step()
            steps += 1
    return {**{f"train/{k}": v / steps for k, v in sums.items()},
            "train/optimizer_steps": steps, "train/lr": cfg.optim.lr}


def _micro_groups(algorithm, rows: list[tuple[Trajectory, float]], max_tokens: int):
    """Length-sorted micro-batches with their share of the minibatch loss.

    A micro-batch loss is a mean over its rows or over its sampled tokens (the
    algorithm says which); weighting it by its share of the minibatch's rows or tokens
    makes the accumulated gradient that of the whole minibatch.
    """
    groups = micro_batches([len(t.input_ids) for t, _ in rows], max_tokens)
    if algorithm.aggregates_over == "tokens":
        sizes = [sum(rows[g][0].num_sampled_tokens for g in group) for group in groups]
    else:
        sizes = [len(group) for group in groups]
    total = max(sum(sizes), 1)
    return [(group, size / total) for group, size in zip(groups, sizes)]


def _micro_step(cfg: RunConfig, algorithm, model, tokenizer, rows: list[tuple[Trajectory, float]], weight: float):
    """Forward and backward one micro-batch; returns its loss metrics."""
    batch = collate([t for t, _ in rows], tokenizer.pad_token_id, [a for _, a in rows])
    logprobs = policy_logprobs(model, batch, cfg.rollout.temperature)
    extra, old_logprobs, decoupled = {}, batch.old_logprobs, {}
    if algorithm.needs_reference:
        extra["ref_logprobs"] = reference_logprobs(model, batch, cfg.rollout.temperature)
    if batch.proximal_logprobs is not None:
        # Decoupled PPO: clip around the proximal policy, weight by pi_prox / pi_behaviour.
        old_logprobs = batch.proximal_logprobs
        extra["weights"] = behaviour_weights(batch.proximal_logprobs, batch.old_logprobs, batch.loss_mask,
                                             cfg.rollout.behaviour_weight_cap)
        decoupled = _behaviour_weight_metrics(extra["weights"], batch, cfg.rollout.behaviour_weight_cap)
    loss, metrics = algorithm.loss(logprobs, old_logprobs, batch.advantages, batch.loss_mask, batch.segments,
                                   **extra)
    (loss * weight).backward()
    return {**metrics, **decoupled}


def _behaviour_weight_metrics(weights: torch.Tensor, batch, cap: float | None) -> dict[str, float]:
    """How far the proximal policy is from the behaviour one, on the sampled tokens."""
    mask = batch.loss_mask
    over_cap = torch.zeros_like(mask) if cap is None else (batch.proximal_logprobs - batch.old_logprobs > math.log(cap))
    return {
        "behaviour_weight_mean": masked_mean(weights, mask).item(),
        "behaviour_capped_frac": masked_mean(over_cap.to(mask.dtype), mask).item(),
        # k3 estimate of KL(behaviour || proximal), sampled from the behaviour: how stale the rollouts were.
        "behaviour_kl": masked_mean(kl_k3(batch.old_logprobs, batch.proximal_logprobs), mask).item(),
    }


def start_run(cfg: RunConfig):
    """What every training run starts with: threads, seeds, the policy, the run folder
    with its `config.yaml`, and the rollout engine over the policy as the config says.

    Returns:
        `(model, tokenizer, run_dir, engine)`.
    """
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model, tokenizer = build_policy(cfg)
    # Only a run that can start gets a folder (and a resumed one keeps its files).
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    engine = HFEngine(model, tokenizer, max_batch_size=cfg.rollout.max_batch_size,
                      turn_wait_s=cfg.rollout.turn_wait_s, prefix_cache=cfg.rollout.prefix_cache)
    return model, tokenizer, run_dir, engine


def _warm_start(cfg: RunConfig, model, tokenizer, engine, logger, progress, state, run_dir: Path) -> None:
    """SFT on oracle episodes (saved to `run_dir/warmstart` if asked), then evaluate the warm-started policy."""
    shutil.rmtree(run_dir / "eval", ignore_errors=True)  # a fresh run over an old run folder
    if cfg.sft.steps:
        rng = np.random.default_rng(cfg.seed)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=cfg.sft.episodes)]
        pool = expert_pool(expert_env_factory(cfg), tokenizer, seeds)
        progress.start("sft", cfg.sft.steps)

        def on_step(step: int, loss: float) -> None:
            progress.advance("sft", {"sft/loss": loss})
            if step % 50 == 0:
                logger.log({"sft/loss": loss, "sft/step": step}, 0)

        stats = run_sft(model, pool, tokenizer.pad_token_id, steps=cfg.sft.steps, batch_size=cfg.sft.batch_size,
                        lr=cfg.sft.lr, rng=rng, max_seconds=cfg.sft.max_seconds, on_step=on_step)
        logger.log({f"sft/{k}": v for k, v in stats.items()}, 0)
        state["results"]["sft"] = stats
        engine.update_weights()
        if cfg.sft.save:
            save_warm_start(model, tokenizer, run_dir / "warmstart", lora=cfg.lora.enabled)
    if cfg.eval.before_rl:
        state["results"]["warmstart"] = _evaluate_all(cfg, engine, tokenizer, logger, progress, 0, "warmstart",
                                                      run_dir)


def save_warm_start(model, tokenizer, out: Path, lora: bool) -> None:
    """The warm-started policy as a plain transformers folder, so that RL runs (another
    algorithm, learning rate, seed) can start from it with `model.name` and no SFT."""
    plain = merge_lora(copy.deepcopy(model)) if lora else model  # merge a copy: training goes on
    shutil.rmtree(out, ignore_errors=True)  # a fresh run over an old run folder
    save_model_folder(plain, tokenizer, out)


def _evaluate_all(cfg: RunConfig, engine, tokenizer, logger, progress, step: int, tag: str,
                  run_dir: Path) -> dict[str, Any]:
    """Evaluate in each mode; each episode's record goes to `run_dir/eval/{tag}_{mode}.jsonl`."""
    if cfg.eval.episodes == 0:
        return {}
    env_kwargs = {**cfg.env.kwargs, **cfg.eval.env_kwargs}
    results = {}
    for mode, temperature in _eval_modes(cfg).items():
        progress.note(f"evaluating {tag} policy ({mode}, {cfg.eval.episodes} episodes)")
        records = evaluate_episodes(engine, tokenizer, cfg.env.id, env_kwargs, cfg.eval.episodes,
                                    temperature=temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                                    max_tokens=cfg.env.max_tokens, context_window=cfg.rollout.context_window)
        write_text_atomic(run_dir / "eval" / f"{tag}_{mode}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        results[mode] = summarize(records)
        logger.log({f"eval/{tag}/{mode}/{k}": v for k, v in results[mode].items()}, step)
    progress.note(f"{tag}: " + ", ".join(f"{m} success {r['success_rate']:.1%}" for m, r in results.items()))
    return results


def _eval_modes(cfg: RunConfig) -> dict[str, float]:
    return {"sampled": cfg.rollout.temperature} | ({"greedy": 0.0} if cfg.eval.greedy else {})


def _paired_changes(cfg: RunConfig, logger, progress, step: int, run_dir: Path) -> dict[str, Any]:
    """Per mode, the final policy's paired change from the warm start on the same tasks
    (when this run evaluated both)."""
    changes = {}
    for mode in _eval_modes(cfg):
        before, after = (run_dir / "eval" / f"{tag}_{mode}.jsonl" for tag in ("warmstart", "final"))
        if cfg.eval.episodes == 0 or not (before.exists() and after.exists()):
            continue
        try:
            changes[mode] = paired_change(read_jsonl(before), read_jsonl(after))
        except ValueError as e:  # e.g. resumed with another eval.episodes: report no change, keep the run
            progress.note(f"no paired {mode} change from the warm start: {e}")
            continue
        logger.log({f"eval/change/{mode}/{k}": v for k, v in changes[mode].items()}, step)
        progress.note(f"{mode} change from the warm start: {describe_change(changes[mode])}")
    return changes


def _restore(path: Path, model, optimizer, sampler: TaskSampler, engine: HFEngine) -> dict[str, Any]:
    ckpt = CheckpointManager.load(path)
    load_trainable_state(model, ckpt.model_state)
    optimizer.load_state_dict(ckpt.optimizer_state)
    sampler.load_state_dict(ckpt.extra["sampler"])
    restore_rng_state(ckpt.rng_state)
    engine.version = ckpt.extra["policy_version"]
    return {"step": ckpt.step, "results": ckpt.extra.get("results", {})}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_of_checkpoint(path: Path) -> RunConfig:
    """The run config stored in a checkpoint's manifest."""
    return from_dict(CheckpointManager.verify(path)["extra"]["config"])
