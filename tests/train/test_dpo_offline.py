"""Offline DPO: TRL's DPOTrainer on a JSONL of pairs, written as a looprl run folder."""

from __future__ import annotations

import json

import pytest
import torch

from looprl.config import ConfigError, from_dict
from looprl.train.export import load_trained_policy
from looprl.train.metrics import read_metrics
from looprl.train.policy import build_policy, trainable_state
from looprl.train.recipes.offline_dpo import PairsError, load_pairs
from looprl.train.trainer import train

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}

STANDARD = [{"prompt": f"What is {a}+{b}? ", "chosen": str(a + b), "rejected": str(a + b + 1)}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
CONVERSATIONAL = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in STANDARD]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def offline_recipe(tmp_path, dataset, lora: bool, **algorithm):
    return from_dict({
        "name": "offline", "output_dir": str(tmp_path), "seed": 0, "progress": False,
        "model": {"name": "looprl/tiny", "tiny": TINY}, "lora": {"enabled": lora, "r": 4, "alpha": 8},
        "algorithm": {"name": "dpo", "dataset": str(dataset), "minibatch_size": 2, "beta": 0.5,
                      **algorithm},
        "optim": {"lr": 1e-2, "weight_decay": 0.0}, "train": {"steps": 3}, "eval": {"episodes": 0},
    })


@pytest.mark.parametrize(("rows", "lora", "nll_coef"), [(STANDARD, False, 0.0), (CONVERSATIONAL, True, 0.5)],
                         ids=["standard-full", "conversational-lora-rpo"])
def test_offline_dpo_trains_writes_metrics_and_a_loadable_checkpoint(tmp_path, rows, lora, nll_coef):
    cfg = offline_recipe(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", rows), lora, nll_coef=nll_coef)
    results = train(cfg)
    assert results["dpo"]["steps"] == 3 and results["dpo"]["pairs"] == 4
    records = [r for r in read_metrics(cfg.run_dir) if "train/dpo_loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(key in records[0] for key in ("train/reward_accuracy", "train/reward_margin",
                                             "train/chosen_reward", "train/rejected_reward"))
    assert json.loads((cfg.run_dir / "results.json").read_text())["dpo"]["steps"] == 3
    # `looprl eval` / `export` rebuild the trained policy from the run folder.
    model, _, loaded_cfg = load_trained_policy(cfg.run_dir)
    assert loaded_cfg.algorithm.dataset == cfg.algorithm.dataset
    trained = trainable_state(model)
    initial = trainable_state(build_policy(cfg)[0])
    assert set(trained) == set(initial)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)
    if lora:
        assert all("lora_" in k and ".ref." not in k for k in trained)


def test_offline_dpo_reports_the_paired_change_from_the_policy_it_started_from(tmp_path):
    cfg = offline_recipe(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", STANDARD), False)
    cfg = from_dict({**cfg.model_dump(mode="json"), "eval": {"episodes": 3, "greedy": False},
                     "rollout": {"max_new_tokens": 8}})
    results = train(cfg)
    change = results["change"]["sampled"]
    assert change["episodes"] == 3 and change["gained"] + change["lost"] <= 3
    assert change["before"] == results["warmstart"]["sampled"]["success_rate"]
    assert (cfg.run_dir / "eval" / "final_sampled.jsonl").exists()


@pytest.mark.parametrize(("line", "message"), [
    ('{"prompt": "a", "chosen": "b"}', "line 2: missing key 'rejected'"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', "line 2: key 'chosen' is empty"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', "line 2: key 'chosen' must be a string or a list"),
    ('{"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}',
     "line 2: key 'chosen' is a list but 'prompt' is a str"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant"}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}', "line 2: key 'chosen': message 0 must be an object"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}', "line 2: key 'chosen': the last message must be"),
    ('["a", "b", "c"]', "line 2: expected a JSON object"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"', "line 2: not valid JSON"),
])
def test_malformed_rows_name_the_line_and_the_key(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(STANDARD[0]) + "\n" + line + "\n")
    with pytest.raises(PairsError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_pairs(path)


def test_a_bad_dataset_fails_before_the_run_folder_is_written(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [STANDARD[0], CONVERSATIONAL[0]])
    cfg = offline_recipe(tmp_path, path, lora=False)
    with pytest.raises(PairsError, match="line 2: a conversational row in a file of standard rows"):
        train(cfg)
    assert not cfg.run_dir.exists()
    with pytest.raises(PairsError, match="holds no preference pairs"):
        load_pairs(write_jsonl(tmp_path / "empty.jsonl", []))


def test_offline_dpo_config_errors():
    base = {"model": {"tiny": TINY}, "lora": {"enabled": False}, "algorithm": {"name": "dpo", "dataset": "p.jsonl"}}
    with pytest.raises(ConfigError, match="has no warm-start: set sft.steps=0"):
        from_dict({**base, "sft": {"steps": 5}})
    with pytest.raises(ConfigError, match="ignore label_smoothing"):
        from_dict({**base, "algorithm": {**base["algorithm"], "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="applies to loss_type=sigmoid"):
        from_dict({"algorithm": {"name": "dpo", "loss_type": "ipo", "label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="adapter disabled as the reference"):
        from_dict({"algorithm": {"name": "dpo"}, "lora": {"enabled": True}, "sft": {"steps": 5}})
