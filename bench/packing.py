"""Tokens/s of the policy loss's forward and backward, padded micro-batches against packed ones.

`--trajectories` random trajectories with long-tailed lengths (lognormal, median
`--median`, clipped to [`--min-len`, `--max-len`]), in minibatches of `--minibatch` (as
`minibatch_update` plans each minibatch's micro-batches on its own), go through a forward
and backward of a token-mean LOOP loss, micro-batch after micro-batch, three ways at the
same `--tokens` budget a micro-batch:

- padded, the trainer's default path: `micro_batches` (length-sorted, rows x longest <=
  budget), `collate`, `policy_logprobs`;
- padded in order: the same, but micro-batches of consecutive rows as the minibatch
  comes, which is what a collator that pads each batch to its longest does (TRL's);
- packed, `algorithm.packing`'s path: `balanced_micro_batches` (sum of lengths <= budget),
  `collate_packed` with rows of at most `--row-tokens`, `packed_policy_logprobs`, `unpack`.

The model is the tiny Qwen2 config (`looprl.train.tiny.TinySpec`) at `--hidden` and
`--layers`, random weights, built here: nothing is read or downloaded. tokens/s counts
the trajectories' tokens (no padding) over the best of `--repeats` passes, after one
warm-up pass; the paths run in this process, alternately, so a change of load hits
both. The load average is printed: on a busy machine the figures are not comparable
with other runs, only with each other.

    python bench/packing.py [--trajectories 256] [--minibatch 64] [--tokens 4096] [--row-tokens 1024] [--hidden 256] [--layers 4]

Measured (`--trajectories 128 --repeats 2`, 1 thread, on a 2-core machine at load 4.2,
2026-12-04): padded 8 micro-batches, 28,595 tokens computed (66% real), 1,429 tokens/s;
padded in order 15 micro-batches, 51,796 tokens (37% real), 764 tokens/s; packed 6
micro-batches, 21,482 tokens (89% real), 1,726 tokens/s. Packed / padded in order 2.26x;
packed / padded (length-sorted) 1.21x (1.33x in an earlier run at load 3.8). Before
`packing.confined_attention` (sdpa under the block-diagonal mask, which computes every
query-key pair of a 1,024-token row) packed / padded was 0.72x at load 4.3. Against the
length-sorted path the gain is the padding it leaves, no more: 1.48x with `--minibatch 32`
(57% real padded), 0.98x with `--sigma 1.5` (73% real padded, 84% packed, where the rows
of 1,024-token trajectories dominate both).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from looprl.algorithms.loop import loop_loss  # noqa: E402
from looprl.train.balance import balanced_micro_batches  # noqa: E402
from looprl.train.batch import collate, micro_batches, policy_logprobs  # noqa: E402
from looprl.train.packing import collate_packed, packed_policy_logprobs, unpack  # noqa: E402
from looprl.train.tiny import TinySpec  # noqa: E402
from looprl.types import Trajectory  # noqa: E402

PAD_ID = 0


def build_model(hidden: int, layers: int):
    """The tiny Qwen2 at `hidden` x `layers` (the MLP 4x wider, as `TinySpec`'s default), random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = TinySpec(hidden_size=hidden, num_layers=layers, intermediate_size=4 * hidden)
    config = Qwen2Config(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                         num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                         max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(spec.init_seed)
    return Qwen2ForCausalLM(config).train()


def trajectories(args) -> list[Trajectory]:
    """Long-tailed lengths; the second half of each trajectory is sampled (loss mask 1)."""
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.trajectories):
        n = min(args.max_len, max(args.min_len, round(rng.lognormvariate(math.log(args.median), args.sigma))))
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        out.append(Trajectory([rng.randrange(1, 512) for _ in range(n)], mask,
                              [-rng.random() * 3 if m else 0.0 for m in mask], turn_spans=[(n // 2, n)]))
    return out


def minibatches(trajs, advantages, size: int):
    """(trajectories, advantages, sampled tokens) of each minibatch, in order."""
    for i in range(0, len(trajs), size):
        part = trajs[i:i + size]
        yield part, advantages[i:i + size], float(sum(t.num_sampled_tokens for t in part))


def in_order_groups(lengths, budget: int) -> list[list[int]]:
    """Micro-batches of consecutive rows, each padded to its longest under `budget` tokens: a
    collator that pads a minibatch in the order it comes (TRL's and most trainers' default)."""
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        if groups and (len(groups[-1]) + 1) * max(n, *(lengths[j] for j in groups[-1])) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def padded_pass(model, trajs, advantages, total: float, budget: int, sort: bool = True) -> tuple[int, int]:
    """The trainer's path on one minibatch (`sort`: length-sorted micro-batches; else in order);
    returns the micro-batches run and their tokens, padding included."""
    lengths = [len(t.input_ids) for t in trajs]
    groups = micro_batches(lengths, budget) if sort else in_order_groups(lengths, budget)
    size = 0
    for group in groups:
        batch = collate([trajs[i] for i in group], PAD_ID, [advantages[i] for i in group])
        logprobs = policy_logprobs(model, batch)
        loss, _ = loop_loss(logprobs, batch.old_logprobs, batch.advantages, batch.loss_mask,
                            loss_agg="token-mean", global_count=total)
        loss.backward()
        size += batch.input_ids.numel()
    return len(groups), size


def packed_pass(model, trajs, advantages, total: float, budget: int, row_tokens: int) -> tuple[int, int]:
    """Packed micro-batches of one minibatch, the loss on the unpacked (B, L-1) logprobs; returns the
    micro-batches run and their tokens, the rows' tail padding included."""
    (groups,) = balanced_micro_batches([len(t.input_ids) for t in trajs], world_size=1, max_tokens=budget)
    size = 0
    for group in groups:
        packed = collate_packed([trajs[i] for i in group], PAD_ID, [advantages[i] for i in group],
                                max_tokens=row_tokens)
        logprobs = unpack(packed, packed_policy_logprobs(model, packed))
        loss, _ = loop_loss(logprobs, unpack(packed, packed.old_logprobs), packed.advantages,
                            unpack(packed, packed.loss_mask), loss_agg="token-mean", global_count=total)
        loss.backward()
        size += packed.input_ids.numel()
    return len(groups), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=256)
    parser.add_argument("--minibatch", type=int, default=64, help="trajectories a minibatch (the configs' 24-96)")
    parser.add_argument("--median", type=float, default=100, help="median length (lognormal)")
    parser.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the lengths")
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=4096, help="token budget of a micro-batch, both paths")
    parser.add_argument("--row-tokens", type=int, default=1024, help="tokens of a packed row at most")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    print(f"load average {load:.2f} on {cores} cores" + (" (busy: figures comparable only within this run)"
                                                       if load > cores - args.threads else ""))
    model = build_model(args.hidden, args.layers)
    trajs = trajectories(args)
    lengths = sorted(len(t.input_ids) for t in trajs)
    tokens = sum(lengths)
    advantages = [random.Random(args.seed + i).uniform(-1, 1) for i in range(len(trajs))]
    mbs = list(minibatches(trajs, advantages, args.minibatch))
    print(f"{len(trajs)} trajectories in minibatches of {args.minibatch}, {tokens} tokens, lengths min {lengths[0]} "
          f"median {lengths[len(lengths) // 2]} max {lengths[-1]}; hidden {args.hidden}, {args.layers} layers, "
          f"{args.threads} thread(s); budget {args.tokens} tokens a micro-batch, packed rows of <= {args.row_tokens}")
    paths = {"padded": lambda: [padded_pass(model, *mb, args.tokens) for mb in mbs],
             "in order": lambda: [padded_pass(model, *mb, args.tokens, sort=False) for mb in mbs],
             "packed": lambda: [packed_pass(model, *mb, args.tokens, args.row_tokens) for mb in mbs]}
    times: dict[str, list[float]] = {name: [] for name in paths}
    counts: dict[str, list[tuple[int, int]]] = {}
    for repeat in range(args.repeats + 1):  # the first: warm-up, not timed
        for name, run in paths.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            counts[name] = run()
            if repeat:
                times[name].append(time.perf_counter() - start)
    best = {name: min(t) for name, t in times.items()}
    for name in paths:
        runs, computed = (sum(c) for c in zip(*counts[name]))
        print(f"{name:>8}: {runs:>3} micro-batches, {computed:>6} tokens computed ({tokens / computed:.0%} real), "
              f"best {best[name]:7.2f} s, {tokens / best[name]:6.0f} tokens/s")
    print(f"packed / padded: {best['padded'] / best['packed']:.2f}x tokens/s; packed / padded in order "
          f"(a collator that pads each minibatch as it comes): {best['in order'] / best['packed']:.2f}x")


if __name__ == "__main__":
    main()
