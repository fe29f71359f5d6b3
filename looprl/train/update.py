"""One minibatch update for every recipe: epochs of shuffled minibatches, one optimizer step each.

`minibatch_update` serves the policy-gradient recipes (rows of a trajectory chunk and
its advantage) and DPO (pairs of episodes) alike. A minibatch is split into
micro-batches that fit a token budget; each micro-batch's loss is normalised by the
whole minibatch's count of the loss's unit (tokens, sequences or pairs: the
algorithm's `aggregates_over`), so the accumulated gradient is the minibatch's by
construction (verl's `agg_loss(..., global_batch_size)`), not by weights computed here.
Reported metrics are each micro-batch's own means, weighted by its share of that count.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence, TypeVar

import torch

from looprl.algorithms.core import PairLossInputs, PolicyLossInputs, behaviour_weights, masked_mean
from looprl.algorithms.dpo import sequence_logps
from looprl.algorithms.grpo import kl_k3
from looprl.train.balance import karmarkar_karp
from looprl.train.batch import collate, micro_batches, policy_logprobs, reference_logprobs, reference_policy
from looprl.train.packing import as_batch, collate_packed, packed_micro_batches, packed_policy_logprobs, unpack
from looprl.train.parallel import Parallel
from looprl.train.sp_planner import heuristic_plan
from looprl.train.ulysses import degree, split_sequences
from looprl.types import Episode, Trajectory

Item = TypeVar("Item")
Row = tuple[Trajectory, float]  # a chunk to train on and its episode's advantage

# The algorithms' DPO metric names -> the names a run logs.
DPO_METRIC_NAMES = {"rewards/chosen": "train/chosen_reward", "rewards/rejected": "train/rejected_reward",
                    "rewards/margins": "train/reward_margin", "rewards/accuracies": "train/reward_accuracy"}


def minibatch_update(
    model,
    optimizer,
    items: Sequence[Item],
    *,
    epochs: int,
    minibatch_size: int,
    grad_clip: float,
    lr: float,
    plan: Callable[[Sequence[Item]], list[list[int]]],
    count: Callable[[Sequence[Item]], float],
    micro_step: Callable[[Sequence[Item], float], dict[str, float]],
    metric_prefix: str = "train/",
    size: Callable[[Item], float] | None = None,
    parallel: Parallel | None = None,
    before_step: Callable[[], None] | None = None,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """`epochs` passes of shuffled minibatches over `items`, one optimizer step each.

    Args:
        model: the policy (its trainable parameters are clipped and stepped).
        optimizer: over those parameters.
        items: what to train on (rows, pairs).
        epochs, minibatch_size: passes, and items per optimizer step.
        grad_clip: max global gradient norm.
        lr: recorded as `train/lr`.
        plan: a minibatch's micro-batches, as lists of indices into it; with adaptive
            sequence parallelism it is also called as `plan(items, max_tokens)` for a block
            of d ranks (d x `max_tokens`: each rank holds 1/d of a row).
        count: the loss's normaliser of some items (their tokens, rows or pairs).
        micro_step: `micro_step(items, normaliser, group)`: forward and backward some items
            with the minibatch's count as the normaliser, their sequences split over the
            process `group` (None: not split); returns their metrics (means over those items).
        metric_prefix: prefixed to `micro_step`'s metric names.
        size: an item's weight when a minibatch is split across ranks (default: its count);
            its tokens with adaptive sequence parallelism.
        max_tokens: with adaptive sequence parallelism, the tokens of a row one rank may
            hold (a longer row is split over a block of ranks).
        parallel: the run's processes (default: one); see `looprl.train.parallel`.
        before_step: called right before each `optimizer.step()` (a sharded checkpoint
            waits there until its snapshot of the weights is copied: `RunContext.before_optimizer_step`).

    Returns:
        The mean over optimizer steps of the minibatch metrics and `grad_norm`, with
        `train/optimizer_steps` and `train/lr`; with adaptive sequence parallelism also
        `split_row_frac`, the share of rows trained over a block of several ranks.
    """
    if not items:
        return {"train/optimizer_steps": 0, "train/lr": lr}
    parallel = parallel or Parallel()
    sums: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        order = torch.randperm(len(items), device="cpu").tolist()  # the host's generator, any default device
        order = parallel.broadcast_object(order)  # every rank takes the same minibatches
        for i in range(0, len(order), minibatch_size):
            rows = [items[j] for j in order[i:i + minibatch_size]]
            total = max(count(rows), 1)
            optimizer.zero_grad(set_to_none=True)
            mine, group = rank_micro_batches(rows, plan, size or (lambda item: count([item])), parallel, max_tokens)
            together = degree(group)  # ranks that compute each of these rows (their metrics count once)
            for indices in mine:
                if indices is None:  # this rank has less work than another: a zero-weight pass
                    micro_step([min(rows, key=size or (lambda item: count([item])))], math.inf, None)
                    continue
                micro = [rows[g] for g in indices]
                weight = count(micro) / total / together
                # FSDP and DeepSpeed average the ranks' gradients: each normalises by its share of the count.
                for key, value in micro_step(micro, total / parallel.world, group).items():
                    sums[metric_prefix + key] = sums.get(metric_prefix + key, 0.0) + value * weight
                if parallel.sequence_planner is not None:  # the share of the minibatch's rows trained split
                    split = len(micro) / len(rows) / together if together > 1 else 0.0
                    sums[f"{metric_prefix}split_row_frac"] = sums.get(f"{metric_prefix}split_row_frac", 0.0) + split
            norm = parallel.optimizer_step(model, optimizer, grad_clip, before_step)
            sums[f"{metric_prefix}grad_norm"] = sums.get(f"{metric_prefix}grad_norm", 0.0) + norm
            steps += 1
    sums = _sum_over_ranks(sums, parallel)
    return {**{k: v / steps for k, v in sums.items()}, "train/optimizer_steps": steps, "train/lr": lr}


def rank_micro_batches(rows: Sequence[Item], plan: Callable[..., list[list[int]]],
                       size: Callable[[Item], float], parallel: Parallel,
                       max_tokens: int | None = None) -> tuple[list[list[int] | None], Any]:
    """This rank's micro-batches of a minibatch (indices into `rows`), None-padded to the
    count of the rank with the most, so every rank runs as many forwards and backwards;
    and the process group its rows' sequences are split over (None: not split).

    One process: `plan(rows)`. Several: `rows` split across ranks by `size` with the
    Karmarkar-Karp largest differencing method (verl's `seqlen_balancing`), then each
    rank's part planned. With sequence parallelism the split is across blocks of ranks
    (`Parallel.data_world`), and the ranks of a block take the same part; with adaptive
    sequence parallelism the blocks are planned for this minibatch (`adaptive_micro_batches`).
    """
    if parallel.sequence_planner is not None:
        return adaptive_micro_batches(rows, plan, size, parallel, max_tokens)
    if parallel.data_world == 1:
        return plan(rows), parallel.sequence_group
    parts = karmarkar_karp([size(row) for row in rows], parallel.data_world)
    plans = [[[part[g] for g in group] for group in plan([rows[i] for i in part])] if part else [] for part in parts]
    most = max(len(p) for p in plans)
    return plans[parallel.data_rank] + [None] * (most - len(plans[parallel.data_rank])), parallel.sequence_group


def adaptive_micro_batches(rows: Sequence[Item], plan: Callable[..., list[list[int]]],
                           size: Callable[[Item], float], parallel: Parallel,
                           max_tokens: int | None) -> tuple[list[list[int] | None], Any]:
    """Adaptive sequence parallelism (FlexSP): rank 0 assigns the minibatch's rows to blocks of
    ranks of heterogeneous degree (`looprl.train.sp_planner.heuristic_plan`: each row within
    `max_tokens` a rank, the slowest block's estimated time minimised) and broadcasts the
    assignment; the blocks are laid out from rank 0 by decreasing degree (so each starts at a
    multiple of its degree) and each plans its rows' micro-batches with d x `max_tokens`.
    Returns this rank's micro-batches and its block's group (None for a block of one)."""
    planner = parallel.sequence_planner
    if max_tokens is None:
        raise ValueError("adaptive sequence parallelism needs the tokens a rank may hold (max_tokens)")
    layout: Any = None
    if parallel.is_main:
        lengths = [int(size(row)) for row in rows]
        try:
            groups = heuristic_plan(lengths, parallel.world, max_tokens, planner.cost, planner.degrees).groups
            layout = [(g.degree, list(g.sequences)) for g in sorted(groups, key=lambda g: -g.degree)]
        except ValueError:
            layout = (f"Expected every row to fit algorithm.micro_batch_tokens={max_tokens} a rank at sequence-parallel "
                      f"degrees {planner.degrees} over {parallel.world} processes, actually a row has {max(lengths)} tokens")
    layout = parallel.broadcast_object(layout)
    if isinstance(layout, str):  # rank 0 found no plan: every rank raises it
        raise ValueError(layout)
    starts = [sum(d for d, _ in layout[:k]) for k in range(len(layout))]
    mine = next(k for k, (d, _) in enumerate(layout) if starts[k] <= parallel.rank < starts[k] + d)
    plans = [[[part[g] for g in group] for group in plan([rows[i] for i in part], max_tokens * d)] if part else []
             for d, part in layout]
    most = max(len(p) for p in plans)
    d = layout[mine][0]
    group = planner.groups[(d, starts[mine])] if d > 1 else None
    return plans[mine] + [None] * (most - len(plans[mine])), group


def _sum_over_ranks(sums: dict[str, float], parallel: Parallel) -> dict[str, float]:
    """Each rank's weighted metric sums added up (every rank's share of a minibatch is
    weighted by its share of the count, divided among the ranks of a sequence-parallel block
    that computed it together); the gradient norm, the same everywhere, once."""
    if not parallel.distributed:
        return sums
    out: dict[str, float] = {}
    for rank_sums in parallel.gather_objects(sums):
        for key, value in rank_sums.items():
            out[key] = out.get(key, 0.0) + value
    return {k: v / parallel.world if k.endswith("grad_norm") else v for k, v in out.items()}


def chunk_rows(groups: Sequence[Sequence[Trajectory | Episode]], advantages: torch.Tensor,
               keep: torch.Tensor) -> list[Row]:
    """The training rows of the kept episodes: every chunk with its episode's advantage.

    Advantages are per episode (a group is K episodes of one task); an episode played
    with a context window trains as several chunks, which all get its advantage. A
    `Trajectory`'s only chunk is itself.

    Args:
        groups: (G, K) episodes.
        advantages: (G, K) per-episode advantages.
        keep: (G, K) mask of the episodes to train on.
    """
    return [(chunk, a) for g, adv, k in zip(groups, advantages.tolist(), keep.tolist())
            for episode, a, ok in zip(g, adv, k) if ok for chunk in episode.chunks]


def update_policy(cfg, algorithm, model, tokenizer, optimizer, rows: Sequence[Row],
                  parallel: Parallel | None = None, *,
                  before_step: Callable[[], None] | None = None) -> dict[str, float]:
    """The policy-gradient update of one step's rows (LOOP, GRPO; sync, async, ExIt);
    with several ranks, every rank passes the same rows and trains on its share. Returns the
    update's metrics and `trained_row_tokens`, the rows' lengths (sorted)."""
    update = cfg.algorithm
    split = packed_micro_batches if update.packing else micro_batches  # by real or by padded tokens

    def micro_step(micro: Sequence[Row], total: float, group) -> dict[str, float]:
        return policy_micro_step(cfg, algorithm, model, tokenizer.pad_token_id, micro, total, sequence_group=group)

    metrics = minibatch_update(
        model, optimizer, rows, epochs=update.epochs, minibatch_size=update.minibatch_size,
        grad_clip=cfg.optim.grad_clip, lr=cfg.optim.lr, count=lambda micro: policy_count(algorithm, micro),
        micro_step=micro_step,
        plan=lambda micro, tokens=update.micro_batch_tokens: split([len(t.input_ids) for t, _ in micro], tokens),
        size=lambda row: len(row[0].input_ids), parallel=parallel, before_step=before_step,
        max_tokens=update.micro_batch_tokens,
    )
    # The rows' lengths, recorded with the step: what a sequence-parallel plan is sized by
    # (`bench/sequence_parallel.py --run` replays them).
    return {**metrics, "trained_row_tokens": sorted(len(t.input_ids) for t, _ in rows)}


def policy_count(algorithm, rows: Sequence[Row]) -> float:
    """The normaliser of a policy loss over `rows`: their sampled tokens or their number."""
    if algorithm.aggregates_over == "tokens":
        return sum(t.num_sampled_tokens for t, _ in rows)
    return len(rows)


def policy_micro_step(cfg, algorithm, model, pad_id: int, rows: Sequence[Row], total: float,
                      sequence_group=None) -> dict[str, float]:
    """Forward and backward one micro-batch, its loss normalised by the minibatch's `total`
    (`policy_count`); returns its loss metrics. With a `sequence_group` (`Parallel`'s), its
    ranks split each row's sequence (`looprl.train.ulysses`), forward and backward."""
    with split_sequences(model, sequence_group):
        return _policy_micro_step(cfg, algorithm, model, pad_id, rows, total, sequence_group)


def _policy_micro_step(cfg, algorithm, model, pad_id: int, rows: Sequence[Row], total: float,
                       group) -> dict[str, float]:
    temperature, ref = cfg.rollout.temperature, None
    if getattr(cfg.algorithm, "packing", False):  # the rows end to end, the losses on the padded layout
        packed = collate_packed([t for t, _ in rows], pad_id, [a for _, a in rows], device=model_device(model))
        batch = as_batch(packed, pad_id)
        logprobs = unpack(packed, packed_policy_logprobs(model, packed, temperature))
        if algorithm.needs_reference:
            with reference_policy(model), torch.no_grad():
                ref = unpack(packed, packed_policy_logprobs(model, packed, temperature))
    else:
        batch = collate([t for t, _ in rows], pad_id, [a for _, a in rows], device=model_device(model))
        logprobs = policy_logprobs(model, batch, temperature, group)
        if algorithm.needs_reference:
            ref = reference_logprobs(model, batch, temperature, group)
    old_logprobs, weights, decoupled = batch.old_logprobs, None, {}
    if batch.proximal_logprobs is not None:
        # Decoupled PPO: clip around the proximal policy, weight by pi_prox / pi_behaviour.
        old_logprobs = batch.proximal_logprobs
        weights = behaviour_weights(batch.proximal_logprobs, batch.old_logprobs, batch.loss_mask,
                                    cfg.rollout.behaviour_weight_cap)
        decoupled = _behaviour_weight_metrics(weights, batch, cfg.rollout.behaviour_weight_cap)
    inputs = PolicyLossInputs(logprobs, old_logprobs, batch.advantages, batch.loss_mask, batch.segments, ref, weights)
    loss, metrics = algorithm.loss(inputs, global_count=total)
    loss.backward()
    return {**metrics, **decoupled}


def _behaviour_weight_metrics(weights: torch.Tensor, batch, cap: float | None) -> dict[str, float]:
    """How far the proximal policy is from the behaviour one, on the sampled tokens."""
    mask = batch.loss_mask
    over_cap = torch.zeros_like(mask) if cap is None else (batch.proximal_logprobs - batch.old_logprobs > math.log(cap))
    values = torch.stack([
        masked_mean(weights, mask),
        masked_mean(over_cap.to(mask.dtype), mask),
        # k3 estimate of KL(behaviour || proximal), sampled from the behaviour: how stale the rollouts were.
        masked_mean(kl_k3(batch.old_logprobs, batch.proximal_logprobs), mask),
    ]).tolist()  # one copy to the host, not one per metric
    return dict(zip(("behaviour_weight_mean", "behaviour_capped_frac", "behaviour_kl"), values))


def update_on_pairs(cfg, algorithm, model, pad_id: int, optimizer, reference,
                    pairs: Sequence[tuple], parallel: Parallel | None = None, *,
                    before_step: Callable[[], None] | None = None) -> dict[str, float]:
    """The DPO update of one step's (chosen, rejected) episode pairs.

    `reference.logprobs(batch, temperature) -> (B, L-1)` gives the reference policy's
    token logprobs; its sequence log-probs are computed once, before the updates (the
    reference does not move; TRL's `precompute_ref_log_probs`).
    """
    if not pairs:
        return {"train/optimizer_steps": 0, "train/lr": cfg.optim.lr}
    update = cfg.algorithm
    device = model_device(model)
    ref = episode_logps(lambda b: reference.logprobs(b, cfg.rollout.temperature), [t for p in pairs for t in p],
                        pad_id, update.micro_batch_tokens, device).view(-1, 2)  # (P, 2): chosen, rejected
    indexed = list(range(len(pairs)))

    def micro_step(idx: Sequence[int], total: float, group) -> dict[str, float]:  # DPO does not split sequences
        return _pair_micro_step(cfg, algorithm, model, pad_id, [pairs[j] for j in idx], ref[list(idx)], total)

    return minibatch_update(
        model, optimizer, indexed, epochs=update.epochs, minibatch_size=update.minibatch_size,
        grad_clip=cfg.optim.grad_clip, lr=cfg.optim.lr, count=len, micro_step=micro_step,
        plan=lambda idx: pair_micro_batches([pairs[j] for j in idx], update.micro_batch_tokens),
        size=lambda j: sum(len(c.input_ids) for t in pairs[j] for c in t.chunks), parallel=parallel,
        before_step=before_step,
    )


def _pair_micro_step(cfg, algorithm, model, pad_id: int, pairs: Sequence[tuple], ref: torch.Tensor,
                     total: float) -> dict[str, float]:
    """Forward chosen and rejected of some pairs together, backward their share of the loss."""
    episodes = [t for p in pairs for t in p]  # chosen_0, rejected_0, chosen_1, ...
    logps = episode_logps(lambda b: policy_logprobs(model, b, cfg.rollout.temperature), episodes, pad_id,
                          None, model_device(model)).view(-1, 2)  # (P, 2)
    tokens = torch.tensor([float(t.num_sampled_tokens) for t in episodes], device=logps.device).view(-1, 2)
    inputs = PairLossInputs(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], tokens[:, 0], tokens[:, 1])
    loss, metrics = algorithm.loss(inputs, global_count=total)
    loss.backward()
    with torch.no_grad():  # the loss of these pairs alone, as the metric
        own, _ = algorithm.loss(dataclasses.replace(inputs, chosen_logps=logps[:, 0].detach(),
                                                    rejected_logps=logps[:, 1].detach()))
    # `train/dpo_loss` is the whole loss (with RPO's NLL term when nll_coef > 0; `train/nll` then).
    return {"dpo_loss": own.item(), **{DPO_METRIC_NAMES.get(k, k).removeprefix("train/"): v
                                       for k, v in metrics.items()}}


def episode_logps(token_logprobs_fn, episodes: Sequence, pad_id: int, max_tokens: int | None,
                  device: torch.device | None = None) -> torch.Tensor:
    """(N,) log pi(episode): the sum over each episode's chunks of their sampled-token logprobs.

    `token_logprobs_fn(batch) -> (B, L-1)`, on batches built on `device`; with
    `max_tokens` the chunks go through it in length-sorted groups of at most that many
    padded tokens, else all at once.
    """
    chunks = [(i, c) for i, ep in enumerate(episodes) for c in ep.chunks]
    lengths = [len(c.input_ids) for _, c in chunks]
    groups = _pack(lengths, [1] * len(chunks), max_tokens) if max_tokens else [list(range(len(chunks)))]
    out = None
    for group in groups:
        batch = collate([chunks[j][1] for j in group], pad_id, device=device)
        seq = sequence_logps(token_logprobs_fn(batch), batch.loss_mask)  # (B,)
        out = torch.zeros(len(episodes), dtype=seq.dtype, device=seq.device) if out is None else out
        out = out.index_add(0, torch.tensor([chunks[j][0] for j in group], device=seq.device), seq)
    return out


def pair_micro_batches(pairs: Sequence[tuple], max_tokens: int) -> list[list[int]]:
    """Pairs grouped so that each forward (both sides, all chunks) pads to at most `max_tokens`."""
    lengths = [max(len(c.input_ids) for t in p for c in t.chunks) for p in pairs]
    rows = [sum(len(t.chunks) for t in p) for p in pairs]
    return _pack(lengths, rows, max_tokens)


def _pack(lengths: Sequence[int], rows: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Length-sorted groups whose padded size (rows x longest) stays under `max_tokens`;
    an item over the budget gets a group of its own.

    >>> _pack([5, 100, 6, 90], [2, 2, 2, 2], max_tokens=400)
    [[0, 2], [3, 1]]
    """
    groups: list[list[int]] = []
    used = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if groups and (used + rows[i]) * lengths[i] <= max_tokens:
            groups[-1].append(i)
            used += rows[i]
        else:
            groups.append([i])
            used = rows[i]
    return groups


@torch.no_grad()
def recompute_logprobs(model, pad_id: int, rows: Sequence[Row], temperature: float,
                       max_tokens: int, field: str = "behaviour_logprobs") -> list[Row]:
    """The rows with the sampled tokens' logprobs under `model` (the current weights) in `field`.

    - `"behaviour_logprobs"` replaces the recorded ones: the PPO ratio then measures only
      how far this step's updates moved the policy, not how stale the rollouts were
      (the staleness still bounds how off-policy the samples themselves are).
    - `"proximal_logprobs"` keeps the recorded ones beside them, for decoupled PPO.
    """
    out: list[Row | None] = [None] * len(rows)
    for group in micro_batches([len(t.input_ids) for t, _ in rows], max_tokens):
        batch = collate([rows[i][0] for i in group], pad_id, device=model_device(model))
        logprobs = policy_logprobs(model, batch, temperature).cpu()  # (B, L-1): row t predicts token t+1
        for row, i in enumerate(group):
            traj, advantage = rows[i]
            n = len(traj.input_ids)
            values = [0.0] + logprobs[row, : n - 1].tolist()
            fresh = [v if m else 0.0 for v, m in zip(values, traj.loss_mask)]
            out[i] = (dataclasses.replace(traj, **{field: fresh}), advantage)
    return out  # type: ignore[return-value]


def model_device(model) -> torch.device:
    """Where the policy's parameters live: every training tensor is created there."""
    return next(model.parameters()).device

