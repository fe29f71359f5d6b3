"""How long a checkpoint stalls the training loop: synchronous saves against `ShardedCheckpointer`'s async save.

The state is an MLP of `--layers` Linear(`--width`, `--width`) layers and its AdamW state
(weights, exp_avg, exp_avg_sq: 12 bytes per parameter; the defaults make 11 x 2048^2 =
46 M parameters, 554 MB). The training step is forward + backward of a `--batch` x
`--width` input, then `optimizer.step()`. In the same run, `--repeats` times each:

- `torch.save` of the model and optimizer state dicts to one file, then fsync (what a
  durable synchronous checkpoint costs; CheckpointManager also fsyncs);
- `dcp.save` of `get_state_dict(model, optimizer)` (synchronous DCP, files fsynced);
- `ShardedCheckpointer.save`, then forward + backward, then `wait_staged()` before the
  optimizer step: the stall is the time spent in `save()` plus in `wait_staged()`, what
  the loop waits for; the writing goes on behind the following steps, whose mean step
  time is printed next to the steps without a save (on a 2-core machine the writer
  competes with the training for the CPU: that slowdown is not in the stall).

The first async save allocates the staging buffers (reused afterwards) and is printed
separately. One process, no process group: the sharded path under torchrun writes each
rank's shards the same way, but that is not measured here.

    python bench/async_save.py [--layers 11] [--width 2048] [--batch 64] [--repeats 3] [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.checkpoint.state_dict import get_state_dict  # noqa: E402

from looprl.train.sharded_checkpoint import ShardedCheckpointer  # noqa: E402

# DCP warns on every save without a process group; here that is the point.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def build(layers: int, width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    model(x).square().mean().backward()


def step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    start = time.perf_counter()
    forward_backward(model, x)
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(model.state_dict().values()) + [
        v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def torch_save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - start


def dcp_save(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> float:
    start = time.perf_counter()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    return time.perf_counter() - start


def async_save(checkpointer: ShardedCheckpointer, number: int, model, optimizer, x) -> dict:
    """One async save inside a training step, then steps until it is published."""
    start = time.perf_counter()
    checkpointer.save(number, model, optimizer, extra={"step": number})
    in_save = time.perf_counter() - start
    forward_backward(model, x)
    before_wait = time.perf_counter()
    checkpointer.wait_staged()
    in_wait = time.perf_counter() - before_wait
    optimizer.step()
    optimizer.zero_grad()
    overlapped = []
    while not (checkpointer.directory / f"step_{number:08d}").exists():
        checkpointer.poll()
        overlapped.append(step(model, optimizer, x))
    written = time.perf_counter() - start
    checkpointer.wait()
    return {"stall": in_save + in_wait, "in_save": in_save, "in_wait_staged": in_wait,
            "written": written, "overlapped": overlapped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64, help="rows per training step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine: see CPU-FACTS)")
    parser.add_argument("--out", default="/tmp/looprl-bench-async-save", help="scratch folder, removed afterwards")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model, optimizer = build(args.layers, args.width)
    x = torch.randn(args.batch, args.width)
    step(model, optimizer, x)  # creates the AdamW state
    print(f"state {state_bytes(model, optimizer) / 1e6:.0f} MB ({args.layers} x Linear({args.width}, {args.width}) + AdamW), "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f} at start")
    checkpointer = ShardedCheckpointer(out / "async", keep_last=1)
    first = async_save(checkpointer, 0, model, optimizer, x)
    rows: dict[str, list[float]] = {"torch.save + fsync": [], "dcp.save": [], "async save": []}
    plain_steps, overlapped, written = [], [], []
    try:
        for repeat in range(args.repeats):
            plain_steps += [step(model, optimizer, x) for _ in range(3)]
            rows["torch.save + fsync"].append(torch_save(model, optimizer, out / "full.pt"))
            (out / "full.pt").unlink()
            rows["dcp.save"].append(dcp_save(model, optimizer, out / "dcp"))
            shutil.rmtree(out / "dcp")
            result = async_save(checkpointer, repeat + 1, model, optimizer, x)
            rows["async save"].append(result["stall"])
            overlapped += result["overlapped"]
            written.append(result["written"])
        checkpointer.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end; medians of {args.repeats}:")
    medians = {name: statistics.median(values) for name, values in rows.items()}
    for name, value in medians.items():
        print(f"  {name:<20} stalls the loop {value:7.3f} s   (all: {', '.join(f'{v:.3f}' for v in rows[name])})")
    print(f"  async / torch.save: {medians['async save'] / medians['torch.save + fsync']:.3f}   "
          f"async / dcp.save: {medians['async save'] / medians['dcp.save']:.3f}")
    print(f"  first async save (allocates the staging buffers): {first['stall']:.3f} s "
          f"(in save() {first['in_save']:.3f} s, in wait_staged() {first['in_wait_staged']:.3f} s)")
    during = f"{statistics.mean(overlapped):.3f} s" if overlapped else "-"
    print(f"  async save published after {statistics.median(written):.2f} s (median); training step "
          f"{statistics.mean(plain_steps):.3f} s without a save, {during} while one is written ({len(overlapped)} steps)")


if __name__ == "__main__":
    main()
