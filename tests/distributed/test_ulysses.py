"""Ulysses sequence parallelism (`looprl.train.ulysses`): the shard helpers and the degree-1
attention in this process, and everything at degree 2 on 2 gloo processes (one torchrun launch).

Tolerances: the attention of a head subset over the whole gathered sequence is the same float32
arithmetic as the unsplit model's, so logits, log-probs and the loss came out bit-identical
(measured 0.0); gradients are sums of the two ranks' shares in another order (measured <= 6e-8);
a packed trajectory against the same trajectory alone differs by sdpa over other lengths
(measured <= 1.8e-7). All are held at 1e-6 absolute.
"""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looprl.algorithms.core import token_logprobs
from looprl.train import ulysses
from looprl.train.ulysses import block_causal_mask, padded_length, shard, shard_rows
from tests.distributed.ulysses_worker import build_model, rows

WORKER = Path(__file__).with_name("ulysses_worker.py")
ATOL = 1e-6


def test_doctests():
    assert doctest.testmod(ulysses).failed == 0


def test_shard_rows_pads_keeps_positions_and_shifts_targets():
    ids = torch.tensor([[11, 12, 13, 14, 15], [21, 22, 23, 24, 25]])
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    parts = [shard_rows(ids, positions, degree=2, rank=r, pad_id=0) for r in range(2)]
    assert parts[1].input_ids.tolist() == [[14, 15, 0], [24, 25, 0]]
    assert parts[1].position_ids.tolist() == [[0, 1, 2], [3, 4, 5]]  # the pad keeps counting
    assert parts[0].targets.tolist() == [[12, 13, 14], [22, 23, 24]]  # across the shard boundary
    assert parts[1].targets.tolist() == [[15, 0, 0], [25, 0, 0]]
    assert parts[0].valid.tolist() == [[1, 1, 1]] * 2 and parts[1].valid.tolist() == [[1, 0, 0]] * 2
    assert all(p.length == 5 for p in parts)


def test_shards_concatenate_to_the_padded_row():
    ids, positions, _ = rows(0, [[4, 3], [7]])
    parts = [shard_rows(ids, positions, degree=3, rank=r, pad_id=0) for r in range(3)]
    whole = torch.cat([p.input_ids for p in parts], dim=1)
    assert whole.shape == (2, padded_length(7, 3)) == (2, 9)
    assert torch.equal(whole[:, :7], ids) and not whole[:, 7:].any()
    assert torch.equal(torch.cat([p.position_ids for p in parts], dim=1)[:, :7], positions)


def test_degree_one_is_the_unsplit_row():
    ids, positions, _ = rows(0, [[5]])
    part = shard_rows(ids, positions, degree=1, rank=0, pad_id=0)
    assert torch.equal(part.input_ids, ids) and torch.equal(part.targets[:, :-1], ids[:, 1:])


def test_shard_refuses_an_unpadded_length():
    with pytest.raises(ValueError, match="multiple of the degree 2"):
        shard(torch.zeros(1, 5), degree=2, rank=0)


def test_block_causal_mask_separates_trajectories():
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]))
    assert mask.shape == (2, 1, 5, 5)
    assert mask[0, 0, 3].tolist() == [False, False, False, True, False]  # no look back into trajectory 1
    assert torch.equal(mask[1, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    assert block_causal_mask(torch.arange(6)[None]) is None  # one trajectory a row: sdpa's is_causal


@pytest.mark.parametrize("lengths", [[[9], [9]], [[4, 5], [9]]], ids=["plain", "packed"])
def test_degree_one_equals_transformers_sdpa(lengths):
    model = build_model()
    ids, positions, _ = rows(0, lengths)
    ours = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    model.config._attn_implementation = "sdpa"
    theirs = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def test_a_padding_mask_is_refused():
    ids, positions, _ = rows(0, [[6]])
    with pytest.raises(ValueError, match="no padding mask"):
        build_model()(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]), use_cache=False)


def test_logprobs_of_a_shard_match_the_target_aligned_layout():
    model = build_model()
    ids, positions, _ = rows(2, [[7]])
    whole = token_logprobs(model(input_ids=ids, position_ids=positions, use_cache=False).logits[:, :-1], ids[:, 1:])
    part = shard_rows(ids, positions, degree=1, rank=0, pad_id=0)
    ours = token_logprobs(model(input_ids=part.input_ids, position_ids=part.position_ids, use_cache=False).logits,
                          part.targets)
    torch.testing.assert_close(ours[:, :6], whole, rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, float]:
    """Every degree-2 check of ulysses_worker.py in one launch: the largest difference of each."""
    out = tmp_path_factory.mktemp("ulysses") / "out.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), str(out)], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("check", ["all_to_all/forward", "all_to_all/backward"])
def test_all_to_all_and_its_backward(two_ranks, check):
    assert two_ranks[check] <= ATOL


@pytest.mark.parametrize("kv", ["kv2", "kv1"], ids=["kv_heads_equal_degree", "kv_heads_repeated"])
@pytest.mark.parametrize("what", ["logits", "logprobs", "loss", "grads"])
def test_degree_two_equals_the_unsplit_model(two_ranks, kv, what):
    assert two_ranks[f"{kv}/{what}"] <= ATOL


def test_gradient_checkpointing_inside_the_block(two_ranks):
    assert two_ranks["checkpointed/grads"] <= ATOL


def test_mixed_degrees_accumulate_to_the_unsplit_gradient(two_ranks):
    assert two_ranks["mixed/grads"] <= ATOL


def test_packed_trajectories_stay_isolated_at_degree_two(two_ranks):
    assert two_ranks["packed/first"] <= ATOL and two_ranks["packed/second"] <= ATOL
    assert two_ranks["packed/leak"] > 1e-2, "one causal mask over the row should change the second trajectory"
