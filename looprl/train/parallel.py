"""Data parallelism: one process by default, N processes under `torchrun` or `accelerate launch`.

`Parallel.from_env` reads the launcher's `WORLD_SIZE`/`RANK`/`LOCAL_RANK`; one process
is `Parallel()`, whose every method is the identity, so a one-process run takes the
same code path as before and stays bit-identical. With N processes (`train.backend:
fsdp2`, the default then):

- **Rollouts.** Every rank samples the same task seeds (the sampler's state is the same
  everywhere) and plays its share, `seeds[rank::world]`: a group's K episodes stay on
  one rank. The played groups are then gathered to every rank (rank order), so every
  rank holds the step's whole batch: the advantages of each group are computed once
  per rank from whole groups, and each minibatch's split across ranks, its global
  loss normaliser and the number of micro-batches per rank are decided locally,
  identically everywhere, without another collective.
- **Sampling.** Each rank samples from its own unsharded copy of the policy (an
  `HFEngine` over a copy): a generate call never waits on another rank's all-gather,
  whatever lengths the ranks stop at. After each optimizer step the trained weights
  are gathered once (a full state dict) and copied into it (`GatheredWeights`).
- **Training.** The policy is sharded with FSDP2 (`fully_shard` per decoder layer,
  then the root) after the warm start, and its optimizer built over the shards. Each
  minibatch is split across ranks by tokens; a rank's loss is normalised by the
  minibatch's global count divided by the world size, because FSDP averages the
  gradients over ranks: their mean is then the one-process gradient. A rank with fewer
  micro-batches than another runs zero-weight ones, so every rank makes the same
  collectives.
- **Random streams.** Every rank starts from the run's seed (the same initial weights,
  the same task seeds); a fresh run then reseeds each rank's generators apart
  (`seed_ranks`), so ranks sample different episodes. Checkpoints keep every rank's
  random state: a resumed run on the same number of ranks continues exactly; on another
  number the saved states are not restored and the ranks are reseeded apart.
- **Checkpoints.** Sharded (`looprl.train.sharded_checkpoint`): every rank writes its
  shards of the model and optimizer state, and its RNG states, in the background; the
  recipes' updates wait for the host copy before their next optimizer step
  (`RunContext.before_optimizer_step`). `--resume` reads either format
  (`looprl.train.any_checkpoint`), so any world size resumes any other: a sharded
  checkpoint loads into the policy once it is sharded (in one process, into the plain
  one), a one-process checkpoint's full state dicts are loaded over the shards.
- **Evaluation and files.** Rank 0 evaluates, logs and writes the run folder; the
  others wait for it and receive its results.

`train.backend: deepspeed` shards with DeepSpeed ZeRO-1/2/3 instead (`looprl.train.zero`):
the same rollouts, split, normaliser and zero-weight padding; the policy becomes the
DeepSpeed engine, which steps and clips, and checkpoints are one-process files written by
rank 0 from the gathered state.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("looprl.train")

BACKENDS = ("auto", "single", "fsdp2", "deepspeed")


@dataclass(frozen=True)
class SequencePlanner:
    """Adaptive sequence parallelism's fixed parts: the degrees it may use, a process group for
    every aligned block of ranks of each (keyed `(degree, first rank)`), and the cost model
    (`looprl.train.sp_planner.SPCostModel`) its plans minimise."""

    degrees: tuple[int, ...]
    groups: dict
    cost: Any


@dataclass
class Parallel:
    """Where this process stands among the run's processes (see the module docstring).

    Attributes:
        rank: this process's index.
        world: the number of processes.
        backend: `single` (one process), `fsdp2` or `deepspeed`.
        zero_stage: DeepSpeed's ZeRO stage (1, 2 or 3) with `deepspeed`.
        sequence_group: this rank's block of ranks that split each row's sequence
            (`split_sequences`; a ProcessGroup), None without sequence parallelism.
        sequence_planner: adaptive sequence parallelism (`plan_sequences`): the groups are
            planned per minibatch instead, and `sequence_group` stays None.
    """

    rank: int = 0
    world: int = 1
    backend: str = "single"
    zero_stage: int = 0
    sequence_group: Any = None
    sequence_planner: Any = None

    @classmethod
    def from_env(cls, backend: str = "auto", zero_stage: int = 2, timeout_s: float = 7200.0) -> "Parallel":
        """The launcher's processes (`WORLD_SIZE` > 1: torchrun, accelerate), its process
        group initialised (nccl on CUDA, else gloo); one process without a launcher."""
        if backend not in BACKENDS:
            raise ValueError(f"Expected train.backend in {BACKENDS}, actually: {backend!r}")
        if zero_stage not in (1, 2, 3):
            raise ValueError(f"Expected train.zero_stage in (1, 2, 3), actually: {zero_stage!r}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            if backend in ("fsdp2", "deepspeed"):
                log.warning("train.backend=%s in one process: nothing to shard, training as one process", backend)
            return cls()
        if backend == "single":
            raise ValueError(f"train.backend=single, but the launcher started {world} processes (WORLD_SIZE); "
                             "use train.backend=fsdp2, deepspeed (or auto) or launch one process")
        import torch.distributed as dist

        if not dist.is_initialized():
            cuda = torch.cuda.is_available()
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            # The other ranks wait in a collective while rank 0 evaluates: a generous timeout.
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
            destroy_process_group_at_exit()
        if backend == "deepspeed":
            return cls(rank=dist.get_rank(), world=dist.get_world_size(), backend="deepspeed", zero_stage=zero_stage)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), backend="fsdp2")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    # Sequence parallelism (`train.sequence_parallel`): blocks of ranks share their rows.

    def split_sequences(self, degree: int) -> None:
        """Cut the ranks into blocks of `degree` that split each row's sequence (Ulysses,
        `looprl.train.ulysses`): a block takes one data-parallel share of a minibatch."""
        if degree == 1:
            return
        if not self.distributed:
            raise ValueError(f"train.sequence_parallel={degree} needs as many processes (a launcher such as "
                             "torchrun), but this run has one")
        from looprl.train.ulysses import sequence_groups

        self.sequence_group = sequence_groups(degree)

    def plan_sequences(self, degrees: tuple[int, ...], cost: Any) -> None:
        """Adaptive sequence parallelism: each minibatch's rows are assigned to blocks of ranks
        of the `degrees` (FlexSP, `looprl.train.sp_planner`, with the cost model `cost`), short
        rows one rank each, long ones split; the blocks' groups are made here, once."""
        if not self.distributed:
            raise ValueError("train.sequence_parallel_adaptive needs several processes (a launcher such as "
                             "torchrun), but this run has one")
        from looprl.train.ulysses import block_groups

        # The plan's memory limit is in tokens a rank holds (algorithm.micro_batch_tokens): a row of s tokens
        # at degree d holds s / d, whatever the cost model's own bytes say.
        tokens = dataclasses.replace(cost, model_state_bytes=0.0, activation_bytes_per_token=1.0)
        self.sequence_planner = SequencePlanner(degrees=degrees, groups=block_groups(degrees), cost=tokens)

    @property
    def sequence_degree(self) -> int:
        """Ranks a row's sequence is split over (1: not split)."""
        if self.sequence_group is None:
            return 1
        import torch.distributed as dist

        return dist.get_world_size(self.sequence_group)

    @property
    def data_world(self) -> int:
        """Data-parallel shares of a minibatch: one per block of `sequence_degree` ranks."""
        return self.world // self.sequence_degree

    @property
    def data_rank(self) -> int:
        """This rank's share (its block's index)."""
        return self.rank // self.sequence_degree

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether every rank writes its shards (FSDP2: `looprl.train.sharded_checkpoint`);
        else rank 0 writes a one-process checkpoint of the gathered state (one process, DeepSpeed)."""
        return self.backend == "fsdp2"

    # Collectives (identity in one process).

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share of `items`: every world-th one from its rank."""
        return list(items[self.rank::self.world])

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers into every rank's `module` (before sharding)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    # Sharding.

    def shard(self, model: torch.nn.Module, build_optimizer: Callable[[torch.nn.Module], torch.optim.Optimizer],
              grad_clip: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        """The policy sharded over the ranks and its optimizer, built over the shards.

        FSDP2: `model` itself, each decoder layer `fully_shard`-ed, then the root (in place).
        DeepSpeed: its engine over `model` (which clips to `grad_clip` as it steps) and
        ZeRO's optimizer. One process: `model` and `build_optimizer(model)`.
        """
        if self.backend == "deepspeed":
            from looprl.train import zero

            return zero.initialize(model, build_optimizer, self.zero_stage, grad_clip, self.world)
        if self.distributed:
            self._fully_shard(model)
        return model, build_optimizer(model)

    def _fully_shard(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (self.world,))
        layers = decoder_layers(model)
        if not layers:
            raise ValueError(f"train.backend=fsdp2: found no decoder layers in {type(model).__name__} to shard "
                             "(looked for modules named *DecoderLayer / *Block)")
        for layer in reversed(layers):  # innermost first, should blocks nest
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        log.info("FSDP2: %d blocks sharded over %d ranks; the log-prob pass takes the full-logits path",
                 len(layers), self.world)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The policy itself: a DeepSpeed engine's module, else `model`."""
        from looprl.train import zero

        return zero.unwrap(model)

    def optimizer_step(self, model: torch.nn.Module, optimizer, grad_clip: float,
                       before_step: Callable[[], None] | None = None) -> float:
        """Clip the accumulated gradients to the global norm `grad_clip` and step the
        optimizer; returns the norm before clipping. DeepSpeed: its engine reduces, clips
        (to the `grad_clip` it was built with) and steps."""
        if before_step is not None:
            before_step()
        if self.backend == "deepspeed":
            if grad_clip != model.gradient_clipping():
                raise ValueError(f"DeepSpeed clips to the optim.grad_clip it was built with "
                                 f"({model.gradient_clipping()}), not {grad_clip}")
            model.step()
            return float(model.get_global_grad_norm())
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        optimizer.step()
        return norm

    def full_state(self, model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors `names` of a sharded `model`, whole, on every rank (a collective)."""
        if not self.distributed:
            params = dict(model.named_parameters())
            return {name: params[name] for name in names}
        if self.backend == "deepspeed":
            from looprl.train import zero

            return zero.full_state(self.unwrap(model), names)
        from torch.distributed.tensor import DTensor

        params = dict(model.named_parameters())
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for name, p in
                ((n, params[n]) for n in names)}

    def full_optimizer_state(self, model: torch.nn.Module, optimizer, names: Sequence[str]) -> dict:
        """The optimizer's state in the one-process format (`optimizer.state_dict()` of the
        unsharded model: parameters numbered in `names`' order), on every rank."""
        if self.backend == "deepspeed":
            from looprl.train import zero

            return zero.full_optimizer_state(self.unwrap(model), optimizer, names)
        if not self.distributed or not optimizer.state:
            # No step taken yet: nothing to gather (and `get_optimizer_state_dict` would
            # initialise the state with a zero step, shifting Adam's bias correction by one).
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        index = {name: i for i, name in enumerate(names)}
        state = {index[name]: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
                 for name, s in full["state"].items()}
        groups = [{**g, "params": [index[name] for name in g["params"]]} for g in full["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict, names: Sequence[str]) -> None:
        """Load a one-process optimizer state (see `full_optimizer_state`) into a sharded run."""
        if self.backend == "deepspeed":
            from looprl.train import zero

            zero.load_optimizer_state(self.unwrap(model), optimizer, state, names, self.zero_stage)
            return
        if not self.distributed or not state["state"]:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = list(names)
        full = {"state": {names[i]: s for i, s in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))

    def seed_ranks(self, seed: int) -> None:
        """Each rank's generators apart from the others' (rank 0's stay as they are)."""
        if self.distributed and self.rank > 0:
            seed_all(seed * 1_000_003 + self.rank)

    def restore_rank_rng(self, states: list[dict] | None, seed: int) -> None:
        """This rank's saved random state (rank 0's was restored with the checkpoint): a
        one-process-format checkpoint of a data-parallel run holds every rank's (`rank_rng`)."""
        if not self.distributed or self.rank == 0:
            return
        if states is not None and self.rank < len(states):
            from looprl.train.checkpoint import restore_rng_state

            restore_rng_state(rng_from_json(states[self.rank]))
        else:
            log.warning("rank %d: the checkpoint holds no random state for it (saved by %s ranks): reseeded",
                        self.rank, "one" if states is None else len(states))
            self.seed_ranks(seed)

    def close(self) -> None:
        if self.distributed:
            _destroy_process_group()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Destroy the process group while the interpreter is still whole. A gloo group left to
    the interpreter's teardown can abort its process (SIGABRT, "terminate called without an
    active exception": its worker threads drop tensors once Python is gone) after a run that
    succeeded, and the launcher then fails the whole job."""
    import atexit

    atexit.register(_destroy_process_group)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of `model` (plain or peft-wrapped): its `*DecoderLayer`
    modules, or else its `*Block` ones (GPT-2 style)."""
    for suffix in ("DecoderLayer", "Block"):
        layers = [m for m in model.modules() if type(m).__name__.endswith(suffix)]
        if layers:
            return layers
    return []


class GatheredWeights:
    """The weight sync of a rank's own unsharded sampling copy: the trainer gathers the
    trained tensors (`Parallel.full_state`, on every rank) and this copies them in."""

    def __init__(self, engine):
        self.engine = engine
        self.params = dict(engine.model.named_parameters())

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        with torch.no_grad():
            for name, value in state.items():
                self.params[name].copy_(value)
        self.engine.version = version


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_to_json(state: dict) -> dict:
    """`capture_rng_state()`'s dict as JSON values (a checkpoint's manifest holds them)."""
    version, internal, gauss = state["python"]
    out = {"python": [version, list(internal), gauss], "numpy": state["numpy"],
           "torch": state["torch"].tolist()}
    if "cuda" in state:
        out["cuda"] = [s.tolist() for s in state["cuda"]]
    return out


def rng_from_json(state: dict) -> dict:
    version, internal, gauss = state["python"]
    out = {"python": (version, tuple(internal), gauss), "numpy": state["numpy"],
           "torch": torch.tensor(state["torch"], dtype=torch.uint8)}
    if "cuda" in state:
        out["cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]]
    return out
