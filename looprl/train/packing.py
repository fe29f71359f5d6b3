"""Trajectories packed end to end, with no padding between them, and the policy's logprobs on them.

`collate` pads every row to the longest trajectory of its micro-batch; here the
trajectories are laid one after the other in a few rows, each restarting its
`position_ids` at 0, and attention is confined to each trajectory by the model itself:
transformers (5.x) builds a block-diagonal causal mask from `position_ids` when it is
given no `attention_mask` and no cache (`masking_utils.find_packed_sequence_indices`,
the packing of TRL's `padding_free` and of verl's remove-padding path). With a cache,
or with an `attention_mask`, it falls back to one causal mask over the whole row and
attention leaks across trajectories; `packing_support` checks on a short probe, once
per model, that it does not.

A block-diagonal mask still makes sdpa compute every query-key pair of a row (on a CPU,
and on a GPU without flash-attention's varlen kernels), so the packed forward runs under
`confined_attention`: each trajectory's queries, keys and values are gathered into
right-padded batches of like lengths and go through causal sdpa on their own (the
varlen kernels' work, sum of L^2 instead of N^2 a row; right padding needs no mask, as no
real query sees a later key). Everything else (a cache, a padding mask) is plain sdpa.

Everything target-aligned sits at the position that predicts its token, as in `Batch`:
position t of a row predicts token t+1, so a trajectory's last position (which would
predict the next trajectory's first token) and the row's tail padding predict nothing
and carry a zero `loss_mask`. `unpack` maps any (R, N-1) packed tensor back to the
(B, L-1) padded layout of `policy_logprobs(model, collate(...))`.
"""

from __future__ import annotations

import dataclasses
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from looprl.algorithms.core import token_logprobs
from looprl.train.balance import balanced_micro_batches
from looprl.train.batch import Batch
from looprl.train.logprobs import default_chunk_tokens, lm_parts
from looprl.train.zero import unwrap
from looprl.types import Trajectory

PROBE_LENGTHS = (5, 3)  # two trajectories in one row: the second must not see the first
DOCUMENTS_ATTENTION = "looprl_documents"  # `confined_attention`'s name in transformers' AttentionInterface

# Per model: None when attention stays inside each packed trajectory, else why not.
_SUPPORT: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


@dataclass
class PackedBatch:
    """Trajectories laid end to end in R rows of N tokens; everything after `position_ids`,
    but `advantages` and the index tensors, is aligned with the targets `input_ids[:, 1:]`.

    Attributes:
        input_ids: (R, N) the trajectories one after the other, then `pad_id` up to N.
        position_ids: (R, N) 0, 1, ... within each trajectory (the tail padding counts as
            one more, so it is a document of its own).
        loss_mask: (R, N-1) 1 on sampled target tokens; 0 on each trajectory's last position
            and on padding.
        old_logprobs: (R, N-1) behaviour logprobs of the targets.
        token_advantages: (R, N-1) each trajectory's advantage on its target positions.
        segments: (R, N-1) turn index of each target token (for per-turn ratios).
        sequence_ids: (R, N-1) index into the trajectories of each target position; -1
            where a position predicts nothing (for per-trajectory sums: `index_add`).
        advantages: (B,) one per trajectory, in the order given.
        rows: (B,) the row of each trajectory.
        starts: (B,) the column of its first token.
        lengths: (B,) its number of tokens.
        proximal_logprobs: (R, N-1) proximal-policy logprobs of the targets (decoupled
            PPO), or None when the trajectories carry none.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    loss_mask: torch.Tensor
    old_logprobs: torch.Tensor
    token_advantages: torch.Tensor
    segments: torch.Tensor
    sequence_ids: torch.Tensor
    advantages: torch.Tensor
    rows: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    proximal_logprobs: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch on `device` (built on the host, moved in one copy per tensor)."""
        return PackedBatch(*(None if (t := getattr(self, f.name)) is None else t.to(device, non_blocking=True)
                             for f in dataclasses.fields(self)))


def pack_rows(lengths: Sequence[int], max_tokens: int | None = None) -> list[list[int]]:
    """Indices of the trajectories in each row: first-fit decreasing under `max_tokens`
    tokens a row (None: one row). A trajectory longer than the cap gets a row of its own.

    >>> pack_rows([5, 9, 3, 4], max_tokens=10)
    [[1], [0, 3], [2]]
    """
    if max_tokens is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, u in enumerate(used) if u + lengths[i] <= max_tokens), None)
        if row is None:
            rows.append([i])
            used.append(lengths[i])
        else:
            rows[row].append(i)
            used[row] += lengths[i]
    return rows


def collate_packed(trajectories: Sequence[Trajectory], pad_id: int, advantages: Sequence[float] | None = None,
                   device: torch.device | str | None = None, max_tokens: int | None = None) -> PackedBatch:
    """Pack `trajectories` into a `PackedBatch` on `device` (the policy's; None: the CPU).

    Args:
        trajectories: at least one, each of at least one token.
        pad_id: fills each row after its last trajectory, up to the longest row.
        advantages: one per trajectory (default: zeros).
        device: where the tensors go.
        max_tokens: tokens a row holds at most (None: every trajectory in one row); a
            trajectory longer than that gets a row of its own.
    """
    _check(trajectories, advantages, max_tokens)
    lengths = [len(t.input_ids) for t in trajectories]
    layout = pack_rows(lengths, max_tokens)
    width = max(sum(lengths[i] for i in row) for row in layout)
    shape = (len(layout), width)
    host = {"device": "cpu"}  # built on the host, whatever torch's default device, then moved in one copy each
    input_ids = torch.full(shape, pad_id, dtype=torch.long, **host)
    position_ids = torch.zeros(shape, dtype=torch.long, **host)
    # Target-aligned, one column more than needed so a width-1 row can still be written; cut below.
    loss_mask, logprobs, token_adv = (torch.zeros(shape, dtype=torch.float32, **host) for _ in range(3))
    segments = torch.zeros(shape, dtype=torch.long, **host)
    sequence_ids = torch.full(shape, -1, dtype=torch.long, **host)
    proximal = torch.zeros(shape, dtype=torch.float32, **host) if trajectories[0].proximal_logprobs is not None else None
    adv = [float(a) for a in advantages] if advantages is not None else [0.0] * len(trajectories)
    rows, starts = [0] * len(trajectories), [0] * len(trajectories)
    for r, members in enumerate(layout):
        start = 0
        for i in members:
            traj, n = trajectories[i], lengths[i]
            rows[i], starts[i] = r, start
            input_ids[r, start:start + n] = torch.tensor(traj.input_ids, **host)
            position_ids[r, start:start + n] = torch.arange(n, **host)
            # Position start + j predicts token j + 1 of this trajectory (j < n - 1).
            targets = slice(start, start + n - 1)
            loss_mask[r, targets] = torch.tensor(traj.loss_mask[1:], dtype=torch.float32, **host)
            logprobs[r, targets] = torch.tensor(traj.behaviour_logprobs[1:], dtype=torch.float32, **host)
            if proximal is not None:
                proximal[r, targets] = torch.tensor(traj.proximal_logprobs[1:], dtype=torch.float32, **host)
            token_adv[r, targets] = adv[i]
            sequence_ids[r, targets] = i
            for turn, (first, end) in enumerate(traj.turn_spans):
                # Token k's target position is start + k - 1; token 0 has none.
                segments[r, start + max(first, 1) - 1:start + end - 1] = turn
            start += n
        position_ids[r, start:] = torch.arange(width - start, **host)
    out = PackedBatch(input_ids, position_ids, loss_mask[:, :-1], logprobs[:, :-1], token_adv[:, :-1],
                      segments[:, :-1], sequence_ids[:, :-1], torch.tensor(adv, dtype=torch.float32, **host),
                      torch.tensor(rows, **host), torch.tensor(starts, **host), torch.tensor(lengths, **host),
                      None if proximal is None else proximal[:, :-1])
    return out if device is None or torch.device(device).type == "cpu" else out.to(device)


def _check(trajectories: Sequence[Trajectory], advantages: Sequence[float] | None, max_tokens: int | None) -> None:
    """One-line errors for what `collate_packed` cannot pack."""
    if not trajectories:
        raise ValueError("Expected at least one trajectory to pack, actually none")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"Expected max_tokens >= 1 or None, actually {max_tokens}")
    if advantages is not None and len(advantages) != len(trajectories):
        raise ValueError(f"Expected one advantage per trajectory ({len(trajectories)}), actually {len(advantages)}")
    with_proximal = sum(t.proximal_logprobs is not None for t in trajectories)
    if with_proximal not in (0, len(trajectories)):
        raise ValueError("Expected proximal_logprobs on every trajectory of a batch or on none, "
                         f"actually on {with_proximal} of {len(trajectories)}")
    for i, t in enumerate(trajectories):
        n = len(t.input_ids)
        fields = {"loss_mask": t.loss_mask, "behaviour_logprobs": t.behaviour_logprobs}
        if t.proximal_logprobs is not None:
            fields["proximal_logprobs"] = t.proximal_logprobs
        wrong = {name: len(v) for name, v in fields.items() if len(v) != n}
        if wrong:
            raise ValueError(f"Expected the fields of trajectory {i} as long as its input_ids ({n}), actually {wrong}")
        if n == 0:
            raise ValueError(f"Expected every trajectory to have at least one token, trajectory {i} has none")


def unpack(packed: PackedBatch, values: torch.Tensor) -> torch.Tensor:
    """(R, N-1) target-aligned packed values to the (B, L-1) padded layout of `collate`.

    Row b, position t holds what predicts token t+1 of trajectory b (t < its length - 1),
    as in `policy_logprobs(model, collate(...))`; the positions after that, where the
    padded path holds the model's guesses about padding, hold 0 (callers mask both).
    Differentiable: gradients flow back to `values`.
    """
    expected = (packed.input_ids.shape[0], packed.input_ids.shape[1] - 1)
    if tuple(values.shape[:2]) != expected:
        raise ValueError(f"Expected values of shape (R, N-1) = {expected}, actually {tuple(values.shape)}")
    length = int(packed.lengths.max())
    offsets = torch.arange(max(length - 1, 0), device=values.device)  # (L-1,)
    valid = offsets < (packed.lengths.to(values.device) - 1).unsqueeze(1)  # (B, L-1)
    columns = (packed.starts.to(values.device).unsqueeze(1) + offsets).clamp(max=expected[1] - 1)
    flat = packed.rows.to(values.device).unsqueeze(1) * expected[1] + columns  # (B, L-1)
    gathered = values.reshape(expected[0] * expected[1], *values.shape[2:])[flat]
    return torch.where(valid.view(*valid.shape, *[1] * (values.dim() - 2)), gathered, torch.zeros_like(gathered))


def as_batch(packed: PackedBatch, pad_id: int) -> Batch:
    """The `Batch` that `collate` gives for the same trajectories (equal, tensor for tensor),
    built from `packed`: what the losses read next to the `unpack`ed log-probs."""
    length = int(packed.lengths.max())
    device = packed.input_ids.device
    offsets = torch.arange(length, device=device)
    valid = offsets < packed.lengths.unsqueeze(1)  # (B, L)
    width = packed.input_ids.shape[1]
    flat = packed.rows.unsqueeze(1) * width + (packed.starts.unsqueeze(1) + offsets).clamp(max=width - 1)
    input_ids = torch.where(valid, packed.input_ids.reshape(-1)[flat], pad_id)
    proximal = None if packed.proximal_logprobs is None else unpack(packed, packed.proximal_logprobs)
    return Batch(input_ids, valid.long(), unpack(packed, packed.loss_mask), unpack(packed, packed.old_logprobs),
                 packed.advantages, unpack(packed, packed.segments), proximal)


def packed_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Micro-batches of at most `max_tokens` tokens (their sum: packed, nothing pads), balanced,
    heaviest first; a row longer than the budget alone (`balance.balanced_micro_batches`).

    >>> packed_micro_batches([100, 30, 30, 20, 10, 10], max_tokens=100)
    [[0], [1, 2, 3, 4, 5]]
    """
    (groups,) = balanced_micro_batches(lengths, world_size=1, max_tokens=max_tokens)
    return [group for group in groups if group]


def packed_policy_logprobs(model, packed: PackedBatch, temperature: float = 1.0,
                           chunk_tokens: int | None = None) -> torch.Tensor:
    """Logprobs (R, N-1) of each packed target token under `model`, attention confined to
    each trajectory; `unpack` gives the (B, L-1) of `policy_logprobs(model, collate(...))`.

    The body runs once with `position_ids` and no mask or cache (what makes transformers
    isolate the trajectories); the LM head then projects `chunk_tokens` at a time (None:
    `default_chunk_tokens`), each chunk recomputed in the backward, as
    `looprl.train.logprobs.token_logprobs_chunked` does for padded rows.

    Raises:
        ValueError: when `packing_support(model)` finds attention leaking across trajectories.
    """
    reason = packing_support(model)
    if reason is not None:
        raise ValueError(f"Packed log-probs need attention confined to each trajectory: {reason}")
    targets = packed.input_ids[:, 1:]  # (R, N-1)
    parts = lm_parts(model)
    if parts is None:  # no body and head of its own: the model's full logits
        with confined_attention(unwrap(model)):
            logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        return token_logprobs(logits[:, :-1].float() / temperature, targets)
    body, head, softcap = parts
    with confined_attention(unwrap(model)):
        hidden = body(input_ids=packed.input_ids, position_ids=packed.position_ids,
                      use_cache=False).last_hidden_state
    flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (R * (N-1), hidden)
    flat_targets = targets.reshape(-1)
    chunk_tokens = chunk_tokens or default_chunk_tokens(model)
    needs_grad = torch.is_grad_enabled() and (
        flat_hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    outs = []
    for start in range(0, flat_targets.numel(), chunk_tokens):
        args = (head, softcap, temperature, flat_hidden[start:start + chunk_tokens],
                flat_targets[start:start + chunk_tokens])
        outs.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if needs_grad else _chunk_logprobs(*args))
    if not outs:  # rows of one token: no targets, still attached to the graph
        return flat_hidden.float().sum(-1).view(targets.shape)
    return torch.cat(outs).view(targets.shape)


def _chunk_logprobs(head, softcap: float | None, temperature: float, hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    """(n,) logprobs of one chunk; its (n, V) float32 logits die here (softcap, then temperature)."""
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return token_logprobs(logits / temperature if temperature != 1.0 else logits, targets)


def packing_support(model) -> str | None:
    """None when `model` keeps attention inside each packed trajectory; else what leaked.

    Checked once per model on a probe: two rows, each of two short trajectories, whose
    first trajectories differ and whose second ones are the same. Confined attention
    gives the second trajectory the same logits in both rows (exactly: the masked
    keys add exact zeros, in kernels of the same shapes). What decides it is the
    model's attention implementation and the transformers version (the masks are built
    there), so a change to either is seen here, not in the gradients.
    """
    try:
        return _SUPPORT[model]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable
        pass
    reason = _probe(model)
    try:
        _SUPPORT[model] = reason
    except TypeError:
        pass
    return reason


def _probe(model) -> str | None:
    """The second trajectory's logits after two different first ones, one forward each."""
    param = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    first, second = PROBE_LENGTHS
    ids = (torch.arange(first + second, device=param.device) * 7919 % vocab).repeat(2, 1)
    ids[1, :first] = (ids[1, :first] + 1) % vocab
    positions = torch.cat([torch.arange(first), torch.arange(second)]).to(param.device).repeat(2, 1)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # two forwards under dropout would differ by chance
        with torch.no_grad(), confined_attention(unwrap(model)):
            logits = torch.cat([model(input_ids=ids[i:i + 1], position_ids=positions[i:i + 1], use_cache=False)
                                .logits[:, first:].float() for i in range(2)])
    finally:
        for m, training in modes:
            m.training = training
    error = (logits[0] - logits[1]).abs().max().item()
    tolerance = torch.finfo(param.dtype).eps * (1 + logits.abs().max().item())
    if not error <= tolerance:
        implementation = getattr(model.config, "_attn_implementation", "?")
        return (f"with attn_implementation={implementation!r} a trajectory's logits change with the one packed "
                f"before it, by {error:.3g} (> {tolerance:.3g})")
    return None


# --- attention that computes only within each packed trajectory -----------------------------


@contextmanager
def confined_attention(model) -> Iterator[None]:
    """Inside the block, a forward of `model` without a mask or cache computes attention within
    each packed trajectory only (`documents_attention`), if its attention is sdpa without sliding
    windows; else unchanged (flash-attention's varlen kernels, eager: the model's own). Restored on exit."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa" or "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        yield  # a sliding window: transformers' own block mask over the window
        return
    config._attn_implementation = DOCUMENTS_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def bucket_length(n: int) -> int:
    """`n` rounded up to a multiple of an eighth of the power of two at or above it (at least 16): a trajectory's
    padded length in `documents_attention`, so that few sdpa calls cover many lengths.

    >>> [bucket_length(n) for n in (1, 16, 17, 100, 1000, 1025)]
    [16, 16, 32, 112, 1024, 1280]
    """
    step = max(16, 1 << max(0, (n - 1).bit_length() - 3))
    return -(-n // step) * step


def document_spans(position_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, length) of every trajectory of (B, S) `position_ids`: one starts wherever
    the position does not follow the previous one (as transformers' `find_packed_sequence_indices`).

    >>> document_spans(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]))
    [(0, 0, 3), (0, 3, 2), (1, 0, 5)]
    """
    rows, width = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    flat = starts.reshape(-1).nonzero()[:, 0].tolist()  # one host sync a forward (per layer: cheap)
    ends = [*flat[1:], rows * width]
    spans = []
    for begin, end in zip(flat, ends):
        row = begin // width
        end = min(end, (row + 1) * width)
        spans.append((row, begin - row * width, end - begin))
    return spans


def documents_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """`AttentionInterface`'s signature: query (B, H, S, D), key and value (B, H_kv, S, D);
    returns (B, S, H, D). Without a mask or cache and with `position_ids`, attention within
    each trajectory; otherwise transformers' sdpa."""
    if position_ids is None or attention_mask is not None or key.shape[2] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("sliding_window") is not None:  # `confined_attention` does not switch such models
        raise ValueError("Expected no sliding window in documents_attention, actually "
                         f"{kwargs['sliding_window']}: it would attend across packed trajectories")
    if kwargs.get("softcap") is not None:
        raise ValueError("Expected no attention softcap in documents_attention (sdpa has none), actually "
                         f"{kwargs['softcap']}")
    batch, heads, width = query.shape[:3]
    spans = document_spans(position_ids.expand(batch, -1))
    if len(spans) == batch:  # one trajectory a row: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    key, value = (repeat_kv(t, heads // t.shape[1]) for t in (key, value))
    flat = [t.transpose(1, 2).reshape(batch * width, heads, t.shape[-1]) for t in (query, key, value)]  # (B*S, H, D)
    buckets: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        buckets.setdefault(bucket_length(span[2]), []).append(span)
    outputs, order = [], []
    last = batch * width - 1
    for padded, members in buckets.items():
        offsets = torch.arange(padded, device=query.device)
        first = torch.tensor([row * width + start for row, start, _ in members], device=query.device)
        index = (first[:, None] + offsets).clamp(max=last)  # (n, P): past a trajectory's end, any token
        q, k, v = (t[index].transpose(1, 2) for t in flat)  # (n, H, P, D)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        keep = offsets < torch.tensor([n for _, _, n in members], device=query.device)[:, None]  # (n, P)
        outputs.append(out.transpose(1, 2)[keep])  # (real tokens, H, D)
        order.append(index[keep])
    order = torch.cat(order)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(outputs)[inverse].view(batch, width, heads, value.shape[-1]), None


def _documents_mask(**kwargs) -> torch.Tensor | None:
    """The mask function transformers calls for `DOCUMENTS_ATTENTION`: none where
    `documents_attention` confines attention itself (no padding mask, no cache), else sdpa's,
    always materialised (so that a None reaching the attention means the former)."""
    if "q_length" in kwargs:
        q_length, q_offset = kwargs["q_length"], kwargs.get("q_offset", 0)
    else:  # transformers before 5.x passes the query's cache positions instead
        positions = kwargs["cache_position"]
        q_length, q_offset = positions.shape[0], positions[0]
    if kwargs.get("attention_mask") is None and q_length == kwargs["kv_length"] and not q_offset \
            and not kwargs.get("kv_offset", 0):
        return None
    return sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})


AttentionInterface.register(DOCUMENTS_ATTENTION, documents_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(DOCUMENTS_ATTENTION, _documents_mask)
