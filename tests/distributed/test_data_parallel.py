"""Data-parallel training (`looprl.train.parallel`) on 2 gloo processes under torchrun,
against the same code in one process: updates, resharded checkpoints, a whole recipe.

Tolerances: two ranks sum their halves of a minibatch's gradient in another order than
one process does, so gradients agree to float32 rounding (~1e-9 relative); Adam divides
by the root of the second moment, which magnifies such differences on tiny gradients,
and 18 optimizer steps at lr 1e-2 leave the weights within ~6e-6 (measured): they are
compared at 3e-5, the losses at 1e-6 relative.

DeepSpeed ZeRO-1/2/3 (`train.backend=deepspeed`) take the same 3 updates in one launch.
Measured against one process: losses within 6e-8 relative, gradient norms within 9e-6
relative, Adam moments within 1.1e-8; weights within 9.7e-6 (ZeRO-1/2) and 2.1e-5 (ZeRO-3:
its reduce-scatter sums in yet another order) full, 1.5e-6 with LoRA. The same reasons
as FSDP2's: compared at 3e-5 (ZeRO-3: 1e-4), gradient norms at 5e-5 relative (they are
means over each update's 6 steps, taken on weights that already differ by that much).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    # DeepSpeed JIT-builds a C++ op on its first start (~20 s here, ~2 min on slower machines):
    # built once into the checkout's ignored .cache, as CI runs on one clone.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return {**env, "OMP_NUM_THREADS": "1", "PATH": PATH}  # PATH: the venv's ninja, in a venv not activated


def run(*args, ranks: int) -> None:
    """The worker with `args`, as one process or under torchrun with `ranks` processes."""
    launch = [sys.executable, str(WORKER)] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(WORKER)]
    done = subprocess.run([*launch, *map(str, args)], env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"worker {args} on {ranks} rank(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def close(a: dict, b: dict, atol: float = 3e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)


def close_optimizer(a: dict, b: dict, atol: float) -> None:
    assert a["state"].keys() == b["state"].keys() and a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        close(a["state"][i], b["state"][i], atol)


def equal_optimizer(a: dict, b: dict) -> None:
    close_optimizer(a, b, atol=0)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module", params=["full", "lora"])
def one_process(request, tmp_path_factory):
    """Three updates (18 optimizer steps) in one process: the reference."""
    out = tmp_path_factory.mktemp(f"one_{request.param}") / "out.pt"
    run("update", request.param, out, 0, 3, ranks=1)
    return request.param, load(out)


def final_state(run_dir: Path) -> tuple[int, dict]:
    """The step and model state of a run's latest checkpoint, of either format."""
    from looprl.train.any_checkpoint import latest_checkpoint_in, read_checkpoint

    ckpt = read_checkpoint(latest_checkpoint_in(run_dir / "checkpoints"))
    return ckpt.step, ckpt.model_state


def test_fsdp2_updates_equal_one_process(one_process, tmp_path):
    mode, one = one_process
    # Saved before the first update, as a fresh run's step 0 is: the sharded save must not step the optimizer.
    run("update", mode, tmp_path / "two.pt", 0, 3, "--save", tmp_path / "ckpt", ranks=2)
    two = load(tmp_path / "two.pt")
    assert one["world"] == 1 and two["world"] == 2
    assert [m["train/optimizer_steps"] for m in two["metrics"]] == [6, 6, 6]
    for a, b in zip(one["metrics"], two["metrics"]):
        assert b["train/pg_loss"] == pytest.approx(a["train/pg_loss"], rel=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)
    close(one["state"], two["state"])
    close_optimizer(one["optimizer"], two["optimizer"], atol=1e-6)
    if mode == "lora":
        assert all("lora_" in k for k in two["state"]), "LoRA trains (and gathers) the adapter only"


def test_fsdp2_packed_updates_equal_one_padded_process(one_process, tmp_path):
    """`algorithm.packing` under FSDP2 (each rank packs its share): the padded single process's updates."""
    mode, one = one_process
    run("update", f"{mode}_packed", tmp_path / "two.pt", 0, 3, ranks=2)
    two = load(tmp_path / "two.pt")
    assert two["world"] == 2 and [m["train/optimizer_steps"] for m in two["metrics"]] == [6, 6, 6]
    for a, b in zip(one["metrics"], two["metrics"]):
        assert b["train/pg_loss"] == pytest.approx(a["train/pg_loss"], rel=1e-5)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
    close(one["state"], two["state"])


def skip_without_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    if shutil.which("g++", path=PATH) is None or shutil.which("ninja", path=PATH) is None:
        pytest.skip("DeepSpeed JIT-builds a C++ op at its start, which needs g++ and ninja (make setup installs them)")


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory):
    """The same three updates on 2 ranks with DeepSpeed ZeRO-1, 2 and 3, full and LoRA (one launch)."""
    skip_without_deepspeed()
    out = tmp_path_factory.mktemp("zero")
    run("zero", out, ranks=2)
    return out


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_updates_equal_one_process(one_process, zero_runs, stage):
    mode, one = one_process
    two = load(zero_runs / f"zero{stage}_{mode}.pt")
    assert two["world"] == 2
    assert [m["train/optimizer_steps"] for m in two["metrics"]] == [6, 6, 6]
    for a, b in zip(one["metrics"], two["metrics"]):
        assert b["train/pg_loss"] == pytest.approx(a["train/pg_loss"], rel=1e-6)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=5e-5)
    close(one["state"], two["state"], atol=1e-4 if stage == 3 else 3e-5)
    close_optimizer(one["optimizer"], two["optimizer"], atol=1e-6)  # gathered from ZeRO's partitions
    assert {s["step"].item() for s in two["optimizer"]["state"].values()} == {18}
    if mode == "lora":
        assert all("lora_" in k for k in two["state"]), "LoRA trains (and gathers) the adapter only"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_resumes_exactly_from_its_checkpoint(zero_runs, stage):
    """Rank 0 writes the gathered state as a one-process checkpoint; loaded back into ZeRO's
    partitions (AdamW's state created there before its first step), the run continues exactly."""
    saved, resumed = load(zero_runs / f"zero{stage}_saved.pt"), load(zero_runs / f"zero{stage}_resumed.pt")
    whole = load(zero_runs / f"zero{stage}_full.pt")
    close(saved["state"], resumed["loaded"]["state"], atol=0)
    equal_optimizer(saved["optimizer"], resumed["loaded"]["optimizer"])
    assert resumed["metrics"] == whole["metrics"][2:]
    close(whole["state"], resumed["state"], atol=0)
    equal_optimizer(whole["optimizer"], resumed["optimizer"])


def test_deepspeed_zero3_kl_penalty_equals_one_process(zero_runs, tmp_path):
    """GRPO's KL to the reference, the policy with its LoRA adapter disabled (through the engine)."""
    run("update", "lora_kl", tmp_path / "one.pt", 0, 3, ranks=1)
    one, two = load(tmp_path / "one.pt"), load(zero_runs / "zero3_lora_kl.pt")
    assert all(m["train/kl"] > 1e-4 for m in one["metrics"])  # the adapter moves the policy off the reference
    for a, b in zip(one["metrics"], two["metrics"], strict=True):
        assert b["train/kl"] == pytest.approx(a["train/kl"], rel=1e-5)
        assert b["train/pg_loss"] == pytest.approx(a["train/pg_loss"], rel=1e-6)
    close(one["state"], two["state"])  # measured: KL within 2.5e-6 relative, adapter weights within 3.2e-6


def test_a_checkpoint_of_2_ranks_resumes_in_1_process_and_back(one_process, tmp_path):
    mode, one = one_process
    if mode == "lora":
        pytest.skip("resharding is the same code for LoRA: the adapter is the trainable state")
    # 2 ranks -> 1 process.
    run("update", mode, tmp_path / "a.pt", 0, 2, "--save", tmp_path / "ckpt2", ranks=2)
    run("update", mode, tmp_path / "a_then_1.pt", 2, 3, "--load", tmp_path / "ckpt2", ranks=1)
    saved, resumed = load(tmp_path / "a.pt"), load(tmp_path / "a_then_1.pt")
    close(saved["state"], resumed["loaded"]["state"], atol=0)  # the weights and optimizer state, exactly
    equal_optimizer(saved["optimizer"], resumed["loaded"]["optimizer"])
    assert resumed["metrics"][0]["train/pg_loss"] == pytest.approx(one["metrics"][2]["train/pg_loss"], rel=1e-6)
    close(one["state"], resumed["state"])
    # 1 process -> 2 ranks.
    run("update", mode, tmp_path / "b.pt", 0, 2, "--save", tmp_path / "ckpt1", ranks=1)
    run("update", mode, tmp_path / "b_then_2.pt", 2, 3, "--load", tmp_path / "ckpt1", ranks=2)
    saved, resumed = load(tmp_path / "b.pt"), load(tmp_path / "b_then_2.pt")
    close(saved["state"], resumed["loaded"]["state"], atol=0)  # sharded, then gathered back: unchanged
    equal_optimizer(saved["optimizer"], resumed["loaded"]["optimizer"])
    assert resumed["metrics"][0]["train/pg_loss"] == pytest.approx(one["metrics"][2]["train/pg_loss"], rel=1e-6)
    close(one["state"], resumed["state"])


def test_a_tiny_recipe_trains_under_torchrun_resumes_exactly_and_exports(tmp_path):
    from looprl.cli import main
    from looprl.train.any_checkpoint import is_sharded
    from looprl.train.checkpoint import CheckpointManager
    from looprl.train.metrics import read_metrics
    from looprl.train.models import resolve_model_path
    from tests.recipes.test_recipes import TINY, rl_records

    resolve_model_path("looprl/tiny", TINY)  # built here once: two ranks building it at once have failed to load it
    whole, part, in_one = tmp_path / "whole", tmp_path / "part", tmp_path / "in_one"
    run("recipe", whole, 4, 0, ranks=2)
    run("recipe", part, 2, 0, ranks=2)
    shutil.copytree(part, in_one)
    run("recipe", part, 4, 6, "--resume", ranks=2)  # and then a held-out evaluation, by rank 0
    assert all(is_sharded(p) for p in (whole / "t" / "checkpoints").iterdir() if p.name.startswith("step_"))
    step_a, state_a = final_state(whole / "t")
    step_b, state_b = final_state(part / "t")
    assert step_a == step_b == 4
    close(state_a, state_b, atol=0)
    assert rl_records(part / "t") == rl_records(whole / "t")
    records = rl_records(whole / "t")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and sum(r["train/optimizer_steps"] for r in records) > 0
    # Both ranks played: a step holds all tasks_per_step x group_size episodes.
    assert all(r["rollout/episodes"] == 24 for r in records), [r.get("rollout/episodes") for r in records]
    results = json.loads((part / "results_4.json").read_text())
    assert results["final"]["sampled"]["episodes"] == 6
    assert len([r for r in read_metrics(part / "t") if "eval/final/sampled/success_rate" in r]) == 1
    # The export is the trained policy.
    assert main(["export", str(whole / "t"), "--out", str(tmp_path / "export")]) == 0
    from transformers import AutoModelForCausalLM

    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "export").named_parameters())
    for key, value in exported.items():
        torch.testing.assert_close(value.detach(), state_a[key], rtol=0, atol=0, msg=key)
    # `looprl eval` and `serve` load a run's policy as export does; config_of_checkpoint reads its manifest.
    from looprl.train.export import load_trained_policy
    from looprl.train.trainer import config_of_checkpoint

    assert config_of_checkpoint(whole / "t" / "checkpoints" / "step_00000004").train.steps == 4
    policy, _, _ = load_trained_policy(whole / "t")
    for key, value in policy.named_parameters():
        torch.testing.assert_close(value.detach(), state_a[key], rtol=0, atol=0, msg=key)
    # The 2 ranks' sharded checkpoint of step 2 resumes in one process, which trains on (and
    # checkpoints in the one-process format).
    step_2, state_2 = final_state(in_one / "t")
    run("recipe", in_one, 4, 0, "--resume", ranks=1)
    step_c, state_c = final_state(in_one / "t")
    assert (step_2, step_c) == (2, 4) and not is_sharded(in_one / "t" / "checkpoints" / "step_00000004")
    assert [r["step"] for r in rl_records(in_one / "t")] == [1, 2, 3, 4]
    assert rl_records(in_one / "t")[:2] == rl_records(whole / "t")[:2]
    records = rl_records(in_one / "t")
    assert all(r["rollout/episodes"] == 24 for r in records[2:])
    # The optimizer state came along: Adam counts every optimizer step of the 4, on 2 ranks and then in 1.
    adam_steps = {s["step"].item() for s in CheckpointManager.load(in_one / "t" / "checkpoints" / "step_00000004")
                  .optimizer_state["state"].values()}
    assert adam_steps == {sum(r["train/optimizer_steps"] for r in records)}
    trained_on = sum(r["train/optimizer_steps"] for r in records[2:]) > 0  # a tiny policy's groups may all fail
    assert any(not torch.equal(state_c[k], state_2[k]) for k in exported) == trained_on


def test_a_tiny_recipe_under_deepspeed_zero3_resumes_exactly_and_exports(tmp_path):
    from looprl.cli import main
    from looprl.train.any_checkpoint import is_sharded
    from looprl.train.models import resolve_model_path
    from tests.recipes.test_recipes import TINY, rl_records

    skip_without_deepspeed()
    resolve_model_path("looprl/tiny", TINY)
    run("recipe_zero", tmp_path, 3, ranks=2)  # 4 steps; 2 steps, then resumed to 4
    whole, part = tmp_path / "whole" / "t", tmp_path / "part" / "t"
    # Rank 0 wrote one-process checkpoints of the gathered state.
    assert not any(is_sharded(p) for p in (whole / "checkpoints").iterdir() if p.name.startswith("step_"))
    step_a, state_a = final_state(whole)
    step_b, state_b = final_state(part)
    assert step_a == step_b == 4
    close(state_a, state_b, atol=0)
    records = rl_records(whole)
    assert rl_records(part) == records and [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["rollout/episodes"] == 24 for r in records)  # both ranks played
    assert sum(r["train/optimizer_steps"] for r in records[2:]) > 0  # the resumed steps trained
    assert main(["export", str(whole), "--out", str(tmp_path / "export")]) == 0
    from transformers import AutoModelForCausalLM

    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "export").named_parameters())
    assert exported.keys() == state_a.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value.detach(), state_a[key], rtol=0, atol=0, msg=key)
