"""Collation and micro-batching: splitting a minibatch must not change its gradient."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from looprl.algorithms import build_algorithm
from looprl.algorithms.loop import loop_loss
from looprl.config import from_dict
from looprl.train.batch import collate, micro_batches, policy_logprobs
from looprl.train.policy import build_policy
from looprl.train.update import policy_count, policy_micro_step
from looprl.types import Trajectory

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def random_trajectory(rng: random.Random, vocab: int, length: int) -> Trajectory:
    ids = [rng.randrange(vocab) for _ in range(length)]
    mask = [0] * (length // 2) + [1] * (length - length // 2)
    logprobs = [-rng.random() * 3 if m else 0.0 for m in mask]
    return Trajectory(ids, mask, logprobs, turn_spans=[(length // 2, length)])


def test_micro_batches_pack_by_length_under_the_budget():
    lengths = [5, 100, 6, 90, 300]
    groups = micro_batches(lengths, max_tokens=200)
    assert sorted(i for g in groups for i in g) == list(range(5))
    for group in groups:
        assert len(group) == 1 or len(group) * max(lengths[i] for i in group) <= 200
    assert [4] in groups  # longer than the budget: alone


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("budget", [64, 10_000])
def test_accumulated_micro_batches_give_the_minibatch_gradient(budget, loss_agg):
    cfg = from_dict({"model": {"tiny": TINY}, "lora": {"enabled": False},
                     "algorithm": {"micro_batch_tokens": budget, "loss_agg": loss_agg}})
    model, tokenizer = build_policy(cfg)
    rng = random.Random(0)
    rows = [(random_trajectory(rng, len(tokenizer), n), a)
            for n, a in zip([7, 30, 12, 25, 9], [1.0, -0.5, 0.25, -1.0, 0.75])]

    batch = collate([t for t, _ in rows], tokenizer.pad_token_id, [a for _, a in rows])
    loss, _ = loop_loss(policy_logprobs(model, batch), batch.old_logprobs, batch.advantages, batch.loss_mask,
                        loss_agg=loss_agg, max_len=cfg.env.max_tokens)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    algorithm = build_algorithm(cfg)
    groups = micro_batches([len(t.input_ids) for t, _ in rows], budget)
    assert (len(groups) > 1) == (budget == 64)
    total = policy_count(algorithm, rows)  # the loss is normalised by the whole minibatch's count
    for group in groups:
        policy_micro_step(cfg, algorithm, model, tokenizer.pad_token_id, [rows[g] for g in group], total)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_collate_aligns_targets_and_turns():
    traj = Trajectory([5, 6, 7, 8, 9], [0, 0, 1, 1, 0], [0.0, 0.0, -0.1, -0.2, 0.0], turn_spans=[(2, 4)])
    batch = collate([traj, Trajectory([1, 2], [0, 1], [0.0, -0.3])], pad_id=0, advantages=[1.0, -1.0])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Position t predicts token t+1: the mask and old logprobs shift left by one.
    assert batch.loss_mask.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    torch.testing.assert_close(batch.old_logprobs, torch.tensor([[0.0, -0.1, -0.2, 0.0], [-0.3, 0, 0, 0]]))
    assert batch.segments[0].tolist() == [0, 0, 0, 0]
    assert batch.advantages.tolist() == [1.0, -1.0]


def test_collate_carries_proximal_logprobs_aligned_with_the_targets_or_none():
    plain = Trajectory(input_ids=[1, 2, 3], loss_mask=[0, 1, 1], behaviour_logprobs=[0.0, -0.5, -0.25])
    assert collate([plain], pad_id=0).proximal_logprobs is None
    with_prox = dataclasses.replace(plain, proximal_logprobs=[0.0, -0.4, -0.2])
    short = dataclasses.replace(plain, input_ids=[1, 2], loss_mask=[0, 1], behaviour_logprobs=[0.0, -1.0],
                                proximal_logprobs=[0.0, -0.9])
    batch = collate([with_prox, short], pad_id=0)
    torch.testing.assert_close(batch.proximal_logprobs, torch.tensor([[-0.4, -0.2], [-0.9, 0.0]]))
    with pytest.raises(ValueError, match="proximal_logprobs on every trajectory of a batch or on none"):
        collate([with_prox, plain], pad_id=0)
    with pytest.raises(ValueError, match="proximal_logprobs=2"):
        dataclasses.replace(plain, proximal_logprobs=[0.0, -1.0])


@pytest.mark.parametrize("algo", [{"name": "loop", "loss_agg": "seq-mean-token-mean"},
                                  {"name": "loop", "loss_agg": "token-mean"},
                                  {"name": "grpo", "kl_coef": 0.1}])
def test_a_packed_update_equals_the_padded_one(algo):
    """`algorithm.packing`: the rows end to end, in micro-batches of real tokens; the update's
    losses, gradient norms and weights equal the padded path's (float rounding: kernels of
    other shapes; measured within 2e-5 relative)."""
    from looprl.train.update import update_policy

    lora = algo["name"] == "grpo"  # the KL reference is the model with its adapter disabled
    results = []
    for packing in (False, True):
        cfg = from_dict({"model": {"tiny": TINY}, "lora": {"enabled": lora, "r": 4, "alpha": 8},
                         "algorithm": {**algo, "micro_batch_tokens": 64, "minibatch_size": 3, "epochs": 2,
                                       "packing": packing}})
        model, tokenizer = build_policy(cfg)
        if lora:  # a fresh adapter is a no-op: the KL term would be zero
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        rng = random.Random(0)
        rows = [(random_trajectory(rng, len(tokenizer), n), a)
                for n, a in zip([7, 30, 12, 25, 9, 3], [1.0, -0.5, 0.25, -1.0, 0.75, 0.5])]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        torch.manual_seed(0)  # the minibatches' shuffle
        metrics = update_policy(cfg, build_algorithm(cfg), model, tokenizer, optimizer, rows)
        results.append((metrics, start, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (padded, start, padded_weights), (packed, _, packed_weights) = results
    assert packed["train/optimizer_steps"] == padded["train/optimizer_steps"] == 4
    # The loss and the gradient do not depend on the micro-batches; the diagnostics averaged over
    # them by row (clipfrac, ratio_mean under seq-mean-token-mean) do, packed or not.
    for key in ("train/pg_loss", "train/loss", "train/kl", "train/grad_norm"):
        if key in padded:
            assert packed[key] == pytest.approx(padded[key], rel=1e-4), key
    moved = [name for name, weight in padded_weights.items() if not torch.equal(weight, start[name])]
    assert moved, "no weight moved: the test would not compare updates"
    for name, weight in padded_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, atol=1e-5, rtol=0, msg=name)


def test_as_batch_is_what_collate_gives():
    """The losses read the packed rows' `as_batch`: the padded `Batch`, tensor for tensor."""
    from looprl.train.packing import as_batch, collate_packed

    rng = random.Random(0)
    trajs = [random_trajectory(rng, 50, n) for n in (7, 1, 30, 12, 2)]
    trajs[2] = dataclasses.replace(trajs[2], turn_spans=[(3, 10), (15, 30)])
    for proximal in (False, True):
        if proximal:
            trajs = [dataclasses.replace(t, proximal_logprobs=[v - 0.1 for v in t.behaviour_logprobs]) for t in trajs]
        for row_tokens in (None, 16):
            got = as_batch(collate_packed(trajs, 0, [0.5, -1, 2, 0, 1], max_tokens=row_tokens), pad_id=0)
            want = collate(trajs, 0, [0.5, -1, 2, 0, 1])
            for field in dataclasses.fields(want):
                a, b = getattr(got, field.name), getattr(want, field.name)
                assert (a is None and b is None) or torch.equal(a, b), (field.name, proximal, row_tokens)
