"""Worker for tests/distributed/test_ulysses.py: runs under `torchrun --standalone --nproc_per_node 2`.

    ulysses_worker.py OUT.json

Every check runs Ulysses attention (`looprl.train.ulysses`) on 2 gloo ranks and the same
computation unsplit in this process (degree 1, which equals transformers' sdpa: see the test),
and rank 0 writes the largest absolute difference of each check to OUT.json. The test holds
the tolerances; this file only measures.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

from looprl.algorithms.core import token_logprobs
from looprl.train.ulysses import ATTENTION_NAME, all_to_all, gather_sequence, sequence_parallel, shard_batch

VOCAB, PAD = 97, 0


def build_model(kv_heads: int = 2, seed: int = 0) -> Qwen2ForCausalLM:
    """A tiny Qwen2 (2 layers, 4 heads, hidden 64), random weights from `seed`, Ulysses attention."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         attn_implementation=ATTENTION_NAME)
    return Qwen2ForCausalLM(config).train()  # dropout is 0: train mode only exercises the training path


def rows(seed: int, lengths: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of packed trajectories of the given lengths (all rows one width): input ids, position ids
    restarting per trajectory, and a random target-aligned (B, N-1) loss mask."""
    generator = torch.Generator().manual_seed(seed)
    width = sum(lengths[0])
    assert all(sum(row) == width for row in lengths)
    ids = torch.randint(1, VOCAB, (len(lengths), width), generator=generator)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    mask = (torch.rand(len(lengths), width - 1, generator=generator) < 0.7).float()
    return ids, positions, mask


def masked_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative mean log-likelihood of the masked targets: (B, N-1) -> ()."""
    return -(logprobs * mask).sum() / mask.sum()


def unsplit(model, ids, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, N, V) and target log-probs (B, N-1) of whole rows in this process."""
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    return logits, token_logprobs(logits[:, :-1], ids[:, 1:])


def split(model, ids, positions, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The same through sequence parallelism over `group`: gathered, cut back to N and N-1 columns."""
    n = ids.shape[1]
    with sequence_parallel(group):
        part = shard_batch(ids, positions, group, PAD)
        logits = model(input_ids=part.input_ids, position_ids=part.position_ids, use_cache=False).logits
        logprobs = gather_sequence(token_logprobs(logits, part.targets), group)
        return gather_sequence(logits, group)[:, :n], logprobs[:, :n - 1]


def grads(model) -> dict[str, torch.Tensor]:
    """The parameters' gradients summed over the ranks, then cleared."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.clone()
        dist.all_reduce(g)
        out[name] = g
        p.grad = None
    return out


def local_grads(model) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def max_diff(a, b) -> float:
    if isinstance(a, dict):
        return max(max_diff(a[k], b[k]) for k in a)
    return float((a.detach() - b.detach()).abs().max())


def check_degree_2(world, kv_heads: int) -> dict[str, float]:
    """Logits, masked loss and gradients at degree 2 against the unsplit model; N odd (padded)."""
    model = build_model(kv_heads)
    ids, positions, mask = rows(1, [[13], [6, 7]])
    ref_logits, ref_lp = unsplit(model, ids, positions)
    ref_loss = masked_loss(ref_lp, mask)
    ref_loss.backward()
    ref_grads = local_grads(model)
    logits, lp = split(model, ids, positions, world)
    loss = masked_loss(lp, mask)
    with sequence_parallel(world):  # no recompute here, but backward inside the block is the safe habit
        loss.backward()
    tag = f"kv{kv_heads}"
    return {f"{tag}/logits": max_diff(logits, ref_logits), f"{tag}/logprobs": max_diff(lp, ref_lp),
            f"{tag}/loss": max_diff(loss, ref_loss), f"{tag}/grads": max_diff(grads(model), ref_grads)}


def check_checkpointed(world) -> dict[str, float]:
    """Gradient checkpointing re-runs the forward in backward: inside the `sequence_parallel` block
    the gradients equal the unsplit model's (outside it, torch raises a CheckpointError)."""
    model = build_model()
    model.gradient_checkpointing_enable()
    ids, positions, mask = rows(1, [[13], [6, 7]])
    masked_loss(unsplit(model, ids, positions)[1], mask).backward()
    ref = local_grads(model)
    with sequence_parallel(world):
        masked_loss(split(model, ids, positions, world)[1], mask).backward()
    return {"checkpointed/grads": max_diff(grads(model), ref)}


def check_mixed(world, singles) -> dict[str, float]:
    """Micro-batch 1 at degree 2 over both ranks, micro-batch 2 at degree 1 on each rank (its own
    rows, a 1-rank group), gradients accumulated: equal to one process running all three."""
    rank = dist.get_rank()
    model = build_model()
    long = rows(2, [[21], [9, 12]])
    short = [rows(3 + r, [[5, 4]]) for r in range(2)]
    for ids, positions, mask in [long, *short]:
        masked_loss(unsplit(model, ids, positions)[1], mask).backward()
    ref = local_grads(model)
    ids, positions, mask = long
    masked_loss(split(model, ids, positions, world)[1], mask).backward()
    ids, positions, mask = short[rank]
    masked_loss(split(model, ids, positions, singles[rank])[1], mask).backward()
    return {"mixed/grads": max_diff(grads(model), ref)}


def check_packed(world) -> dict[str, float]:
    """A row of two trajectories at degree 2 (the second spans both shards): each one's logits
    equal those of the trajectory alone. `leak` is the same row through sdpa with a cache (one
    causal mask over the row): it must differ, or the check could not see a leak."""
    model = build_model()
    ids, positions, _ = rows(4, [[6, 7]])
    logits, _ = split(model, ids, positions, world)
    first = unsplit(model, ids[:, :6], positions[:, :6])[0]
    second = unsplit(model, ids[:, 6:], positions[:, 6:])[0]
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        leaky = model(input_ids=ids, position_ids=positions, use_cache=True).logits
    return {"packed/first": max_diff(logits[:, :6], first), "packed/second": max_diff(logits[:, 6:], second),
            "packed/leak": max_diff(leaky[:, 6:], second)}


def check_all_to_all(world) -> dict[str, float]:
    """all_to_all's forward and backward against slicing the whole tensor in one process."""
    rank, d = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(5)
    whole = torch.randn(2, 4, 6, 3, generator=generator)  # (B, H, S, D)
    weights = torch.randn(d, 2, 4 // d, 6, 3, generator=generator)  # one per rank, on its output
    # Non-contiguous input (as the rotary output is): a transposed copy.
    x = whole[:, :, rank * 3:(rank + 1) * 3].transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    y = all_to_all(x, world, scatter_dim=1, gather_dim=2)  # (B, H/d, S, D)
    (y * weights[rank]).sum().backward()
    heads = slice(rank * 4 // d, (rank + 1) * 4 // d)
    whole.requires_grad_()
    sum((whole[:, r * 4 // d:(r + 1) * 4 // d] * weights[r]).sum() for r in range(d)).backward()
    return {"all_to_all/forward": max_diff(y, whole[:, heads]),
            "all_to_all/backward": max_diff(x.grad, whole.grad[:, :, rank * 3:(rank + 1) * 3])}


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.group.WORLD
    singles = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank creates every group
    result = {**check_all_to_all(world), **check_degree_2(world, kv_heads=2), **check_degree_2(world, kv_heads=1),
              **check_mixed(world, singles), **check_packed(world), **check_checkpointed(world)}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, result)
    if dist.get_rank() == 0:
        worst = {k: max(r[k] for r in every) for k in result}
        with open(out, "w") as f:
            json.dump(worst, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
