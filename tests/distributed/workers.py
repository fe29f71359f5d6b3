"""Worker script for tests/distributed: runs under `torchrun --nproc_per_node 2 --standalone`.

    workers.py roundtrip DIR   1 -> 2: load DIR/one's checkpoint into 2 FSDP2 ranks and
                               write its full state and next-step loss to DIR/one_in_two.pt;
                               2 -> 1: train 2 ranks, save DIR/two, write DIR/two_reference.pt
    workers.py crash DIR N     N kill trials: each rank forks a writer per trial, which resumes
                               from the latest checkpoint and saves every step until the test
                               SIGKILLs it (see test_sharded_checkpoint.py)

The model, data and loss are defined here and imported by the test for its one-process runs.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from itertools import count
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  fully_shard imports it on first use (~1 s): before the supervisor forks
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

# Imported before a supervisor forks its writers, so each trial's writer starts at once.
from looprl.train.parallel import destroy_process_group_at_exit
from looprl.train.sharded_checkpoint import ShardedCheckpointer, load

IN, OUT, ROWS = 7, 5, 8  # ROWS: the global batch, split across ranks
SAVE_STEP = 3


def build_model(hidden: int = 33) -> nn.Sequential:
    """Same weights on every rank (seeded); odd sizes so FSDP2's dim-0 shards are uneven."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, hidden), nn.Tanh(), nn.Linear(hidden, 17), nn.Tanh(), nn.Linear(17, OUT))


def build_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)


def batch(step: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s global batch, this rank's contiguous share of its rows."""
    generator = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(ROWS, IN, generator=generator), torch.randn(ROWS, OUT, generator=generator)
    share = ROWS // world
    return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def forward_backward(model: nn.Module, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's loss (mean over its rows); FSDP's gradient average over equal shares is
    the gradient of the global mean."""
    x, y = batch(step, rank, world)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.detach()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int, rank: int = 0, world: int = 1) -> None:
    forward_backward(model, step, rank, world)
    optimizer.step()
    optimizer.zero_grad()


# ------------------------------------------------------------------ distributed parts


def _setup(store=None, rank=None):
    torch.set_num_threads(1)
    if store is None:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    destroy_process_group_at_exit()
    return dist.get_rank(), dist.get_world_size(), init_device_mesh("cpu", (dist.get_world_size(),))


def sharded(model: nn.Module, mesh) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The full (unsharded) model and optimizer state, on every rank."""
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def global_loss(model: nn.Module, step: int, rank: int, world: int) -> float:
    loss = forward_backward(model, step, rank, world)
    dist.all_reduce(loss)
    return (loss / world).item()


def param_sums(model: nn.Module) -> dict[str, float]:
    """Each parameter's float64 sum over all its shards (a fingerprint of the weights)."""
    sums = {}
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total = local.detach().double().sum()
        if dist.is_initialized():
            dist.all_reduce(total)
        sums[name] = total.item()
    return sums


def roundtrip(directory: Path) -> None:
    rank, world, mesh = _setup()
    # 1 -> 2
    model = sharded(build_model(), mesh)
    optimizer = build_optimizer(model)
    load(directory / "one" / f"step_{SAVE_STEP:08d}", model, optimizer)
    state = full_state(model, optimizer)
    loss = global_loss(model, SAVE_STEP + 1, rank, world)
    if rank == 0:
        torch.save({"model": state[0], "optim": state[1], "next_loss": loss}, directory / "one_in_two.pt")
    # 2 -> 1
    model = sharded(build_model(), mesh)
    optimizer = build_optimizer(model)
    checkpointer = ShardedCheckpointer(directory / "two")
    for step in range(1, SAVE_STEP + 1):
        train_step(model, optimizer, step, rank, world)
    checkpointer.save(SAVE_STEP, model, optimizer, extra={"step": SAVE_STEP})
    loss = global_loss(model, SAVE_STEP + 1, rank, world)  # overlaps the background save
    checkpointer.wait_staged()
    checkpointer.close()
    state = full_state(model, optimizer)
    if rank == 0:
        torch.save({"model": state[0], "optim": state[1], "next_loss": loss}, directory / "two_reference.pt")


# ------------------------------------------------------------------ kill trials


def _touch(path: Path, text: str = "") -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.rename(tmp, path)


def _await(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {path}")
        time.sleep(0.005)


def crash_writer(directory: Path, trial: int, rank: int) -> None:
    """Resumes from the latest checkpoint and saves every step, until SIGKILLed."""
    _touch(directory / f"pid_{trial}_{rank}", str(os.getpid()))
    store = dist.FileStore(str(directory / f"store_{trial}"), 2)
    rank, world, mesh = _setup(store, rank)
    model = sharded(build_model(hidden=256), mesh)
    optimizer = build_optimizer(model)
    checkpointer = ShardedCheckpointer(directory / "checkpoints", keep_last=3)
    start = 0
    if (path := checkpointer.latest()) is not None:
        extra = load(path, model, optimizer)
        start = extra["step"]
        assert param_sums(model) == extra["sums"], f"{path}: loaded weights differ from the saved fingerprint"
    log = os.open(directory / "published.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    _touch(directory / f"running_{trial}_{rank}")
    published = None
    for step in count(start + 1):
        forward_backward(model, step, rank, world)
        checkpointer.wait_staged()
        optimizer.step()
        optimizer.zero_grad()
        checkpointer.wait()
        if rank == 0 and published is not None:
            os.write(log, f"{published}\n".encode())
        checkpointer.save(step, model, optimizer, extra={"step": step, "sums": param_sums(model)})
        published = step


def crash(directory: Path, trials: int) -> None:
    """Each torchrun rank supervises: per trial, it forks a writer (fresh process group over a
    FileStore) and reaps it once the test has killed it. Forked before any process group or
    torch thread exists in this process."""
    rank = int(os.environ["RANK"])
    _touch(directory / f"supervisor_{rank}", str(os.getpid()))
    for trial in range(trials):
        _await(directory / f"go_{trial}")
        pid = os.fork()
        if pid == 0:
            try:
                crash_writer(directory, trial, rank)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        signal = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        _touch(directory / f"reaped_{trial}_{rank}", f"{signal}")


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    if mode == "roundtrip":
        roundtrip(folder)
    elif mode == "crash":
        crash(folder, int(sys.argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}; expected roundtrip or crash")
