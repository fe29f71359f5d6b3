"""Sequence parallelism in training (`train.sequence_parallel`): the on-policy update with each
row split over 2 gloo ranks (Ulysses attention, `looprl.train.ulysses`) against the same run
without the split.

Tolerances: the split changes only the order float32 sums are taken in (each rank's backward
carries its own shard's share of the gradient, FSDP2 adds the shares), so a step's losses
agree to ~1e-8 and its gradients to ~1e-6 relative. Adam magnifies that on tiny gradients:
after dp_worker's 18 optimizer steps at lr 1e-2 the weights are within 2.2e-5 (full) and
5e-7 (LoRA) of one process's, the same under DeepSpeed ZeRO-2 (measured; compared at 5e-5). In the recipe (4 steps: pg_loss
within 8e-8 absolute, grad norms within 3e-5 relative) that is far too little to change a
sampled token, so both runs play the same episodes: compared exactly.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looprl.train.metrics import read_metrics
from looprl.train.models import resolve_model_path
from looprl.train.parallel import Parallel
from looprl.train.trainer import train
from looprl.train.ulysses import check_heads
from tests.distributed.dp_worker import TINY as TINY_UPDATE
from tests.distributed.test_data_parallel import PATH, _env
from tests.recipes.test_recipes import TINY, tiny_recipe

WORKER = Path(__file__).with_name("sp_worker.py")


def launch(*args, ranks: int = 2) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    done = subprocess.run([*(torchrun if ranks > 1 else [sys.executable]), str(WORKER), *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args} on {ranks} rank(s) failed:\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("mode, backend", [("full", "fsdp2"), ("lora", "fsdp2"), ("full", "deepspeed")])
def test_updates_with_rows_split_over_two_ranks_equal_one_process(tmp_path, mode, backend):
    if backend == "deepspeed" and not all(shutil.which(tool, path=PATH) for tool in ("g++", "ninja")):
        pytest.skip("DeepSpeed JIT-builds a C++ op at its start, which needs g++ and ninja")
    resolve_model_path("looprl/tiny", TINY_UPDATE)
    launch("update", mode, tmp_path / "one.pt", 1, ranks=1)
    launch("update", mode, tmp_path / "two.pt", 2, backend)
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert (one["degree"], two["degree"]) == (1, 2)
    assert [m["train/optimizer_steps"] for m in two["metrics"]] == [6, 6, 6]
    for a, b in zip(one["metrics"], two["metrics"]):
        assert b["train/pg_loss"] == pytest.approx(a["train/pg_loss"], rel=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)
    assert one["state"].keys() == two["state"].keys()
    for key in one["state"]:  # full: within 2.2e-5 measured, LoRA 5e-7 (see the module docstring)
        torch.testing.assert_close(two["state"][key], one["state"][key], rtol=0, atol=5e-5, msg=key)


def test_blocks_planned_per_minibatch_train_as_one_process(tmp_path):
    """Adaptive sequence parallelism: rows over 40 tokens (of 6-60) train over both ranks, the
    others one rank each, the blocks planned per minibatch; the losses and weights are one
    process's to float rounding, as with a static degree."""
    resolve_model_path("looprl/tiny", TINY_UPDATE)
    launch("update", "adaptive", tmp_path / "one.pt", 1, ranks=1)
    launch("update", "adaptive", tmp_path / "two.pt", "adaptive")
    one, two = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert len(two["plans"]) == 18 and {(2,), (1, 1)} <= set(two["plans"]), two["plans"]  # both kinds ran
    assert 0 < sum(m["train/split_row_frac"] for m in two["metrics"]) / 3 < 1
    for a, b in zip(one["metrics"], two["metrics"]):
        assert b["train/optimizer_steps"] == a["train/optimizer_steps"] == 6
        assert b["train/pg_loss"] == pytest.approx(a["train/pg_loss"], rel=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)
    for key in one["state"]:
        torch.testing.assert_close(two["state"][key], one["state"][key], rtol=0, atol=5e-5, msg=key)


def rl_records(run_dir):
    return [r for r in read_metrics(run_dir) if "rollout/reward_mean" in r]


def test_a_tiny_recipe_trains_the_same_with_its_rows_split_over_two_ranks(tmp_path):
    resolve_model_path("looprl/tiny", TINY)  # built here once, not by both ranks at once
    launch("recipe", tmp_path)
    off = rl_records(tmp_path / "off" / "t")
    adaptive = [r for r in rl_records(tmp_path / "adaptive" / "t") if r["train/optimizer_steps"]]
    assert any(0 < r["train/split_row_frac"] < 1 for r in adaptive)  # rows over 192 tokens split, others one rank
    for r in adaptive:  # a row over 192 tokens is always split
        assert r["train/split_row_frac"] > 0 or max(r["trained_row_tokens"]) <= 192, r
    for on in (rl_records(tmp_path / "on" / "t"), rl_records(tmp_path / "adaptive" / "t")):
        assert [r["step"] for r in on] == [1, 2, 3, 4] and sum(r["train/optimizer_steps"] for r in on) > 6
        for a, b in zip(off, on):
            assert {k: v for k, v in a.items() if k.startswith("rollout/") and "seconds" not in k and "per_s" not in k} \
                == {k: v for k, v in b.items() if k.startswith("rollout/") and "seconds" not in k and "per_s" not in k}
            assert a["train/optimizer_steps"] == b["train/optimizer_steps"]
            if a["train/optimizer_steps"]:
                assert b["train/pg_loss"] == pytest.approx(a["train/pg_loss"], abs=1e-6)
                assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)


def test_a_split_in_one_process_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"train.sequence_parallel=2 needs as many processes"):
        Parallel().split_sequences(2)


def test_a_degree_that_does_not_split_the_heads_is_refused():
    model = torch.nn.Module()
    model.config = type("Config", (), {"num_attention_heads": 4, "num_key_value_heads": 2})()
    check_heads(model, 2)
    check_heads(model, 4)  # more ranks than KV heads: each KV head is repeated
    with pytest.raises(ValueError, match=r"train.sequence_parallel=3 to divide the model's 4 attention heads"):
        check_heads(model, 3)


def test_recipes_that_do_not_split_sequences_refuse_it(tmp_path):
    cfg = tiny_recipe(tmp_path, algorithm={"name": "dpo"}, train={"sequence_parallel": 2})
    with pytest.raises(ValueError, match=r"does not split sequences .*set train.sequence_parallel=1"):
        train(cfg)
