"""Typed, strict run configuration: YAML recipes plus `key=value` overrides.

Every field has a one-line help (its `description`); unknown keys and mistyped values
are errors that name the key and the expected type.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

log = logging.getLogger("looprl.config")


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key and what was expected."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float: PyYAML's YAML 1.1 rule wants `1.0e-4`."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _unique_keys(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: YAML would keep the last of two equal keys, silently."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {seen[key] + 1} and line {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ModelConfig(Section):
    name: str = Field("looprl/tiny", description="looprl/tiny, a local model folder, or a Hugging Face model id")
    tiny: dict[str, int | str] = Field(
        default_factory=dict,
        description="shape of looprl/tiny (hidden_size, num_layers, ...) and its tokenizer corpus (env ids)",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="parameter dtype")
    device: str = Field("cpu", description="torch device for the policy")


class LoraConfig(Section):
    enabled: bool = Field(True, description="train a LoRA adapter (peft) instead of every weight")
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: int = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout (0 keeps rollout and training policies equal)")
    target_modules: str | list[str] = Field("all-linear", description="modules that get adapters")


class EnvConfig(Section):
    id: str = Field("looprl/Calc-v0", description="registered environment id")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for gymnasium.make")
    max_tokens: int = Field(1024, gt=0, description="an episode is truncated past this many tokens")
    concurrency: Literal["thread", "serial"] = Field(
        "thread", description="how episodes' env calls run: a thread per episode, or all on one thread (for envs whose "
                              "library is not thread-safe)")


class RolloutConfig(Section):
    engine: Literal["hf", "vllm", "openai"] = Field(
        "hf", description="inference engine: hf (transformers, in-process), vllm (GPU, the vllm extra) or openai "
                          "(any OpenAI-compatible server at rollout.openai_url)")
    openai_url: str | None = Field(None, description="engine=openai: the server's API root, e.g. http://127.0.0.1:8000/v1")
    openai_model: str | None = Field(None, description="engine=openai: the model id the server serves (None: model.name)")
    vllm_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="engine=vllm: more vLLM engine arguments (gpu_memory_utilization, ...)")
    tasks_per_step: int = Field(16, gt=0, description="tasks sampled per training step")
    group_size: int = Field(6, ge=2, description="rollouts per task (K)")
    max_new_tokens: int = Field(64, gt=0, description="the most tokens in one turn")
    temperature: float = Field(1.0, gt=0, description="sampling temperature during training")
    max_batch_size: int = Field(128, gt=0, description="the most sequences in one generate call")
    prefix_cache: bool = Field(
        True, description="keep each episode's keys/values between its turns, feeding only new tokens (hf engine)")
    shared_prefix: bool = Field(
        False, description="first turns whose prompts start alike (system prompt, tools) prefill their common prefix "
                           "once (hf engine, with prefix_cache); the same distributions, not bit for bit the same "
                           "tokens as without it")
    turn_wait_s: float | None = Field(
        None, ge=0, description="the longest a batch waits for episodes in a tool call (hf engine). None: as long "
                                "as they take, so runs reproduce exactly on a loaded machine; a number (for slow "
                                "tools): runs reproduce only while every tool call returns within it")
    context_window: int | None = Field(
        None, ge=1, description="recent turns kept in the agent's context; longer episodes train as chunks (None: all)")
    mode: Literal["sync", "async"] = Field(
        "sync", description="sync: collect, then train; async: producers keep generating while the trainer updates")
    max_staleness: int = Field(
        1, ge=0, description="async: never train on data from a policy more than this many versions old (0: sync)")
    recompute_logprobs: bool = Field(
        False, description="async: PPO ratio against logprobs recomputed under the current policy, not the behaviour's")
    decoupled_loss: bool = Field(
        False, description="async: decoupled PPO: clip the ratio around logprobs recomputed under the current policy "
                           "and weight each token by pi_current / pi_behaviour (AReaL's use_decoupled_loss)")
    behaviour_weight_cap: float | None = Field(
        5.0, gt=1, description="decoupled_loss: tokens whose pi_current / pi_behaviour exceeds this get no gradient "
                               "(None: no cap)")
    sync_every: int = Field(1, gt=0, description="async: push the trained weights to the engine every N steps")
    env_step_timeout: float | None = Field(
        60.0, gt=0, description="an env reset/step taking longer loses its episode attempt (None: no limit)")
    env_retries: int = Field(
        1, ge=0, description="an episode lost to its env (raised, timed out, garbage) is replayed this often before "
                             "its group is dropped")
    backend: Literal["local", "ray"] = Field(
        "local", description="async: producers in a thread of this process (local) or as Ray actors (ray extra)")
    ray_address: str | None = Field(
        None, description="ray: cluster to join ('auto', 'host:port'); None: Ray already initialised, else a local one")
    num_producers: int = Field(1, gt=0, description="ray: rollout actors, each with its own policy copy")
    producer_cpus: float = Field(1.0, gt=0, description="ray: CPUs each rollout actor reserves")
    producer_restarts: int = Field(1, ge=0, description="ray: how often a dead rollout actor is restarted")
    ray_timeout: float = Field(
        600.0, gt=0, description="ray: seconds a weight push may wait for an actor (the first includes building it)")
    ray_pin_cpus: bool = Field(
        False, description="ray, local cluster: pin the trainer to `threads` cores and Ray's daemons and actors to "
                           "the others, so rollouts never preempt the training step (Linux)")


# How per-token policy losses become one loss: verl's `loss_agg_mode` names
# (see looprl.algorithms.core.aggregate_loss).
LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


class UpdateConfig(Section):
    """How each step's rollouts become optimizer steps (shared by the algorithms)."""

    epochs: int = Field(2, gt=0, description="passes of shuffled minibatches over each step's rollouts")
    minibatch_size: int = Field(32, gt=0, description="rollouts per optimizer step")
    micro_batch_tokens: int = Field(4096, gt=0, description="padded tokens per forward (gradients accumulate)")


class PolicyGradientConfig(UpdateConfig):
    """The policy-gradient updates' (LOOP, GRPO) own settings."""

    packing: bool = Field(
        False, description="train on rows packed end to end without padding (looprl.train.packing; attention within "
        "each trajectory): micro_batch_tokens then counts real tokens, not padded ones")


class LoopConfig(PolicyGradientConfig):
    """LOOP (leave-one-out PPO); see looprl/algorithms/loop.py."""

    name: Literal["loop"] = Field("loop", description="RL algorithm")
    clip_eps: float = Field(0.1, gt=0, description="LOOP ratio range [1/(1+eps), 1+eps]")
    ratio_level: Literal["token", "turn", "trajectory"] = Field("token", description="importance ratio granularity")
    adv_threshold: float = Field(0.01, ge=0, description="rollouts with |advantage| below this are dropped")
    normalize_std: bool = Field(False, description="divide advantages by the group's return std")
    loss_agg: LossAgg = Field(
        "seq-mean-token-mean", description="how per-token losses become one loss (the paper: seq-mean-token-mean)")
    max_len: int | None = Field(None, gt=0, description="seq-mean-token-sum-norm divisor (None: env.max_tokens)")


class GRPOConfig(PolicyGradientConfig):
    """GRPO and its variants (Dr. GRPO, DAPO); see looprl/algorithms/grpo.py."""

    name: Literal["grpo"] = Field("grpo", description="RL algorithm")
    scale: Literal["std", "none"] = Field("std", description="advantage scale: group std (GRPO) or none (Dr. GRPO)")
    clip_low: float = Field(0.2, gt=0, lt=1, description="ratio clipped below at 1 - clip_low")
    clip_high: float = Field(0.28, gt=0, description="ratio clipped above at 1 + clip_high (DAPO clip-higher)")
    loss_agg: LossAgg = Field(
        "token-mean", description="how per-token losses become one loss")
    max_len: int | None = Field(None, gt=0, description="seq-mean-token-sum-norm divisor (None: env.max_tokens)")
    kl_coef: float = Field(0.0, ge=0, description="KL penalty to the reference (the model with LoRA disabled)")
    filter_zero_variance: bool = Field(True, description="drop groups whose rewards are all equal (DAPO)")


class DPOConfig(UpdateConfig):
    """DPO, online on the best/worst rollouts of each group or offline on preference pairs.

    See looprl/algorithms/dpo.py and looprl/train/recipes/online_dpo.py, offline_dpo.py."""

    name: Literal["dpo"] = Field("dpo", description="RL algorithm")
    beta: float = Field(0.1, gt=0, description="DPO beta: strength of the implicit KL to the reference")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO: probability a label is flipped")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid (DPO eq. 7) or ipo (IPO eq. 17)")
    nll_coef: float = Field(0.0, ge=0, description="RPO: add this times the chosen side's per-token NLL")
    minibatch_size: int = Field(16, gt=0, description="preference pairs per optimizer step")
    dataset: str | None = Field(
        None, description="offline DPO: a JSONL of preference pairs (TRL formats); None: online DPO on rollouts")


def _algorithm_name(value: Any) -> str:
    # An `algorithm:` section without a name is LOOP, the default algorithm.
    return value.get("name", "loop") if isinstance(value, dict) else value.name


# The algorithms a recipe can name, and their sections: the one registry the config's
# union, `looprl train --help` and the "unknown algorithm" error are built from
# (`looprl.algorithms.ALGORITHMS` holds the implementations under the same names).
ALGORITHM_CONFIGS: dict[str, type[UpdateConfig]] = {"loop": LoopConfig, "grpo": GRPOConfig, "dpo": DPOConfig}

AlgorithmConfig = Annotated[
    Union[tuple(Annotated[cls, Tag(name)] for name, cls in ALGORITHM_CONFIGS.items())],  # type: ignore[misc]
    Discriminator(_algorithm_name),
]


def describe_algorithms() -> dict[str, str]:
    """Each algorithm's name and the first line of its config's docstring."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in ALGORITHM_CONFIGS.items()}


class OptimConfig(Section):
    lr: float = Field(5e-5, gt=0, description="AdamW learning rate (constant)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(0.1, gt=0, description="max global gradient norm")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")


class SFTConfig(Section):
    steps: int = Field(0, ge=0, description="warm-start SFT steps on oracle trajectories (0: none)")
    batch_size: int = Field(32, gt=0, description="trajectories per SFT step")
    lr: float = Field(1e-3, gt=0, description="SFT learning rate")
    episodes: int = Field(4096, gt=0, description="oracle episodes in the SFT pool")
    max_seconds: float | None = Field(None, gt=0, description="stop SFT after this long (None: run all steps)")
    micro_batch_tokens: int | None = Field(
        None, gt=0, description="padded tokens per SFT forward, gradients accumulated (None: a batch in one pass, as the "
                                "tiny recipes; a real model's activations need it, e.g. 4096)")
    save: bool = Field(True, description="write the warm-started policy to <run folder>/warmstart as a transformers "
                                         "folder (LoRA merged): RL can start from it with model.name")


class TrainConfig(Section):
    steps: int = Field(100, ge=0, description="RL steps (each: rollouts, then optimizer steps)")
    max_seconds: float | None = Field(None, gt=0, description="stop RL after this long (None: run all steps)")
    save_every: int = Field(25, gt=0, description="checkpoint every N RL steps (and at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="complete checkpoints to keep")
    keep_every: int = Field(0, ge=0, description="also keep every checkpoint whose step is a multiple of N, forever, "
                                                 "beyond the newest keep_checkpoints (0: none; a multiple of "
                                                 "save_every, as only those steps are saved)")
    log_every: int = Field(10, ge=0, description="write a progress line (s/step, episodes/s, ETA) to <run "
                                                 "folder>/train.log every N RL steps, and with progress on to "
                                                 "stderr when it is not a terminal (0: never)")
    backend: Literal["auto", "single", "fsdp2", "deepspeed"] = Field(
        "auto", description="data parallelism: auto (fsdp2 under a launcher with more than one process, else "
        "single), single (one process), fsdp2 (FSDP2 sharding over torchrun/accelerate processes) or deepspeed "
        "(DeepSpeed ZeRO, stage train.zero_stage)")
    zero_stage: Literal[1, 2, 3] = Field(
        2, description="with backend=deepspeed: ZeRO stage 1 (optimizer state sharded), 2 (and gradients) or 3 "
        "(and parameters)")
    sequence_parallel: int = Field(
        1, ge=1, description="ranks that split each row's sequence (DeepSpeed-Ulysses attention, looprl.train.ulysses); "
        "the processes form blocks of this many, each block one data-parallel share (1: no split)")
    sequence_parallel_adaptive: bool = Field(
        False, description="plan the sequence-parallel blocks per minibatch (FlexSP, looprl.train.sp_planner): a row "
        "that fits algorithm.micro_batch_tokens trains on one rank, a longer one over a block of 2, 4, ... ranks, the "
        "blocks' degrees summing to the processes and the slowest block's estimated time minimised (with "
        "train.sequence_parallel=1)")
    sequence_parallel_cost: str | None = Field(
        None, description="the cost model the adaptive plans minimise: a JSON saved by `bench/sequence_parallel.py "
        "--save` (calibrated on your hardware); default: estimated from the model's size at 100 TFLOP/s and 20 GB/s "
        "all-to-all")

    @model_validator(mode="after")
    def _one_kind_of_sequence_parallelism(self) -> "TrainConfig":
        if self.sequence_parallel_adaptive and self.sequence_parallel > 1:
            raise ValueError(f"Expect train.sequence_parallel=1 with train.sequence_parallel_adaptive (the plan "
                             f"chooses the degrees), actually: {self.sequence_parallel}")
        return self

    @model_validator(mode="after")
    def _keep_every_is_saved(self) -> "TrainConfig":
        if self.keep_every % self.save_every:
            raise ValueError(f"Expect train.keep_every to be a multiple of train.save_every ({self.save_every}), "
                             f"as only those steps are saved, actually: {self.keep_every}")
        return self


class EvalConfig(Section):
    episodes: int = Field(300, ge=0, description="held-out episodes per evaluation (0: skip)")
    env_kwargs: dict[str, Any] = Field({"split": "test"}, description="kwargs overriding env.kwargs for evaluation")
    greedy: bool = Field(True, description="also evaluate with greedy decoding")
    before_rl: bool = Field(True, description="evaluate the warm-started policy before RL")
    every: int = Field(0, ge=0, description="also evaluate every N RL steps during training, for held-out curves "
                                            "(0: only before and after RL)")


class ExItConfig(Section):
    """Exploratory Iteration (ExIt) task sampling; see looprl/rollout/exit_sampler.py and docs/algorithms/exit.md."""

    enabled: bool = Field(False, description="train on self-improvement steps sampled from a prioritised buffer")
    p_fresh: float = Field(0.5, ge=0, le=1, description="probability that a task slot poses a fresh task")
    capacity: int = Field(256, gt=0, description="most starting points in the buffer (the lowest score is evicted)")
    max_attempts: int = Field(2, gt=0, description="most finished attempts a buffered starting point holds")
    floor: float = Field(0.01, gt=0, description="added to every learnability score in the sampling weights")
    children: int = Field(1, ge=0, description="new starting points added from each group with return variance")
    p_diverge: float = Field(0.0, ge=0, le=1, description="probability a revision asks for a significantly different approach")
    context: Literal["last", "all"] = Field("last", description="earlier attempts shown: the last one, or all")
    warmup_revisions: float = Field(
        0.5, ge=0, le=1, description="fraction of SFT expert episodes that revise an earlier expert attempt")


class WandbConfig(Section):
    enabled: bool = Field(False, description="log metrics to Weights & Biases")
    mode: Literal["offline", "online"] = Field("offline", description="wandb mode when enabled")
    project: str = Field("looprl", description="wandb project")


class RunConfig(Section):
    name: str = Field("run", description="run name; the run folder is <output_dir>/<name>")
    output_dir: str = Field("runs", description="parent folder of run folders")
    seed: int = Field(0, description="seeds torch, the task sampler and SFT data order")
    threads: int = Field(1, gt=0, description="torch CPU threads")
    progress: bool = Field(True, description="show a rich progress display")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the policy")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings")
    env: EnvConfig = Field(default_factory=EnvConfig, description="the training environment")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="rollout sampling")
    algorithm: AlgorithmConfig = Field(default_factory=LoopConfig, description="the RL algorithm")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="the RL optimizer")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="the SFT warm-start")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the RL loop")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation")
    exit: ExItConfig = Field(default_factory=ExItConfig, description="ExIt self-improvement task sampling")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases")

    @model_validator(mode="after")
    def _kl_needs_lora(self) -> "RunConfig":
        if isinstance(self.algorithm, GRPOConfig) and self.algorithm.kl_coef > 0 and not self.lora.enabled:
            raise ValueError("A KL penalty needs lora.enabled=true: the reference is the model with its "
                             "adapter disabled (set algorithm.kl_coef=0 or lora.enabled=true)")
        return self

    @model_validator(mode="after")
    def _dpo_reference(self) -> "RunConfig":
        algo = self.algorithm
        if not isinstance(algo, DPOConfig):
            return self
        if algo.dataset is None and self.lora.enabled and self.sft.steps > 0:
            raise ValueError("Online DPO with lora.enabled=true uses the model with its adapter disabled as the "
                             "reference, but sft.steps>0 would warm-start that adapter, leaving the reference "
                             "un-warm-started: set sft.steps=0 (adapt an already warm model) or lora.enabled=false "
                             "(the reference is then a frozen copy of the warm-started weights)")
        if algo.dataset is not None and self.sft.steps > 0:
            raise ValueError("Offline DPO (algorithm.dataset) trains model.name on the given pairs and has no "
                             f"warm-start: set sft.steps=0, actually: {self.sft.steps}")
        if algo.loss_type == "ipo" and algo.label_smoothing > 0:
            raise ValueError("algorithm.label_smoothing applies to loss_type=sigmoid (conservative DPO) only; "
                             "set it to 0 for loss_type=ipo")
        if algo.dataset is not None and algo.label_smoothing > 0:
            raise ValueError("Offline DPO runs TRL's DPOTrainer, whose 'sigmoid' and 'ipo' losses ignore "
                             "label_smoothing: set algorithm.label_smoothing=0")
        return self

    @model_validator(mode="after")
    def _packing_alone(self) -> "RunConfig":
        if getattr(self.algorithm, "packing", False) and (self.train.sequence_parallel > 1
                                                          or self.train.sequence_parallel_adaptive):
            raise ValueError("algorithm.packing=true packs whole rows on one rank: set train.sequence_parallel=1 and "
                             "train.sequence_parallel_adaptive=false, or algorithm.packing=false")
        return self

    @model_validator(mode="after")
    def _exit_needs_groups(self) -> "RunConfig":
        if self.exit.enabled and not isinstance(self.algorithm, (LoopConfig, GRPOConfig)):
            raise ValueError("exit.enabled=true scores starting points by the return variance of a group: use "
                             f"algorithm.name=grpo or loop, actually: {self.algorithm.name!r}")
        if self.exit.enabled and self.rollout.context_window is not None:
            raise ValueError("exit.enabled=true bounds the context itself (exit.context): set rollout.context_window=null")
        return self

    @model_validator(mode="after")
    def _async_needs_plain_groups(self) -> "RunConfig":
        if self.rollout.mode == "async" and (self.exit.enabled or isinstance(self.algorithm, DPOConfig)):
            raise ValueError("rollout.mode=async streams groups of plain tasks to LOOP or GRPO: set rollout.mode=sync "
                             "for exit.enabled=true or algorithm.name=dpo")
        r = self.rollout
        if r.backend == "ray" and r.mode != "async":
            raise ValueError("rollout.backend=ray runs asynchronous producers: set rollout.mode=async")
        if r.ray_pin_cpus and (r.backend != "ray" or r.ray_address is not None):
            raise ValueError("rollout.ray_pin_cpus=true splits this machine's cores between the trainer and the Ray "
                             "cluster the run starts: set rollout.backend=ray and rollout.ray_address=null, or leave "
                             "it false")
        if r.engine == "openai" and not r.openai_url:
            raise ValueError("rollout.engine=openai samples from a server: set rollout.openai_url "
                             "(e.g. http://127.0.0.1:8000/v1)")
        if r.mode == "async" and r.engine != "hf":
            raise ValueError(f"rollout.mode=async plays on copies of the policy (hf engine): rollout.engine="
                             f"{r.engine} serves the weights pushed after each step; set rollout.mode=sync")
        if r.shared_prefix and (r.engine != "hf" or not r.prefix_cache):
            raise ValueError("rollout.shared_prefix=true needs the hf engine's own decoding: set rollout.engine=hf "
                             "and rollout.prefix_cache=true, or leave it false")
        if r.decoupled_loss and r.recompute_logprobs:
            raise ValueError("rollout.decoupled_loss=true already recomputes logprobs under the current policy and "
                             "keeps the behaviour's for its weights: set rollout.recompute_logprobs=false")
        if (r.decoupled_loss or r.recompute_logprobs) and r.mode != "async":
            flag = "decoupled_loss" if r.decoupled_loss else "recompute_logprobs"
            raise ValueError(f"rollout.{flag}=true corrects for stale asynchronous rollouts; synchronous rollouts "
                             "come from the current policy: set rollout.mode=async or leave it false")
        if r.mode == "async" and r.sync_every - 1 > r.max_staleness:
            raise ValueError(f"rollout.sync_every={r.sync_every} leaves the engine up to {r.sync_every - 1} versions "
                             f"behind, more than rollout.max_staleness={r.max_staleness}: every batch would be "
                             "stale; raise max_staleness or lower sync_every")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML recipe (or the defaults), apply `key=value` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist")
        try:
            data = _load_yaml(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if data is None:
            raise ConfigError(f"Config file {str(path)!r} is empty: a recipe names at least what it trains "
                              "(start from configs/quickstart.yaml)")
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    for item in overrides:
        apply_override(data, item)
    return from_dict(data)


def from_dict(data: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(_tuples(_switch_algorithm(data)))
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def _switch_algorithm(data: dict[str, Any]) -> dict[str, Any]:
    """Check `algorithm.name` against the registry, and drop (with a printed note) the
    fields of another algorithm that the named one lacks: `algorithm.name=grpo` on a LOOP
    recipe leaves its `clip_eps` behind instead of failing on it. A key no algorithm
    has is still an error."""
    section = data.get("algorithm") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        return data
    name = section.get("name", "loop")
    if not isinstance(name, str) or name not in ALGORITHM_CONFIGS:
        raise ConfigError(f"Invalid config: algorithm.name: unknown algorithm {name!r}; known: "
                          f"{', '.join(ALGORITHM_CONFIGS)}")
    own = set(ALGORITHM_CONFIGS[name].model_fields)
    others = {key for n, cls in ALGORITHM_CONFIGS.items() if n != name for key in cls.model_fields}
    dropped = [key for key in section if key not in own and key in others]
    if not dropped:
        return data
    log.warning("algorithm %r has no field(s) %s (they belong to another algorithm): dropped", name,
                ", ".join(f"algorithm.{key}" for key in dropped))
    return {**data, "algorithm": {k: v for k, v in section.items() if k not in dropped}}


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in nested `data`; the value is parsed as YAML (`0.2`, `true`, `[a, b]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"Override {item!r} is not of the form key.path=value")
    try:
        value = _load_yaml(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override {item!r}: {part!r} is not a section")
    node[leaf] = value


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _tuples(data: Any) -> Any:
    # YAML has no tuples; strict mode would reject a list for `betas`.
    if isinstance(data, dict):
        return {k: (tuple(v) if k == "betas" and isinstance(v, list) else _tuples(v)) for k, v in data.items()}
    return data


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        loc, note = list(err["loc"]), ""
        if len(loc) > 1 and loc[0] == "algorithm" and loc[1] in ("loop", "grpo", "dpo"):
            note = f" (for algorithm {loc.pop(1)!r})"  # pydantic's tag of the union member
        key = ".".join(str(p) for p in loc)
        if not loc:  # a check across fields: its message says which
            parts.append(err["msg"].removeprefix("Value error, "))
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown key {key!r}{note}")
        else:
            parts.append(f"{key}: {err['msg']} (got {err.get('input')!r}){note}")
    return "Invalid config: " + "; ".join(parts)
