"""Whole tiny recipes, a few steps each: they train, stay finite, and resume exactly."""

from __future__ import annotations

import math

import pytest
import torch

from looprl.config import from_dict
from looprl.train.checkpoint import CheckpointManager
from looprl.train.metrics import read_metrics
from looprl.train.trainer import train

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def tiny_recipe(tmp_path, **sections):
    base = {
        "name": "t", "output_dir": str(tmp_path), "seed": 3, "progress": False,
        "model": {"name": "looprl/tiny", "tiny": TINY},
        "lora": {"enabled": False, "r": 16, "alpha": 32},
        # Operands of 1-2 and 80 SFT steps: the policy succeeds ~15% of the time, so
        # groups have reward variance and the policy gradient is not zero.
        "env": {"id": "looprl/Calc-v0", "kwargs": {"max_operand": 2}, "max_tokens": 192},
        # Tests compare runs bit for bit: the default `turn_wait_s` (None) batches by the
        # episodes, not by a clock, so that holds on a loaded machine too.
        "rollout": {"tasks_per_step": 6, "group_size": 4, "max_new_tokens": 24},
        "algorithm": {"epochs": 2, "minibatch_size": 4},
        # No weight decay: any change to the weights comes from the policy gradient.
        "optim": {"lr": 1e-2, "grad_clip": 1.0, "weight_decay": 0.0},
        "sft": {"steps": 80, "batch_size": 16, "lr": 2e-2, "episodes": 64},
        "train": {"steps": 4, "save_every": 2},
        "eval": {"episodes": 0},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(base)


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory):
    """A warm-started tiny model folder: what LoRA adapts (LoRA cannot learn from random weights)."""
    root = tmp_path_factory.mktemp("warm")
    cfg = tiny_recipe(root, train={"steps": 0})
    train(cfg)
    return cfg.run_dir / "warmstart"


def lora_recipe(tmp_path, warm_model, **sections):
    """LoRA on the warm-started model, as a user adapts a pretrained one."""
    return tiny_recipe(tmp_path, model={"name": str(warm_model), "tiny": {}}, lora={"enabled": True},
                       sft={"steps": 0}, **sections)


def final_state(run_dir):
    ckpt = CheckpointManager.load(CheckpointManager(run_dir / "checkpoints").latest())
    return ckpt.step, ckpt.model_state


def rl_records(run_dir):
    """Per-step RL metrics without wall-clock figures (`perf/*` and the record's `time`), which legitimately differ."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "time"}
            for r in read_metrics(run_dir) if "rollout/reward_mean" in r]


@pytest.mark.parametrize("lora", [True, False])
def test_recipe_trains_parameters_and_stays_finite(tmp_path, warm_model, lora):
    make = (lambda path, **kw: lora_recipe(path, warm_model, **kw)) if lora else tiny_recipe
    cfg = make(tmp_path, train={"steps": 3})
    train(cfg)
    step, state = final_state(cfg.run_dir)
    assert step == 3
    records = rl_records(cfg.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert all(math.isfinite(v) for v in record.values() if isinstance(v, float)), record
    assert max(r["rollout/reward_mean"] for r in records) > 0, "no reward: the test would not exercise learning"
    assert sum(r["train/optimizer_steps"] for r in records) > 0
    assert all(torch.isfinite(t).all() for t in state.values())
    # The trained parameters moved away from where the run started (no weight decay:
    # only the policy gradient moves them).
    start = make(tmp_path / "start", train={"steps": 0})
    train(start)
    _, initial = final_state(start.run_dir)
    assert set(initial) == set(state)
    assert any(not torch.equal(initial[k], state[k]) for k in state)
    if lora:
        assert all("lora_" in k for k in state), "with LoRA only the adapter is trained and saved"


def test_stopped_and_resumed_run_matches_uninterrupted(tmp_path, warm_model):
    whole = lora_recipe(tmp_path / "a", warm_model)
    train(whole)

    part = lora_recipe(tmp_path / "b", warm_model, train={"steps": 2})
    train(part)
    assert final_state(part.run_dir)[0] == 2
    train(lora_recipe(tmp_path / "b", warm_model), resume=True)

    step_a, state_a = final_state(whole.run_dir)
    step_b, state_b = final_state(part.run_dir)
    assert step_a == step_b == 4
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=0, msg=key)
    assert rl_records(part.run_dir) == rl_records(whole.run_dir)


@pytest.mark.parametrize("lora", [False, True])
def test_warm_start_is_saved_as_a_model_folder_that_is_the_step_0_policy(tmp_path, warm_model, lora):
    from transformers import AutoModelForCausalLM

    from looprl.train.export import load_trained_policy
    from looprl.train.models import load_policy

    # With LoRA, SFT trains an adapter on the warm model; the folder holds it merged.
    lora_on_warm = {"model": {"name": str(warm_model), "tiny": {}}, "lora": {"enabled": True}}

    def make(path, **sections):
        return tiny_recipe(path, **(lora_on_warm if lora else {}), **sections)

    cfg = make(tmp_path, sft={"steps": 10}, train={"steps": 0})
    train(cfg)
    folder = cfg.run_dir / "warmstart"
    saved = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not any("lora" in name for name, _ in saved.named_parameters())
    policy, tokenizer, _ = load_trained_policy(cfg.run_dir)  # the step-0 checkpoint
    ids = torch.tensor([tokenizer.encode("Compute 1 + 2.", add_special_tokens=False)])
    with torch.no_grad():
        expected = policy(input_ids=ids).logits
        torch.testing.assert_close(saved(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
    # SFT changed the model, so the comparison could fail.
    start, _, _ = load_policy(str(warm_model), None) if lora else load_policy("looprl/tiny", TINY)
    with torch.no_grad():
        assert (start(input_ids=ids).logits - expected).abs().max().item() > 1e-2
    # A run that does no SFT writes no warm-start folder.
    again = make(tmp_path / "again", sft={"steps": 0}, train={"steps": 0})
    train(again)
    assert not (again.run_dir / "warmstart").exists()


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_recipe(tmp_path), resume=True)


def test_eval_cli_on_a_run_writes_its_report_in_the_runs_eval_folder(tmp_path, capsys):
    import json

    from looprl.cli import main

    cfg = tiny_recipe(tmp_path, train={"steps": 1})
    train(cfg)
    argv = ["eval", "--model", str(cfg.run_dir), "--env", "looprl/Calc-v0", "max_operand=2", "--episodes", "6",
            "--max-new-tokens", "16", "--max-tokens", "192", "--temperature", "1"]
    assert main(argv) == 0
    path = cfg.run_dir / "eval" / "step_00000001_looprl_Calc-v0_test_sampled_t1.json"
    report = json.loads(path.read_text())
    assert report["episodes"] == 6 and report["env"] == "looprl/Calc-v0"
    assert report["env_kwargs"] == {"max_operand": 2, "split": "test"}
    assert 0.0 <= report["success_rate"] <= 1.0 and report["mean_turns"] >= 1
    assert [r["seed"] for r in report["records"]] == list(range(6))
    assert sum(r["success"] for r in report["records"]) / 6 == report["success_rate"]
    assert all(r["task_id"].startswith("calc:") for r in report["records"]), report["records"][0]

    # The same policy on the same tasks with the same sampling seed: nothing changes.
    baseline = tmp_path / "baseline.json"
    path.rename(baseline)
    capsys.readouterr()
    assert main(argv + ["--baseline", str(baseline)]) == 0
    assert "change from baseline" in capsys.readouterr().out
    again = json.loads(path.read_text())
    assert again["records"] == report["records"]
    assert again["change"]["gained"] == again["change"]["lost"] == 0 and again["change"]["p_value"] == 1.0


def test_eval_baseline_of_other_tasks_is_refused_before_the_model_loads(tmp_path, capsys):
    import json

    from looprl.cli import main

    baseline = tmp_path / "b.json"
    baseline.write_text(json.dumps({"env": "looprl/Calc-v0", "env_kwargs": {"max_operand": 3, "split": "test"},
                                    "records": [{"seed": 0}]}))
    for extra, named in ((["max_operand=2"], "evaluated looprl/Calc-v0 with {'max_operand': 3"),
                         (["max_operand=3", "--episodes", "5"], "has 1 episodes, not --episodes 5")):
        code = main(["eval", "--model", str(tmp_path / "no-model"), "--env", "looprl/Calc-v0", *extra,
                     "--baseline", str(baseline)])
        err = capsys.readouterr().err
        assert code == 2 and named in err, err
    baseline.write_text("{not json")
    assert main(["eval", "--model", "x", "--env", "looprl/Calc-v0", "--baseline", str(baseline)]) == 2
    assert "cannot read a report" in capsys.readouterr().err


def test_a_run_reports_each_episode_and_the_paired_change_from_its_warm_start(tmp_path):
    import json

    cfg = tiny_recipe(tmp_path, eval={"episodes": 8, "greedy": True})
    results = train(cfg)
    for mode in ("sampled", "greedy"):
        before, after = ([json.loads(line) for line in (cfg.run_dir / "eval" / f"{tag}_{mode}.jsonl").open()]
                         for tag in ("warmstart", "final"))
        assert [r["seed"] for r in before] == [r["seed"] for r in after] == list(range(8))
        assert [r["task_id"] for r in before] == [r["task_id"] for r in after]
        assert sum(r["success"] for r in after) / 8 == results["final"][mode]["success_rate"]
        change = results["change"][mode]
        assert change["gained"] == sum(a["success"] and not b["success"] for a, b in zip(after, before))
        assert change["lost"] == sum(b["success"] and not a["success"] for a, b in zip(after, before))
        assert change["before"] == results["warmstart"][mode]["success_rate"]
    assert json.loads((cfg.run_dir / "results.json").read_text())["change"] == results["change"]

    # Resumed with more evaluation episodes than the warm start had: the run ends, without a change.
    more = tiny_recipe(tmp_path, eval={"episodes": 9, "greedy": True}, train={"steps": 6})
    resumed = train(more, resume=True)
    assert resumed["final"]["sampled"]["episodes"] == 9 and "change" not in resumed

    # The same folder, run again without a warm-start evaluation: no change against the old run's.
    again = tiny_recipe(tmp_path, eval={"episodes": 8, "greedy": True, "before_rl": False})
    assert "change" not in train(again, overwrite=True)
    assert not (again.run_dir / "eval" / "warmstart_sampled.jsonl").exists()


def test_ctrl_c_saves_the_last_complete_step_and_resume_finishes_the_run(tmp_path, monkeypatch):
    import os
    import signal

    from looprl.train.recipes.onpolicy import OnPolicy

    whole = tiny_recipe(tmp_path / "a")
    train(whole)

    calls = []

    class StepThenCtrlC(OnPolicy):
        def step(self, ctx):
            metrics = super().step(ctx)
            calls.append(1)
            if len(calls) == 1:  # mid-run of step 1 of 4, the user presses Ctrl-C
                os.kill(os.getpid(), signal.SIGINT)
            return metrics

    part = tiny_recipe(tmp_path / "b", train={"save_every": 100})
    with pytest.raises(KeyboardInterrupt):
        train(part, recipe=StepThenCtrlC)
    assert len(calls) == 1, "the step in progress finishes, no new one starts"
    assert final_state(part.run_dir)[0] == 1
    train(part, resume=True)

    _, state_a = final_state(whole.run_dir)
    _, state_b = final_state(part.run_dir)
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=0, atol=0, msg=key)
    assert rl_records(part.run_dir) == rl_records(whole.run_dir)


def test_a_model_folder_trains_with_lora_like_a_hub_model(tmp_path):
    """A transformers folder (what a user downloads) goes through the same path as looprl/tiny."""
    from looprl.train.export import export

    first = tiny_recipe(tmp_path / "a", train={"steps": 1})
    train(first)
    folder = export(first.run_dir, tmp_path / "exported")

    second = tiny_recipe(tmp_path / "b", model={"name": str(folder), "tiny": {}}, lora={"enabled": True},
                         train={"steps": 2})
    train(second)
    step, state = final_state(second.run_dir)
    assert step == 2 and state and all("lora_" in k for k in state)
    export(second.run_dir, tmp_path / "exported2")
    assert (tmp_path / "exported2" / "model.safetensors").is_file()


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_grpo_recipe_with_kl_to_the_adapter_free_reference_trains(tmp_path, warm_model, loss_agg):
    cfg = lora_recipe(tmp_path, warm_model, algorithm={"name": "grpo", "kl_coef": 0.05, "loss_agg": loss_agg,
                                           "filter_zero_variance": False},
                      train={"steps": 2})
    train(cfg)
    records = rl_records(cfg.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["train/kl"]) and r["train/kl"] >= 0 for r in records)
    assert records[0]["train/optimizer_steps"] > 0
    assert records[-1]["train/kl"] > 0  # the adapter moved the policy away from the reference
    _, state = final_state(cfg.run_dir)
    assert all("lora_" in k for k in state)


def test_kl_without_lora_is_a_clear_error(tmp_path):
    # A config error: it stops the run when the config is read, before any training.
    with pytest.raises(ValueError, match="KL penalty needs lora.enabled=true"):
        train(tiny_recipe(tmp_path, algorithm={"name": "grpo", "kl_coef": 0.1, "filter_zero_variance": False}))
    assert not (tmp_path / "t").exists()


def test_the_engine_waits_for_tool_calls_as_long_as_the_config_says(tmp_path):
    from looprl.train.context import open_run

    engine = open_run(tiny_recipe(tmp_path, rollout={"turn_wait_s": 7.5}), resume=False, overwrite=False).engine
    assert engine.turn_wait_s == 7.5


def test_a_packed_recipe_plays_and_trains_as_the_padded_one(tmp_path):
    """`algorithm.packing`: same episodes, same losses (float rounding), several micro-batches a minibatch."""
    algorithm = {"micro_batch_tokens": 160, "loss_agg": "token-mean"}
    padded = tiny_recipe(tmp_path / "padded", algorithm=algorithm, train={"steps": 3})
    packed = tiny_recipe(tmp_path / "packed", algorithm={**algorithm, "packing": True}, train={"steps": 3})
    train(padded)
    train(packed)
    records = list(zip(rl_records(padded.run_dir), rl_records(packed.run_dir), strict=True))
    assert len(records) == 3 and sum(a["train/optimizer_steps"] for a, _ in records) > 0
    for a, b in records:
        assert {k: v for k, v in a.items() if k.startswith("rollout/")} == \
            {k: v for k, v in b.items() if k.startswith("rollout/")}
        assert a["train/optimizer_steps"] == b["train/optimizer_steps"]
        if a["train/optimizer_steps"]:
            assert b["train/pg_loss"] == pytest.approx(a["train/pg_loss"], abs=1e-6)
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
