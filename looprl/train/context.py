"""What a run holds while it trains: the `RunContext` every recipe's step reads and writes.

The run, not an engine, owns the policy version: `RunContext.publish()` moves it on after
an optimizer step and hands the trained tensors to the weight sync of whatever samples
the rollouts (`looprl.rollout.weight_sync`).
"""

from __future__ import annotations

import copy
import functools
import logging
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from looprl.algorithms import build_algorithm
from looprl.config import RunConfig, to_yaml
from looprl.envs import make_env
from looprl.rollout.collect import Collection, EpisodePlayer, FaultPolicy
from looprl.rollout.engine import HFEngine, InferenceEngine, SamplingParams
from looprl.rollout.sampler import TaskSampler
from looprl.rollout.weight_sync import SharedWeights, WeightSync
from looprl.train.any_checkpoint import latest_checkpoint_in, verify_checkpoint
from looprl.train.metrics import MetricsLogger
from looprl.train.parallel import GatheredWeights, Parallel
from looprl.train.policy import build_policy, trainable_state
from looprl.train.progress import RunProgress
from looprl.train.resume import apply_optimizer_settings, check_resume
from looprl.train.sp_planner import SPCostModel, estimated_cost_model
from looprl.train.ulysses import check_heads, splittable_degrees

log = logging.getLogger("looprl.train")


@dataclass
class RunContext:
    """One training run's parts.

    Attributes:
        cfg: the run config.
        model, tokenizer: the policy being trained.
        optimizer: over its trainable parameters.
        algorithm: from `looprl.algorithms.build_algorithm`.
        sampler: which tasks the next rollouts play (its state is checkpointed).
        engine: where the run's own rollouts and evaluations are sampled.
        sync: how published weights reach `engine`.
        run_dir: the run folder.
        logger: `metrics.jsonl` (and wandb).
        progress: the live display.
        stop: `stop.requested` once Ctrl-C or SIGTERM asked the run to end.
        version: the policy version: the number of weight updates published.
        step: the RL steps done.
        results: the evaluations and stage summaries so far (`results.json`).
        resume_from: the checkpoint a resumed run continues from.
        parallel: this process among the run's processes (`looprl.train.parallel`).
        before_optimizer_step: what the recipes' updates call right before each
            `optimizer.step()` (`minibatch_update`'s `before_step`): with several ranks,
            the sharded checkpoint's wait for its snapshot; one process: None.
    """

    cfg: RunConfig
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    algorithm: Any
    sampler: Any
    engine: InferenceEngine
    sync: WeightSync
    run_dir: Path
    logger: MetricsLogger
    progress: RunProgress
    stop: Any = None
    version: int = 0
    step: int = 0
    results: dict[str, Any] = field(default_factory=dict)
    resume_from: Path | None = None
    parallel: Parallel = field(default_factory=Parallel)
    before_optimizer_step: Callable[[], None] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def publish(self) -> None:
        """The optimizer changed the weights: a new policy version, sent to the samplers."""
        self.version += 1
        self.sync.publish(self.trained_state(), self.version)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters, whole (gathered from the shards: every rank calls it)."""
        if not self.parallel.distributed:
            return trainable_state(self.model)
        return self.parallel.full_state(self.model, self.trainable_names)

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state in the one-process format (gathered: every rank calls it)."""
        return self.parallel.full_optimizer_state(self.model, self.optimizer, self.trainable_names)

    @property
    def trainable_names(self) -> list[str]:
        return [name for name, p in self.parallel.unwrap(self.model).named_parameters() if p.requires_grad]

    def shard(self, optimizer_state: dict[str, Any] | None = None) -> None:
        """Shard the warm-started (or restored) policy over the ranks and build its optimizer
        over the shards, loading `optimizer_state` (one-process format) when resuming.
        With DeepSpeed, `model` becomes its engine (`Parallel.unwrap` gives the policy back).
        One process: nothing to do (the optimizer was built and loaded already)."""
        if not self.parallel.distributed:
            return
        self.parallel.broadcast_module(self.model)  # rank 0's weights everywhere, whatever SFT did per rank
        self.sync.publish(self.trained_state(), self.version)
        if optimizer_state is None:
            self.parallel.seed_ranks(self.cfg.seed)  # fresh: ranks sample apart (resumed: their saved states)
        self.model, self.optimizer = self.parallel.shard(self.model, functools.partial(build_optimizer, self.cfg),
                                                         self.cfg.optim.grad_clip)
        if optimizer_state is not None:
            self.parallel.load_optimizer_state(self.model, self.optimizer, optimizer_state, self.trainable_names)
            apply_optimizer_settings(self.optimizer, self.cfg)

    def collect(self, player: EpisodePlayer, seeds: Sequence[int], group_size: int, **kwargs) -> Collection:
        """`player.collect`, with several ranks each playing its share of `seeds` (whole
        groups) and every rank receiving all of them (rank order)."""
        if not self.parallel.distributed:
            return player.collect(seeds, group_size, **kwargs)
        shared = {k: None if v is None else self.parallel.share(v) for k, v in kwargs.items()}
        mine = player.collect(self.parallel.share(seeds), group_size, **shared)
        parts = self.parallel.gather_objects((mine.groups, mine.failures, mine.dropped))
        return Collection([g for groups, _, _ in parts for g in groups], [f for _, fs, _ in parts for f in fs],
                          sum((d for _, _, d in parts), Counter()))

    def make_env(self) -> Any:
        """One training environment."""
        return make_env(self.cfg.env.id, **self.cfg.env.kwargs)

    def player(self, engine: InferenceEngine | None = None, **kwargs) -> EpisodePlayer:
        """The episode player of this run's rollouts (see `episode_player`)."""
        return episode_player(self.cfg, engine or self.engine, self.tokenizer, **kwargs)


def env_factory(cfg: RunConfig, kwargs: dict[str, Any] | None = None) -> Callable[[], Any]:
    """A picklable builder of the run's environment (with `kwargs` overriding `env.kwargs`)."""
    return functools.partial(make_env, cfg.env.id, **{**cfg.env.kwargs, **(kwargs or {})})


def episode_player(cfg: RunConfig, engine: InferenceEngine, tokenizer, *, temperature: float | None = None,
                   env_kwargs: dict[str, Any] | None = None, **kwargs) -> EpisodePlayer:
    """How the run plays episodes: its env, sampling settings, limits and fault policy."""
    r = cfg.rollout
    params = SamplingParams(r.max_new_tokens, r.temperature if temperature is None else temperature)
    return EpisodePlayer(engine, tokenizer, env_factory(cfg, env_kwargs), params, max_tokens=cfg.env.max_tokens,
                         context_window=r.context_window, faults=FaultPolicy(r.env_retries, r.env_step_timeout),
                         concurrency=cfg.env.concurrency, **kwargs)


def build_engine(cfg: RunConfig, model, tokenizer, run_dir: Path,
                 parallel: Parallel | None = None) -> tuple[InferenceEngine, WeightSync]:
    """The engine the config names over the policy, and how weights reach it (with
    several ranks, the `hf` engine samples from each rank's own unsharded copy)."""
    r = cfg.rollout
    if r.engine == "hf":
        distributed = parallel is not None and parallel.distributed
        sampler_model = copy.deepcopy(model).requires_grad_(False) if distributed else model
        engine = HFEngine(sampler_model, tokenizer, max_batch_size=r.max_batch_size, turn_wait_s=r.turn_wait_s,
                          prefix_cache=r.prefix_cache, shared_prefix=r.shared_prefix)
        return engine, GatheredWeights(engine) if distributed else SharedWeights(engine)
    if r.engine == "openai":
        from looprl.rollout.openai_engine import OpenAIEngine

        engine = OpenAIEngine(r.openai_url, r.openai_model or cfg.model.name, max_concurrency=r.max_batch_size,
                              weights_dir=str(run_dir / "published_weights"))
        return engine, engine
    from looprl.rollout.vllm_engine import VLLMEngine  # imports vllm: only when asked
    from looprl.train.models import resolve_model_path

    # With LoRA, the peft policy: its adapter config names the adapters the run publishes.
    engine = VLLMEngine(resolve_model_path(cfg.model.name, cfg.model.tiny or None),
                        policy=model if cfg.lora.enabled else None, max_lora_rank=cfg.lora.r, **r.vllm_kwargs)
    return engine, engine


def open_run(cfg: RunConfig, resume: bool, overwrite: bool, sampler=None) -> RunContext:
    """What every run starts with: the run folder (claimed; on `--resume`, its latest
    checkpoint found and the config checked against it), threads, seeds, the policy and
    its optimizer, the folder's `config.yaml` (written once the checks passed), and the
    engine the config names."""
    parallel = Parallel.from_env(cfg.train.backend, cfg.train.zero_stage)
    run_dir = Path(cfg.run_dir)
    refused = None
    if parallel.is_main:
        try:
            claim_run_dir(run_dir, resume=resume, overwrite=overwrite)
        except (OSError, ValueError) as error:
            refused = error
    refused = parallel.broadcast_object(refused)  # the other ranks wait until the folder is ready
    if refused is not None:
        raise refused
    resume_from = latest_checkpoint(run_dir, cfg) if resume else None
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    model, tokenizer = build_policy(cfg)
    if cfg.train.sequence_parallel > 1:
        check_heads(model, cfg.train.sequence_parallel)
        parallel.split_sequences(cfg.train.sequence_parallel)
    if cfg.train.sequence_parallel_adaptive:
        degrees = splittable_degrees(model, parallel.world)
        parallel.plan_sequences(degrees, sequence_cost_model(cfg.train.sequence_parallel_cost, model, degrees))
    if parallel.is_main:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    engine, sync = build_engine(cfg, model, tokenizer, run_dir, parallel)
    optimizer = build_optimizer(cfg, model)
    return RunContext(cfg=cfg, model=model, tokenizer=tokenizer, optimizer=optimizer, algorithm=build_algorithm(cfg),
                      sampler=sampler if sampler is not None else TaskSampler(cfg.seed), engine=engine, sync=sync,
                      run_dir=run_dir, logger=None, progress=RunProgress(enabled=cfg.progress and parallel.is_main),
                      resume_from=resume_from, parallel=parallel)


def sequence_cost_model(path: str | None, model, degrees: Sequence[int]) -> SPCostModel:
    """The cost model adaptive sequence parallelism plans with: `train.sequence_parallel_cost`'s
    JSON, or one estimated from the model's size (`estimated_cost_model`)."""
    if path is None:
        config = getattr(model.config, "text_config", None) or model.config
        return estimated_cost_model(config.hidden_size, config.num_hidden_layers,
                                    sum(p.numel() for p in model.parameters()), degrees)
    try:
        cost = SPCostModel.load(path)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"train.sequence_parallel_cost={path!r} is not a cost model JSON: {error}") from None
    missing = [d for d in degrees if d > 1 and d not in cost.bandwidth]
    if missing:
        raise ValueError(f"train.sequence_parallel_cost={path!r} has no all-to-all bandwidth for degrees {missing}; "
                         f"it has {sorted(cost.bandwidth)}")
    return cost


def build_optimizer(cfg: RunConfig, model) -> torch.optim.Optimizer:
    """AdamW over the policy's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)


def latest_checkpoint(run_dir: Path, cfg: RunConfig) -> Path:
    """The checkpoint `--resume` continues from, once its config allows `cfg` (see
    `looprl.train.resume`); the changes it applies are printed."""
    latest = latest_checkpoint_in(run_dir / "checkpoints")  # of either format (`looprl.train.any_checkpoint`)
    if latest is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    old = verify_checkpoint(latest)["extra"].get("config")
    if not isinstance(old, dict):
        raise ValueError(f"--resume: checkpoint {latest} holds no run config (manifest extra.config)")
    for change in check_resume(old, cfg):
        log.warning("--resume applies %s", change)
    return latest


def claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> Path:
    """The run folder, made ready for this run: kept as it is to resume, emptied with
    `overwrite`, and refused if it holds anything otherwise (an old run's checkpoints
    would be mistaken for this one's by `eval`, `export`, `serve` and `--resume`)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ValueError("--resume continues the run in its folder and --overwrite deletes it: pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"Run folder {str(run_dir)!r} is a file")
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"Run folder {str(run_dir)!r} already holds a run: pass --resume to continue it "
                                  "or --overwrite to replace it (or choose another name=)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
