"""DeepSpeed-Ulysses sequence parallelism for Hugging Face causal LMs, its group chosen per micro-batch.

Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling Training of
Extreme Long Sequence Transformer Models") splits a sequence into `d` shards, one per rank of a
group; everything but attention is per token, so it runs on the shard. Around attention one
all-to-all turns sequence shards of all heads into all of the sequence for `H/d` heads, and a
second one turns the output back:

    q, k, v  (B, H, S/d, D)  --all-to-all-->  (B, H/d, S, D)  --sdpa-->  --all-to-all-->  (B, H, S/d, D)

The attention is registered in transformers' `AttentionInterface` as `ATTENTION_NAME`; load a
model with `attn_implementation=ATTENTION_NAME` (or set `model.config._attn_implementation`).
Which group it splits over is set per micro-batch, not at registration (as DeepSpeed's
`UlyssesSPAttentionHF` does), so FlexSP-style plans can run one micro-batch at degree 2 and the
next at degree 1:

    with sequence_parallel(group):          # None or a 1-rank group: plain attention
        shard = shard_batch(input_ids, position_ids, group, pad_id)
        logits = model(input_ids=shard.input_ids, position_ids=shard.position_ids,
                       use_cache=False).logits
        logprobs = gather_sequence(token_logprobs(logits, shard.targets), group)[:, :n - 1]

The causal mask is built inside the attention from the gathered position ids: a row whose
position ids restart at 0 holds several trajectories (looprl's `packing.py`), and each attends only
to itself. Transformers builds no mask for an attention name it has no mask function for, and the
one registered here only checks that no padding mask is passed: pad at the end of a row, with
positions that keep counting (`shard_batch` does), and mask the pads out of the loss.

Gradients: every rank of a group computes the same loss on the gathered sequence, and each rank's
backward carries only its own shard's share, so the group's gradients SUM to the unsplit model's
(a data-parallel mean over these ranks must be multiplied back by the group's size; verl's
`gather_outputs_and_unpad(grad_scaler=True)` does that inside the gather instead).

Activation checkpointing re-runs the forward during backward, and the attention reads its group
when it runs: call backward inside the same `sequence_parallel` block (checked; outside it torch
raises a CheckpointError). Not covered: a KV cache (generation) is refused; the mask on packed
rows is a dense (B, 1, S, S) bool tensor (on GPU a varlen flash-attention from the gathered
position ids would avoid it).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from looprl.algorithms.core import token_logprobs
from looprl.train.zero import unwrap

ATTENTION_NAME = "looprl_ulysses"

_GROUP: ContextVar[ProcessGroup | None] = ContextVar("looprl_ulysses_group", default=None)


@contextmanager
def sequence_parallel(group: ProcessGroup | None) -> Iterator[None]:
    """Run the Ulysses attention over `group` inside the block (None: no sequence parallelism)."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def current_group() -> ProcessGroup | None:
    """The group the Ulysses attention splits over now (None outside `sequence_parallel`)."""
    return _GROUP.get()


def degree(group: ProcessGroup | None) -> int:
    """Ranks a sequence is split over: 1 for None."""
    return 1 if group is None else dist.get_world_size(group)


def rank_in(group: ProcessGroup | None) -> int:
    """This rank's shard index in `group`: 0 for None."""
    return 0 if group is None else dist.get_rank(group)


# ---------------------------------------------------------------------------------------------
# Collectives with autograd


def all_to_all(x: torch.Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    """Split `x` into `d` chunks along `scatter_dim`, send chunk j to rank j, and concatenate the
    chunks received along `gather_dim` in rank order. Differentiable: the backward is the reverse
    all-to-all."""
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def _all_to_all(x: torch.Tensor, group: ProcessGroup, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    d = dist.get_world_size(group)
    if x.shape[scatter_dim] % d:
        raise ValueError(f"Expected dim {scatter_dim} of {tuple(x.shape)} to split over {d} ranks")
    send = x.unflatten(scatter_dim, (d, -1)).movedim(scatter_dim, 0).contiguous()  # (d, ...)
    # Allocated contiguous on purpose: `empty_like(x)` keeps x's strides (the rotary output's
    # are not contiguous) while all_to_all_single writes flat chunks: the data comes out scrambled.
    received = torch.empty(send.shape, dtype=send.dtype, device=send.device)
    dist.all_to_all_single(received, send, group=group)
    # received[j] came from rank j: put j just before the gather dim, which it then leads.
    return received.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def gather_sequence(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """The shards of `x` along `dim` from every rank of `group`, concatenated in rank order
    (the padded sequence `shard_batch` split). Differentiable: each rank's backward keeps the
    gradient of its own shard (see the module docstring for how gradients add up)."""
    if degree(group) == 1:
        return x
    return _Gather.apply(x.contiguous(), group, dim)


def _all_gather(x: torch.Tensor, group: ProcessGroup, dim: int) -> torch.Tensor:
    parts = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        own = grad.narrow(ctx.dim, rank_in(ctx.group) * ctx.size, ctx.size)
        return own.contiguous(), None, None


# ---------------------------------------------------------------------------------------------
# Shards of a batch


def padded_length(length: int, degree: int) -> int:
    """`length` rounded up to a multiple of `degree`.

    >>> padded_length(7, 2), padded_length(8, 4), padded_length(1, 3)
    (8, 8, 3)
    """
    return -(-length // degree) * degree


def shard(x: torch.Tensor, degree: int, rank: int, dim: int = 1) -> torch.Tensor:
    """Shard `rank` of `degree` equal shards of `x` along `dim` (its size a multiple of `degree`)."""
    if x.shape[dim] % degree:
        raise ValueError(f"Expected dim {dim} of {tuple(x.shape)} to be a multiple of the degree {degree}; "
                         "pad it first (shard_batch does)")
    size = x.shape[dim] // degree
    return x.narrow(dim, rank * size, size)


@dataclass
class SequenceShard:
    """One rank's shard of a batch of rows (B, N) padded to (B, P), P a multiple of the degree.

    Attributes:
        input_ids: (B, P/d) this rank's tokens.
        position_ids: (B, P/d) their positions in their trajectories (the pads keep counting
            from the row's last position, so they attend only after every real token).
        targets: (B, P/d) the token each position predicts: `input_ids` of the whole row shifted
            left by one, the pad id past the end; position t of the gathered (B, P) log-probs
            is the target-aligned column t of the unsplit (B, N-1) layout for t < N-1.
        valid: (B, P/d) 1 where a position predicts a token of the row (t < N-1), 0 on the
            row's last position and on the pads: multiply the loss mask by it.
        length: N, the unpadded row length.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    length: int


def shard_batch(input_ids: torch.Tensor, position_ids: torch.Tensor, group: ProcessGroup | None,
                pad_id: int) -> SequenceShard:
    """This rank's `SequenceShard` of rows `input_ids` (B, N) with `position_ids` (B, N): every
    rank of `group` passes the same rows and gets its own shard."""
    return shard_rows(input_ids, position_ids, degree(group), rank_in(group), pad_id)


def shard_rows(input_ids: torch.Tensor, position_ids: torch.Tensor, degree: int, rank: int,
               pad_id: int) -> SequenceShard:
    """`shard_batch` for an explicit degree and rank (no process group needed)."""
    if input_ids.shape != position_ids.shape or input_ids.dim() != 2:
        raise ValueError(f"Expected input_ids and position_ids of one (B, N) shape, got "
                         f"{tuple(input_ids.shape)} and {tuple(position_ids.shape)}")
    rows, n = input_ids.shape
    pad = padded_length(n, degree) - n
    ids = F.pad(input_ids, (0, pad), value=pad_id)
    steps = torch.arange(1, pad + 1, device=position_ids.device).expand(rows, pad)
    positions = torch.cat([position_ids, position_ids[:, -1:] + steps], dim=1)
    targets = F.pad(ids[:, 1:], (0, 1), value=pad_id)
    valid = (torch.arange(n + pad, device=input_ids.device) < n - 1).expand(rows, -1).to(torch.float32)
    return SequenceShard(*(shard(t, degree, rank) for t in (ids, positions, targets, valid)), length=n)


# ---------------------------------------------------------------------------------------------
# The attention


def block_causal_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, 1, S, S) bool mask: causal within each trajectory of a row, a trajectory starting
    wherever the position does not follow the previous one (as transformers'
    `find_packed_sequence_indices`); None when every row is a single trajectory (plain causal).

    >>> block_causal_mask(torch.tensor([[0, 1, 0, 1]]))[0, 0].int()
    tensor([[1, 0, 0, 0],
            [1, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 1, 1]], dtype=torch.int32)
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    if not starts[:, 1:].any():
        return None
    document = starts.cumsum(dim=1)  # (B, S)
    same = document[:, :, None] == document[:, None, :]
    causal = torch.ones(position_ids.shape[1], position_ids.shape[1], dtype=torch.bool,
                        device=position_ids.device).tril()
    return (same & causal)[:, None]


def _repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H*times, S, D), each head repeated `times` times in place (as HF's `repeat_kv`)."""
    return x if times == 1 else x.repeat_interleave(times, dim=1)


def ulysses_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, position_ids: torch.Tensor | None = None,
                              sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over the current `sequence_parallel` group, in `AttentionInterface`'s signature:
    query (B, H, s, D), key and value (B, H_kv, s, D) of this rank's shard of s = S/d tokens;
    returns (B, s, H, D)."""
    if attention_mask is not None:
        raise ValueError("Expected no attention mask for Ulysses attention (it builds the block-causal mask "
                         "from position_ids); pass position_ids and pad at the end of rows")
    if position_ids is None:
        raise ValueError("Expected position_ids: each rank's shard needs its global positions")
    if sliding_window is not None:
        raise ValueError(f"Expected no sliding window, actually: {sliding_window}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"Expected as many keys as queries (a forward without a cache: use_cache=False), "
                         f"actually: {key.shape[2]} keys for {query.shape[2]} queries")
    group = current_group()
    d = degree(group)
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % d:
        raise ValueError(f"Expected the {heads} attention heads to split over the degree {d}")
    if d > 1:
        if kv_heads % d and d % kv_heads:
            raise ValueError(f"Expected {kv_heads} KV heads to divide or be a multiple of the degree {d}")
        # Fewer KV heads than ranks: repeat each so every rank gets one (DeepSpeed-Ulysses does the same).
        repeat = max(1, d // kv_heads)
        key, value = _repeat_heads(key, repeat), _repeat_heads(value, repeat)
        query, key, value = (all_to_all(t, group, scatter_dim=1, gather_dim=2) for t in (query, key, value))
        position_ids = _all_gather(position_ids, group, dim=1)
    # Now (B, H/d, S, D): the whole sequence for this rank's heads; each query head's KV head is local.
    key, value = (_repeat_heads(t, query.shape[1] // key.shape[1]) for t in (key, value))
    mask = block_causal_mask(position_ids.expand(query.shape[0], -1))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         is_causal=mask is None)  # (B, H/d, S, D)
    if d > 1:
        out = all_to_all(out, group, scatter_dim=2, gather_dim=1)  # (B, H, s, D)
    return out.transpose(1, 2).contiguous(), None


def _padding_check(*, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """The mask function transformers calls for `ATTENTION_NAME`: the attention builds its own
    mask, so none is made; a 2-D padding mask with any zero would be ignored, hence refused."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("Expected no padding mask for Ulysses attention: pad at the end of rows and mask "
                         "the pads out of the loss (shard_batch does)")
    return None


AttentionInterface.register(ATTENTION_NAME, ulysses_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _padding_check)


# ---------------------------------------------------------------------------------------------
# Training with it (`train.sequence_parallel`)


def sequence_groups(degree: int) -> ProcessGroup | None:
    """This rank's group when the ranks are cut into consecutive blocks of `degree` (ranks
    0..d-1, d..2d-1, ...); each block trains one data-parallel share of a minibatch. Every rank
    must call it (making a group is collective). Degree 1: None."""
    if degree == 1:
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % degree:
        raise ValueError(f"Expected train.sequence_parallel={degree} to divide the {world} processes")
    mine = None
    for start in range(0, world, degree):
        group = dist.new_group(list(range(start, start + degree)))
        if start <= rank < start + degree:
            mine = group
    return mine


def block_groups(degrees: Sequence[int]) -> dict[tuple[int, int], ProcessGroup]:
    """A group for every aligned block of each degree above 1 (ranks `start..start+d-1`, `start`
    a multiple of `d`), keyed `(d, start)`: adaptive sequence parallelism picks among them per
    minibatch (`looprl.train.update.adaptive_micro_batches`). Every rank must call it, with the
    same degrees (making a group is collective)."""
    world, groups = dist.get_world_size(), {}
    for d in sorted(set(degrees)):
        if d > 1:
            for start in range(0, world - d + 1, d):
                groups[(d, start)] = dist.new_group(list(range(start, start + d)))
    return groups


def check_heads(model: torch.nn.Module, degree: int) -> None:
    """Refuse, before training, a degree that does not split the model's attention heads."""
    config = getattr(model.config, "text_config", None) or model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % degree or (kv_heads % degree and degree % kv_heads):
        raise ValueError(f"Expected train.sequence_parallel={degree} to divide the model's {heads} attention heads "
                         f"(and its {kv_heads} KV heads to divide it or be a multiple of it)")


def splittable_degrees(model: torch.nn.Module, world: int) -> tuple[int, ...]:
    """The degrees adaptive sequence parallelism may use: 1 and the powers of two up to `world`
    that split the model's heads (`check_heads`)."""
    degrees = [1]
    while degrees[-1] * 2 <= world:
        degrees.append(degrees[-1] * 2)
    usable = []
    for d in degrees:
        try:
            check_heads(model, d)
        except ValueError:
            continue
        usable.append(d)
    return tuple(usable)


@contextmanager
def split_sequences(model: torch.nn.Module, group: ProcessGroup | None) -> Iterator[None]:
    """Inside the block, `model`'s attention is Ulysses over `group` (None or one rank: unchanged).
    Run the forward *and* the backward inside it (activation checkpointing re-runs the forward);
    generation outside it keeps the model's own attention and its KV cache."""
    if degree(group) == 1:
        yield
        return
    config = unwrap(model).config  # a DeepSpeed engine's own `config` is DeepSpeed's
    before = config._attn_implementation
    config._attn_implementation = ATTENTION_NAME
    try:
        with sequence_parallel(group):
            yield
    finally:
        config._attn_implementation = before


def split_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, group: ProcessGroup,
                         temperature: float = 1.0, pad_id: int = 0) -> torch.Tensor:
    """Log-probs (B, N-1) of each next token of right-padded rows `input_ids` (B, N), the
    sequence split over `group` (call inside `split_sequences`). Every rank of the group passes
    the same rows and gets all of the log-probs.

    The padding needs no mask: positions keep counting through a row's pads, and causal
    attention never lets a real token see a later pad, so the real tokens' log-probs are those
    of the masked, unsplit forward (the pads' own are garbage: mask them out of the loss; any
    `pad_id` does, for the few added to make the length a multiple of the degree).
    """
    rows, n = input_ids.shape
    positions = torch.arange(n, device=input_ids.device).expand(rows, n)
    part = shard_batch(input_ids, positions, group, pad_id)
    logits = model(input_ids=part.input_ids, position_ids=part.position_ids, use_cache=False).logits.float()
    if temperature != 1.0:  # float32 before the temperature, as the sampler and the unsplit pass do
        logits = logits / temperature
    return gather_sequence(token_logprobs(logits, part.targets), group)[:, :n - 1]
