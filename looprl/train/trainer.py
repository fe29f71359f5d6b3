"""The training loop: one story for every recipe.

`train(cfg)` claims the run folder, builds the `RunContext` (policy, optimizer, sampler,
engine and weight sync, logger, progress), restores the latest checkpoint on `--resume`
or warm-starts a fresh run (SFT on oracle episodes, then a held-out evaluation), and
then calls `recipe.step(ctx)` until the run is done, logging every step and saving a
checkpoint every `train.save_every` steps; at the end it evaluates the final policy and
reports its paired change from the warm start. The recipe (`looprl.train.recipes`) is
chosen by the config; this module never names one.

Checkpoints hold the trainable weights, the optimizer, the sampler, the recipe's own
state, the RNG states and the policy version, so a resumed run continues exactly where
the checkpoint left it. One process writes them with `CheckpointManager`; several ranks
with `ShardedCheckpointer` (each rank its shards, in the background); `--resume` reads
either (`looprl.train.any_checkpoint`), in any number of processes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from looprl.config import RunConfig, from_dict
from looprl.envs import make_env
from looprl.rollout.sampler import TaskSampler
from looprl.train import sharded_checkpoint
from looprl.train.any_checkpoint import is_sharded, verify_checkpoint
from looprl.train.checkpoint import CheckpointManager, NoCheckpoints, capture_rng_state, restore_rng_state
from looprl.train.context import RunContext, env_factory, open_run
from looprl.train.evaluate import evaluate_run, paired_changes
from looprl.train.export import save_model_folder
from looprl.train.metrics import MetricsLogger, init_wandb, write_text_atomic
from looprl.train.models import merge_lora
from looprl.train.parallel import rng_to_json
from looprl.train.policy import load_trainable_state, trainable_state
from looprl.train.progress_log import ProgressLog, stderr_if_not_a_terminal
from looprl.train.recipes import Interrupted, RecipeEntry, select_recipe
from looprl.train.resume import apply_optimizer_settings
from looprl.train.sft import expert_pool, run_sft
from looprl.train.stop import GracefulStop

log = logging.getLogger("looprl.train")

# RL steps in a row without an optimizer step before the run says why it is not learning.
IDLE_STEPS_WARNING = 10


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False,
          recipe: RecipeEntry | type | None = None) -> dict[str, Any]:
    """Run a whole recipe; returns the evaluation results (also in `results.json`).

    Args:
        cfg: the run config.
        resume: continue from the run folder's latest complete checkpoint.
        overwrite: replace what the run folder holds (else a non-empty folder is refused).
        recipe: a recipe class to run instead of the registered one the config selects
            (a variant of it: benchmarks and tests extend recipes this way).
    """
    make_env(cfg.env.id, **cfg.env.kwargs).close()  # fail fast on a bad env id or kwargs
    entry = select_recipe(cfg)
    if entry.run is not None and recipe is None:
        return entry.run()(cfg, resume=resume, overwrite=overwrite)
    recipe_cls = recipe or entry.load()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not getattr(recipe_cls, "data_parallel", False):
        raise ValueError(f"The {entry.name} recipe does not train data-parallel yet (WORLD_SIZE > 1); "
                         "the on-policy (LOOP, GRPO) and online DPO recipes do: launch this one as one process")
    if (cfg.train.sequence_parallel > 1 or cfg.train.sequence_parallel_adaptive) \
            and not getattr(recipe_cls, "sequence_parallel", False):
        raise ValueError(f"The {entry.name} recipe does not split sequences (train.sequence_parallel > 1 or "
                         "train.sequence_parallel_adaptive); the on-policy (LOOP, GRPO) recipes do: set "
                         "train.sequence_parallel=1 and train.sequence_parallel_adaptive=false")
    make_sampler = getattr(recipe_cls, "sampler", lambda c: TaskSampler(c.seed))
    ctx = open_run(cfg, resume, overwrite, sampler=make_sampler(cfg))  # checks what --resume may change
    checkpoints = _checkpointer(ctx)
    latest = ctx.resume_from
    recipe_state, lines, optimizer_state, load_shards = (_restore(latest, ctx) if latest is not None
                                                         else (None, None, None, None))
    if ctx.parallel.is_main:
        ctx.logger = MetricsLogger(ctx.run_dir, resume_step=ctx.step if latest else None, resume_lines=lines,
                                   wandb_run=init_wandb(cfg.wandb.enabled, cfg.wandb.mode, cfg.wandb.project,
                                                        cfg.name, ctx.run_dir, cfg.model_dump(mode="json")))
    else:
        ctx.logger = QuietLogger()  # rank 0 writes the run folder

    with ctx.progress:
        if latest is None:
            sft_warm_start(ctx, expert_env=getattr(recipe_cls, "expert_env", env_factory)(cfg))
        steps = recipe_cls(ctx, fresh=latest is None)  # after the warm start: DPO freezes its reference here
        if recipe_state is not None:
            steps.load_state_dict(recipe_state)
        ctx.shard(optimizer_state)  # several ranks: FSDP2 over the warm-started policy (one process: nothing)
        if load_shards is not None:
            load_shards()  # a sharded checkpoint loads into the sharded policy and optimizer
        if latest is None:
            save(ctx, checkpoints, steps)  # the warm start is kept, whatever happens during its evaluation
        if ctx.step == 0 and cfg.eval.before_rl and "warmstart" not in ctx.results:
            try:
                ctx.results["warmstart"] = _evaluate(ctx, 0, "warmstart")
                _warn_if_never_solved(ctx, ctx.results["warmstart"])
            except KeyboardInterrupt:
                checkpoints.wait()  # the step-0 checkpoint is complete: --resume evaluates it again
                raise
            save(ctx, checkpoints, steps)  # step 0 again, now with the warm start's evaluation
        start, idle = time.perf_counter(), 0
        ctx.progress.start("rl", cfg.train.steps, completed=ctx.step)
        progress_log = ProgressLog(ctx.run_dir / "train.log", cfg.train.steps,
                                   cfg.train.log_every if ctx.parallel.is_main else 0, start_step=ctx.step,
                                   echo=stderr_if_not_a_terminal() if cfg.progress else None)
        with GracefulStop() as ctx.stop:
            try:
                while ctx.step < cfg.train.steps and not _agreed_stop(ctx):
                    out_of_time = cfg.train.max_seconds is not None and time.perf_counter() - start >= cfg.train.max_seconds
                    if ctx.parallel.broadcast_object(out_of_time):  # rank 0's clock decides for every rank
                        break
                    try:
                        metrics = steps.step(ctx)
                    except Interrupted:  # stopped while the step waited for its data: nothing trained
                        break
                    ctx.step += 1
                    idle = 0 if metrics.get("train/optimizer_steps", 1) else idle + 1
                    if idle == IDLE_STEPS_WARNING and ctx.parallel.is_main:
                        log.warning(f"{idle} RL steps in a row made no optimizer step (up to step {ctx.step}): every "
                                    "group's episodes got the same reward, so every advantage is 0 (the policy "
                                    "solves ~none or ~all of its tasks); warm-start it with SFT or pick tasks it "
                                    "solves sometimes")
                    ctx.logger.log(metrics, ctx.step)
                    ctx.progress.advance("rl", metrics)
                    progress_log.step(ctx.step, metrics)
                    if cfg.eval.every and ctx.step % cfg.eval.every == 0 and ctx.step < cfg.train.steps:
                        # Before the step's checkpoint, which then holds it. Seeded sampling draws
                        # from its own streams: training goes on exactly as without it.
                        ctx.results.setdefault("during", {})[str(ctx.step)] = _evaluate(
                            ctx, ctx.step, f"step_{ctx.step:05d}")
                    checkpoints.poll()  # a failed background save stops the run now, saying why
                    if ctx.step % cfg.train.save_every == 0:
                        save(ctx, checkpoints, steps)
            finally:
                steps.close()
        ctx.results["rl"] = {"steps": ctx.step, "seconds": time.perf_counter() - start}
        if _agreed_stop(ctx):
            ctx.progress.note(f"stopped at step {ctx.step}: saving a checkpoint; continue with --resume")
            save(ctx, checkpoints, steps, blocking=True)
            ctx.logger.close()
            raise KeyboardInterrupt
        before_eval = ctx.logger.lines  # resuming a finished run evaluates it again and replaces these records
        ctx.results["final"] = _evaluate(ctx, ctx.step, "final")
        ctx.results.pop("change", None)  # a resumed run's checkpoint may hold an earlier one
        change = paired_changes(cfg, ctx.logger, ctx.progress, ctx.step, ctx.run_dir) if ctx.parallel.is_main else None
        if change := ctx.parallel.broadcast_object(change):
            ctx.results["change"] = change
        save(ctx, checkpoints, steps, blocking=True, metrics_lines=before_eval)
    if ctx.parallel.sharded_checkpoints:
        checkpoints.close()  # frees its staging thread and buffers
    ctx.logger.close()
    if ctx.parallel.is_main:
        write_text_atomic(ctx.run_dir / "results.json", json.dumps(ctx.results, indent=2))
    return ctx.results


def _evaluate(ctx: RunContext, step: int, label: str) -> dict[str, Any]:
    """The held-out evaluation of the policy, by rank 0 (on its own sampling copy); every
    rank returns its results."""
    results = None
    if ctx.parallel.is_main:
        results = evaluate_run(ctx.cfg, ctx.engine, ctx.tokenizer, ctx.logger, ctx.progress, step, label, ctx.run_dir)
    return ctx.parallel.broadcast_object(results)


def _warn_if_never_solved(ctx: RunContext, results: dict[str, Any]) -> None:
    """Say so when the policy RL starts from solves no held-out task: the policy-gradient
    recipes learn from reward differences inside a group, and it would produce none."""
    sampled = results.get("sampled") or {}
    if ctx.parallel.is_main and sampled.get("episodes") and sampled.get("success_rate") == 0:
        log.warning(f"The policy solves none of {sampled['episodes']} held-out tasks before RL (sampled): LOOP and "
                    "GRPO learn from reward differences within a group, and a policy that never succeeds makes "
                    "none; warm-start it with SFT (sft.steps) or start from easier tasks")


def _agreed_stop(ctx: RunContext) -> bool:
    """Ctrl-C or SIGTERM asked this run to stop (with several ranks: asked any of them)."""
    if not ctx.parallel.distributed:
        return ctx.stop.requested
    return any(ctx.parallel.gather_objects(ctx.stop.requested))


class QuietLogger:
    """The metrics logger of the ranks that do not write the run folder."""

    lines = 0

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def sft_warm_start(ctx: RunContext, expert_env) -> None:
    """SFT on oracle episodes (saved to `run_dir/warmstart` if asked)."""
    cfg = ctx.cfg
    if cfg.sft.steps:
        rng = np.random.default_rng(cfg.seed)
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=cfg.sft.episodes)]
        pool = expert_pool(expert_env, ctx.tokenizer, seeds)
        ctx.progress.start("sft", cfg.sft.steps)

        def on_step(step: int, loss: float) -> None:
            ctx.progress.advance("sft", {"sft/loss": loss})
            if step % 50 == 0:
                ctx.logger.log({"sft/loss": loss, "sft/step": step}, 0)

        stats = run_sft(ctx.model, pool, ctx.tokenizer.pad_token_id, steps=cfg.sft.steps,
                        batch_size=cfg.sft.batch_size, lr=cfg.sft.lr, rng=rng, max_seconds=cfg.sft.max_seconds,
                        micro_batch_tokens=cfg.sft.micro_batch_tokens,
                        on_step=on_step)
        ctx.logger.log({f"sft/{k}": v for k, v in stats.items()}, 0)
        ctx.results["sft"] = stats
        ctx.publish()
        if cfg.sft.save and ctx.parallel.is_main:
            save_warm_start(ctx.model, ctx.tokenizer, ctx.run_dir / "warmstart", lora=cfg.lora.enabled)


def save_warm_start(model, tokenizer, out: Path, lora: bool) -> None:
    """The warm-started policy as a plain transformers folder, so that RL runs (another
    algorithm, learning rate, seed) can start from it with `model.name` and no SFT."""
    plain = merge_lora(copy.deepcopy(model)) if lora else model  # merge a copy: training goes on
    shutil.rmtree(out, ignore_errors=True)
    save_model_folder(plain, tokenizer, out)


def _checkpointer(ctx: RunContext) -> CheckpointManager | NoCheckpoints | sharded_checkpoint.ShardedCheckpointer:
    """Where the run's checkpoints go. One process: `CheckpointManager`. Several ranks: a
    `ShardedCheckpointer` on every rank, whose snapshot the recipes' updates wait for
    before their next optimizer step (`ctx.before_optimizer_step`); with DeepSpeed, rank 0's
    `CheckpointManager` (the other ranks only help gather the state)."""
    directory, keep = ctx.run_dir / "checkpoints", {"keep_last": ctx.cfg.train.keep_checkpoints,
                                                     "keep_every": ctx.cfg.train.keep_every or None}
    if not ctx.parallel.sharded_checkpoints:
        return CheckpointManager(directory, **keep) if ctx.parallel.is_main else NoCheckpoints()
    checkpoints = sharded_checkpoint.ShardedCheckpointer(directory, **keep)
    ctx.before_optimizer_step = checkpoints.wait_staged
    return checkpoints


def save(ctx: RunContext, checkpoints: CheckpointManager | sharded_checkpoint.ShardedCheckpointer, recipe,
         blocking: bool = False, metrics_lines: int | None = None) -> None:
    """Checkpoint the run; `metrics_lines`: the records a run resumed from it keeps (default: all so far).

    With several ranks every rank saves its shards of the model and optimizer, and its
    own RNG states, in the background (`ShardedCheckpointer`; any world size resumes it)."""
    extra = {"policy_version": ctx.version, "config": ctx.cfg.model_dump(mode="json"),
             "sampler": ctx.sampler.state_dict(), "recipe": recipe.state_dict(), "results": ctx.results,
             "metrics_lines": ctx.logger.lines if metrics_lines is None else metrics_lines}
    if ctx.parallel.sharded_checkpoints:
        checkpoints.save(ctx.step, ctx.model, ctx.optimizer, extra)
        if blocking:
            checkpoints.wait()
        return
    if ctx.parallel.distributed:  # DeepSpeed: every rank gathers, rank 0 writes, with every rank's random state
        extra["rank_rng"] = ctx.parallel.gather_objects(rng_to_json(capture_rng_state()))
    checkpoints.save(ctx.step, model_state=ctx.trained_state(), optimizer_state=ctx.optimizer_state(),
                     blocking=blocking, extra=extra)


def _restore(path: Path, ctx: RunContext) -> tuple[dict[str, Any], int | None, dict | None,
                                                   Callable[[], None] | None]:
    """Load a checkpoint into the run; returns the recipe's state, the metrics records to
    keep, and, with several ranks, the optimizer state (one-process format) to load once
    the policy is sharded, or what loads a sharded checkpoint once it is.

    The config's optimizer settings replace the checkpoint's (a resumed run may change
    its learning rate: `looprl.train.resume`)."""
    if is_sharded(path) and ctx.parallel.backend == "deepspeed":
        raise ValueError(f"--resume: {path} is a sharded (FSDP2) checkpoint, which train.backend=deepspeed does not "
                         "load: resume it with train.backend=fsdp2 or in one process")
    if is_sharded(path):
        return _restore_sharded(path, ctx)
    ckpt = CheckpointManager.load(path)
    load_trainable_state(ctx.model, ckpt.model_state)
    later = ckpt.optimizer_state if ctx.parallel.distributed else None
    if later is None:
        ctx.optimizer.load_state_dict(ckpt.optimizer_state)
        apply_optimizer_settings(ctx.optimizer, ctx.cfg)
    ctx.sampler.load_state_dict(ckpt.extra["sampler"])
    restore_rng_state(ckpt.rng_state)
    ctx.parallel.restore_rank_rng(ckpt.extra.get("rank_rng"), ctx.cfg.seed)
    ctx.step, ctx.results = ckpt.step, ckpt.extra.get("results", {})
    ctx.version = ckpt.extra["policy_version"]
    ctx.sync.publish(trainable_state(ctx.model), ctx.version)
    return ckpt.extra.get("recipe", {}), ckpt.extra.get("metrics_lines"), later, None


def _restore_sharded(path: Path, ctx: RunContext) -> tuple[dict[str, Any], int | None, None,
                                                           Callable[[], None] | None]:
    """`_restore` of a sharded checkpoint (`looprl.train.sharded_checkpoint`): the run's
    counters now; the weights, optimizer and RNG states at once in one process, and with
    several ranks once the policy is sharded (the returned callable, on every rank)."""
    manifest = sharded_checkpoint.verify(path)
    extra = manifest["extra"]
    ctx.sampler.load_state_dict(extra["sampler"])
    ctx.step, ctx.results, ctx.version = manifest["step"], extra.get("results", {}), extra["policy_version"]

    def load_weights() -> None:
        sharded_checkpoint.load(path, ctx.model, ctx.optimizer)  # each rank's RNG too, when the world size is the saved one
        apply_optimizer_settings(ctx.optimizer, ctx.cfg)
        ctx.sync.publish(ctx.trained_state(), ctx.version)

    if ctx.parallel.distributed:
        return extra.get("recipe", {}), extra.get("metrics_lines"), None, load_weights
    load_weights()
    return extra.get("recipe", {}), extra.get("metrics_lines"), None, None


def config_of_checkpoint(path: Path) -> RunConfig:
    """The run config stored in a checkpoint's manifest (either format)."""
    extra = verify_checkpoint(path)["extra"]
    if not isinstance(extra.get("config"), dict):
        raise ValueError(f"Checkpoint {path} holds no run config (manifest extra.config): it was not written by "
                         "`looprl train`; load its weights with the model they belong to")
    return from_dict(extra["config"])
