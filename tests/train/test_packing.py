"""Packed micro-batches: the padded path's numbers and gradients, attention confined to each trajectory."""

from __future__ import annotations

import doctest
import random

import pytest
import torch

from looprl.config import from_dict
from looprl.train import packing
from looprl.train.batch import collate, policy_logprobs
from looprl.train.packing import collate_packed, packed_policy_logprobs, packing_support, unpack
from looprl.train.policy import build_policy
from looprl.types import Trajectory

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
LORA = {"enabled": True, "r": 4, "alpha": 8}
# Packed and padded rows run the same ops on the same tokens, in kernels of other shapes
# (a block-diagonal mask over one row against a padding mask over several): float32
# rounding apart: measured at most 1e-6 on the logprobs, 1e-9 (3e-6 of the largest) on
# the gradients; attention leaking across trajectories moves them by more than 1e-2.
LOGPROB_TOL = {"atol": 1e-5, "rtol": 0}
GRAD_TOL = {"atol": 1e-6, "rtol": 1e-5}
LENGTHS = (1, 2, 5, 40, 200, 13, 3)  # very different, with one- and two-token trajectories
CAPS = [None, 32, 250]  # one row; rows of at most 32 tokens (the 200 and the 40 alone); two rows


def tiny(lora: dict | None = None):
    model, tokenizer = build_policy(from_dict({"model": {"tiny": TINY}, "lora": lora or {"enabled": False}}))
    if lora:
        # A fresh adapter's B is zero, so it would change nothing: make it count.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model, tokenizer


@pytest.fixture(scope="module")
def plain():
    return tiny()


@pytest.fixture(scope="module")
def with_lora():
    return tiny(LORA)


def trajectory(rng: random.Random, vocab: int, n: int, proximal: bool = True) -> Trajectory:
    """Prompt, then two sampled turns with an observation between them."""
    ids = [rng.randrange(3, vocab) for _ in range(n)]
    turns = [(n // 3, n // 2), (2 * n // 3, n)] if n >= 3 else [(0, n)]
    mask = [int(any(a <= i < b for a, b in turns)) for i in range(n)]
    logprobs = [-rng.random() * 3 if m else 0.0 for m in mask]
    prox = [v + 0.1 * rng.random() if m else 0.0 for v, m in zip(logprobs, mask)] if proximal else None
    return Trajectory(ids, mask, logprobs, turn_spans=turns, proximal_logprobs=prox)


def trajectories(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[Trajectory]:
    rng = random.Random(seed)
    return [trajectory(rng, vocab, n) for n in lengths]


def targets_mask(trajs) -> torch.Tensor:
    """(B, L-1) True where position t predicts a token of the trajectory (t < its length - 1)."""
    lengths = torch.tensor([len(t.input_ids) for t in trajs])
    return torch.arange(int(lengths.max()) - 1) < (lengths - 1).unsqueeze(1)


def test_doctests_pass():
    assert doctest.testmod(packing).failed == 0


@pytest.mark.parametrize("cap", CAPS)
def test_rows_hold_trajectories_end_to_end_with_positions_restarting(plain, cap):
    _, tokenizer = plain
    trajs = trajectories(len(tokenizer))
    packed = collate_packed(trajs, tokenizer.pad_token_id, max_tokens=cap)
    rows, width = packed.input_ids.shape
    assert rows == {None: 1, 32: 3, 250: 2}[cap]
    assert (packed.input_ids != tokenizer.pad_token_id).sum() == sum(LENGTHS)  # the ids avoid the pad id
    for i, t in enumerate(trajs):
        r, s, n = packed.rows[i].item(), packed.starts[i].item(), packed.lengths[i].item()
        assert packed.input_ids[r, s:s + n].tolist() == t.input_ids
        assert packed.position_ids[r, s:s + n].tolist() == list(range(n))
    for r in range(rows):
        used = sum(n for i, n in enumerate(LENGTHS) if packed.rows[i] == r)
        assert cap is None or used <= cap or (packed.rows == r).sum() == 1  # over the cap: alone
        tail = width - used
        assert packed.position_ids[r, used:].tolist() == list(range(tail))  # the padding: a document of its own
        assert (packed.loss_mask[r, max(used - 1, 0):] == 0).all() and (packed.sequence_ids[r, max(used - 1, 0):] == -1).all()


@pytest.mark.parametrize("cap", CAPS)
def test_unpacked_fields_are_those_of_collate(plain, cap):
    """Every target-aligned field maps back to the padded layout exactly, padding included."""
    _, tokenizer = plain
    trajs = trajectories(len(tokenizer))
    advantages = [0.5, -1.0, 0.25, 2.0, -0.75, 1.5, -2.0]
    batch = collate(trajs, tokenizer.pad_token_id, advantages)
    packed = collate_packed(trajs, tokenizer.pad_token_id, advantages, max_tokens=cap)
    for name in ("loss_mask", "old_logprobs", "segments", "proximal_logprobs"):
        assert torch.equal(unpack(packed, getattr(packed, name)), getattr(batch, name)), name
    valid = targets_mask(trajs)
    assert torch.equal(packed.advantages, batch.advantages)
    assert torch.equal(unpack(packed, packed.token_advantages), batch.advantages.unsqueeze(1) * valid)
    rows = torch.arange(len(trajs)).unsqueeze(1).expand_as(valid)
    assert torch.equal(unpack(packed, packed.sequence_ids)[valid], rows[valid])
    # A trajectory's last position would predict the next one's first token: it trains nothing.
    assert packed.loss_mask.sum() == batch.loss_mask.sum() == sum(sum(t.loss_mask[1:]) for t in trajs)


@pytest.mark.parametrize("chunk", [None, 7])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("which", ["plain", "with_lora"])
def test_packed_logprobs_equal_the_padded_path(which, cap, temperature, chunk, request):
    model, tokenizer = request.getfixturevalue(which)
    trajs = trajectories(len(tokenizer))
    packed = collate_packed(trajs, tokenizer.pad_token_id, max_tokens=cap)
    with torch.no_grad():
        expected = policy_logprobs(model, collate(trajs, tokenizer.pad_token_id), temperature)
        got = unpack(packed, packed_policy_logprobs(model, packed, temperature, chunk_tokens=chunk))
    valid = targets_mask(trajs)
    assert got.shape == expected.shape == (len(trajs), max(LENGTHS) - 1)
    torch.testing.assert_close(got[valid], expected[valid], **LOGPROB_TOL)
    assert (got[~valid] == 0).all()  # where the padded path holds guesses about padding


@pytest.mark.parametrize("cap", [None, 32])
@pytest.mark.parametrize("which", ["plain", "with_lora"])
def test_gradients_of_a_masked_loss_equal_the_padded_path(which, cap, request):
    model, tokenizer = request.getfixturevalue(which)
    trajs = trajectories(len(tokenizer), seed=1)
    advantages = [1.0, -0.5, 0.25, -1.0, 0.75, 2.0, -2.0]
    batch = collate(trajs, tokenizer.pad_token_id, advantages)
    packed = collate_packed(trajs, tokenizer.pad_token_id, advantages, max_tokens=cap)

    def loss(logprobs, mask, adv):  # a policy-gradient surrogate, exp(logp - old) * A on sampled tokens
        return -(torch.exp(logprobs - batch.old_logprobs) * adv.unsqueeze(1) * mask).sum() / mask.sum()

    expected = grads(model, lambda: loss(policy_logprobs(model, batch, 0.9), batch.loss_mask, batch.advantages))
    got = grads(model, lambda: loss(unpack(packed, packed_policy_logprobs(model, packed, 0.9, chunk_tokens=16)),
                                    unpack(packed, packed.loss_mask), packed.advantages))
    assert got.keys() == expected.keys() and got
    assert len(got) == len([p for p in model.parameters() if p.requires_grad])
    for name in expected:
        assert expected[name].abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(got[name], expected[name], **GRAD_TOL, msg=name)


def grads(model, fn) -> dict[str, torch.Tensor]:
    model.zero_grad()
    fn().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


def test_attention_leaks_across_trajectories_unless_confined(plain):
    """What makes the packed path right: with the same ids and positions, a mask over the
    whole row, or a KV cache, lets a trajectory attend to the one packed before it."""
    model, tokenizer = plain
    trajs = trajectories(len(tokenizer), lengths=(30, 20))
    packed = collate_packed(trajs, tokenizer.pad_token_id)
    ids, positions = packed.input_ids, packed.position_ids
    with torch.no_grad():
        alone = model(input_ids=ids[:, 30:], use_cache=False).logits[0]
        confined = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0, 30:]
        row_mask = model(input_ids=ids, position_ids=positions, attention_mask=torch.ones_like(ids),
                         use_cache=False).logits[0, 30:]
        cached = model(input_ids=ids, position_ids=positions, use_cache=True).logits[0, 30:]
    torch.testing.assert_close(confined, alone, **LOGPROB_TOL)
    assert (row_mask - alone).abs().max() > 1e-2
    assert (cached - alone).abs().max() > 1e-2


class RowMask(torch.nn.Module):
    """A model whose forward attends over the whole row: what a leaking attention would be."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids),
                          use_cache=use_cache)


def test_a_leaking_model_is_refused(plain):
    model, tokenizer = plain
    assert packing_support(model) is None
    leaky = RowMask(model)
    assert "a trajectory's logits change with the one packed before it" in packing_support(leaky)
    packed = collate_packed(trajectories(len(tokenizer)), tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="^Packed log-probs need attention confined to each trajectory: with "
                                         "attn_implementation='sdpa'"):
        packed_policy_logprobs(leaky, packed)


def bad(trajs):
    t = trajs[1]
    t.loss_mask = t.loss_mask[:-1]  # after construction, which validated it
    return trajs


@pytest.mark.parametrize("make,kwargs,message", [
    (lambda v: [], {}, "Expected at least one trajectory to pack, actually none"),
    (bad, {}, "Expected the fields of trajectory 1 as long as its input_ids (2), actually {'loss_mask': 1}"),
    (lambda v: v, {"advantages": [1.0]}, "Expected one advantage per trajectory (7), actually 1"),
    (lambda v: v, {"max_tokens": 0}, "Expected max_tokens >= 1 or None, actually 0"),
    (lambda v: v + [Trajectory([], [], [], proximal_logprobs=[])], {},
     "Expected every trajectory to have at least one token, trajectory 7 has none"),
    (lambda v: v[:1] + [Trajectory([5, 6], [0, 1], [0.0, -1.0])], {},
     "Expected proximal_logprobs on every trajectory of a batch or on none, actually on 1 of 2"),
])
def test_bad_input_gives_one_line_errors(plain, make, kwargs, message):
    _, tokenizer = plain
    with pytest.raises(ValueError) as e:
        collate_packed(make(trajectories(len(tokenizer))), tokenizer.pad_token_id, **kwargs)
    assert str(e.value) == message


def test_a_trajectory_over_the_cap_gets_its_own_row(plain):
    _, tokenizer = plain
    packed = collate_packed(trajectories(len(tokenizer), lengths=(10, 200, 20)), tokenizer.pad_token_id, max_tokens=50)
    assert packed.rows.tolist() == [1, 0, 1] and packed.input_ids.shape == (2, 200)


def test_unpack_refuses_values_of_another_layout(plain):
    _, tokenizer = plain
    packed = collate_packed(trajectories(len(tokenizer)), tokenizer.pad_token_id, max_tokens=32)
    with pytest.raises(ValueError, match=r"^Expected values of shape \(R, N-1\) = \(3, 199\), actually \(3, 200\)$"):
        unpack(packed, packed.input_ids.float())


# --- attention computed within each trajectory (`confined_attention`) -----------------------


class Heads(torch.nn.Module):
    num_key_value_groups = 2  # 4 query heads over 2 KV heads
    is_causal = True


def test_documents_attention_equals_sdpa_under_the_block_mask():
    """Trajectories of 1-70 tokens (one crossing a bucket's edge) in two rows: the outputs and
    the gradients of queries, keys and values equal sdpa's under transformers' block-diagonal mask."""
    from looprl.train.ulysses import block_causal_mask

    generator = torch.Generator().manual_seed(0)
    lengths = [[1, 17, 70, 2], [33, 16, 41]]
    width = max(sum(row) for row in lengths)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row + [width - sum(row)] if n]) for row in lengths])
    q = torch.randn(2, 4, width, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(2, 2, width, 8, generator=generator, requires_grad=True) for _ in range(2))
    out, _ = packing.documents_attention(Heads(), q, k, v, None, scaling=0.3, position_ids=positions)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=block_causal_mask(positions),
        scale=0.3).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    weights = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert packing.document_spans(positions)[:4] == [(0, 0, 1), (0, 1, 17), (0, 18, 70), (0, 88, 2)]


def test_the_packed_forward_computes_attention_per_trajectory(plain, monkeypatch):
    """The documents path is the one taken (once a layer), and leaves the model's attention as it was."""
    model, tokenizer = plain
    calls = []
    spans = packing.document_spans
    monkeypatch.setattr(packing, "document_spans", lambda p: calls.append(p.shape) or spans(p))
    packed = collate_packed(trajectories(len(tokenizer)), tokenizer.pad_token_id)
    with torch.no_grad():
        packed_policy_logprobs(model, packed)
    assert len(calls) == TINY["num_layers"]
    assert model.config._attn_implementation == "sdpa"


def test_inside_confined_attention_padded_and_cached_forwards_are_unchanged(plain):
    """A padding mask and a KV cache keep sdpa's semantics inside the block."""
    model, tokenizer = plain
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        outside = model(input_ids=ids, attention_mask=mask).logits
        cached = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        step = model(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=cached.past_key_values).logits
        with packing.confined_attention(model):
            inside = model(input_ids=ids, attention_mask=mask).logits
            cached_in = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
            step_in = model(input_ids=ids[:, 4:], attention_mask=mask, past_key_values=cached_in.past_key_values).logits
    real = mask.bool()
    torch.testing.assert_close(inside[real], outside[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(step_in, step, atol=1e-6, rtol=0)
