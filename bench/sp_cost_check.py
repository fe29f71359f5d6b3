"""The sequence-parallel cost model (`looprl.train.sp_planner.SPCostModel`) against measured step
times on this CPU with 2 processes (gloo), degree 1 and degree 2, in one run.

1. Calibration: both ranks at once (as they run in training, one thread each) time one
   forward+backward of a tiny Qwen2 (`--hidden` x `--layers`, random weights, sdpa) at each of
   `--calib-lengths`; `a1, a2, b` are fit to the slower rank's times (`calibrate`).
2. Bandwidth: gloo's all-to-all between the 2 ranks, timed on the tensors Ulysses sends
   (`s/2` tokens x `hidden` float32), bytes a device sends / second.
3. Check, at each of `--lengths` (not the calibration's): a sequence on each rank at degree 1,
   and one sequence split over both ranks at degree 2 (Ulysses attention,
   `looprl.train.ulysses`: the training path); measured (best of `--repeats`) against the
   cost model's `time(s, d)`. The ratio column is predicted / measured.

    python bench/sp_cost_check.py            (launches itself under torchrun, 2 processes)

Measured (defaults, 2-core machine): see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from looprl.train.sp_planner import SPCostModel, fit_compute  # noqa: E402
from looprl.train.ulysses import sequence_groups, shard_batch, split_sequences  # noqa: E402


def build_model(hidden: int, layers: int, max_len: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max_len,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).train()


def step_seconds(model, length: int, group, repeats: int) -> float:
    """Best of `repeats`: one forward+backward of a `length`-token sequence, split over `group`
    (None: whole on this rank); both ranks start together and the slower one's time counts."""
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
    positions = torch.arange(length)[None]
    best = float("inf")
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        dist.barrier()
        start = time.perf_counter()
        with split_sequences(model, group):
            part = shard_batch(ids, positions, group, pad_id=0)
            logits = model(input_ids=part.input_ids, position_ids=part.position_ids, use_cache=False).logits
            logits.float().logsumexp(-1).mean().backward()
        took = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        best = min(best, took.item())
    return best


def alltoall_bandwidth(tokens: int, hidden: int, repeats: int) -> float:
    """Bytes a device sends a second in gloo's all-to-all of (2, tokens/2, hidden) float32."""
    x = torch.randn(2, tokens // 2, hidden)
    out = torch.empty_like(x)
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_to_all_single(out, x)
        took = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        best = min(best, took.item())
    return x.numel() * x.element_size() / 2 / best  # half of it stays on the rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--calib-lengths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--lengths", type=int, nargs="+", default=[384, 768, 1536, 3072])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if "WORLD_SIZE" not in os.environ:  # launch this script under torchrun, 2 processes
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        sys.exit(subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                  __file__, *sys.argv[1:]], env=env))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    main_rank = dist.get_rank() == 0
    say = print if main_rank else (lambda *a, **k: None)
    say(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; 2 gloo processes, 1 thread each")
    group = sequence_groups(2)
    model = build_model(args.hidden, args.layers, max(args.lengths + args.calib_lengths))
    step_seconds(model, min(args.calib_lengths), None, 1)  # warm-up
    seconds = [step_seconds(model, s, None, args.repeats) for s in args.calib_lengths]
    a1, a2, b = fit_compute(args.calib_lengths, seconds)
    bandwidth = min(alltoall_bandwidth(s, args.hidden, args.repeats) for s in args.lengths)
    cost = SPCostModel(a1=a1, a2=a2, b=b, hidden=args.hidden, layers=args.layers, bandwidth={2: bandwidth},
                       elem_bytes=4)  # float32 on CPU
    say(f"calibrated at {args.calib_lengths}: a1 {a1:.3g} s/tok^2, a2 {a2:.3g} s/tok, b {b:.3g} s; "
        f"gloo all-to-all {bandwidth / 1e9:.2f} GB/s a device")
    say(f"{'tokens':>7} {'degree':>6} {'measured s':>11} {'predicted s':>12} {'pred/meas':>9}")
    errors = []
    for s in args.lengths:
        for d, g in ((1, None), (2, group)):
            measured = step_seconds(model, s, g, args.repeats)
            predicted = cost.time(s, d)
            errors.append(abs(predicted / measured - 1))
            say(f"{s:>7} {d:>6} {measured:>11.3f} {predicted:>12.3f} {predicted / measured:>9.2f}")
    say(f"mean |predicted / measured - 1| = {sum(errors) / len(errors):.1%} over {len(errors)} points")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
