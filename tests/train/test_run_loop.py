"""The run loop's contracts: owned run folders, the algorithm registry, one collection path
(fault policy, closed envs, env concurrency, evaluation keyed by seed) and device placement."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import tests.fixture_envs as fixture_envs
from looprl.cli import main
from looprl.config import ConfigError, from_dict, load_config
from looprl.rollout.engine import HFEngine
from looprl.train.evaluate import evaluate_episodes
from looprl.train.metrics import read_metrics
from looprl.train.trainer import train
from tests.recipes.test_recipes import TINY, tiny_recipe

ENV = "tests.fixture_envs:looprl-test/"


def small(tmp_path, env: str | None = None, **sections):
    """A 2-step tiny run, no SFT, no evaluation (rewards do not matter here)."""
    sections = {"sft": {"steps": 0}, "train": {"steps": 2, "save_every": 2}, **sections}
    if env is not None:
        sections["env"] = {"id": ENV + env, "kwargs": {"max_operand": 2, **sections.pop("env_kwargs", {})},
                           **sections.pop("env_section", {})}
    return tiny_recipe(tmp_path, **sections)


# --- run folders ---------------------------------------------------------------------------


def test_a_run_folder_is_refused_without_resume_or_overwrite_and_overwrite_empties_it(tmp_path, capsys):
    cfg = small(tmp_path, train={"steps": 1, "save_every": 1})
    train(cfg)
    with pytest.raises(FileExistsError, match="already holds a run: pass --resume .* or --overwrite"):
        train(cfg)
    marker = cfg.run_dir / "old_file.txt"
    marker.write_text("from the old run")
    train(cfg, overwrite=True)
    assert not marker.exists() and (cfg.run_dir / "metrics.jsonl").exists()

    # The CLI: one line naming the folder, a non-zero exit.
    argv = ["train", "configs/quickstart.yaml", f"output_dir={tmp_path}", "name=t"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(cfg.run_dir) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="pass one of them"):
        train(cfg, resume=True, overwrite=True)


# --- the algorithm registry ----------------------------------------------------------------


def test_switching_algorithm_drops_the_other_algorithms_fields_with_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="looprl.config"):
        cfg = load_config("configs/quickstart.yaml", ["algorithm.name=grpo"])
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.epochs == 2 and cfg.algorithm.minibatch_size == 32
    assert "algorithm.clip_eps" in caplog.text and "dropped" in caplog.text
    with pytest.raises(ConfigError, match="unknown key 'algorithm.no_such_field'"):
        load_config("configs/quickstart.yaml", ["algorithm.name=grpo", "algorithm.no_such_field=1"])


def test_an_unknown_algorithm_lists_the_known_ones(capsys):
    with pytest.raises(ConfigError, match="unknown algorithm 'ppo'; known: loop, grpo, dpo"):
        from_dict({"algorithm": {"name": "ppo"}})
    assert main(["train", "configs/quickstart.yaml", "algorithm.name=ppo"]) == 2
    assert "unknown algorithm 'ppo'; known: loop, grpo, dpo" in capsys.readouterr().err


def test_the_quickstart_trains_with_grpo_by_a_config_change(tmp_path, capsys):
    tiny = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    argv = ["train", "configs/quickstart.yaml", "algorithm.name=grpo", f"output_dir={tmp_path}", "name=g",
            f"model.tiny={tiny}", "sft.steps=5", "sft.episodes=32", "train.steps=1", "eval.episodes=0",
            "rollout.tasks_per_step=2", "progress=false", "rollout.turn_wait_s=60"]
    assert main(argv) == 0, capsys.readouterr().err
    records = [r for r in read_metrics(tmp_path / "g") if "rollout/reward_mean" in r]
    assert [r["step"] for r in records] == [1] and "train/optimizer_steps" in records[0]


# --- one collection path -------------------------------------------------------------------


def test_every_env_is_closed_after_a_sync_run_an_async_run_and_an_evaluation(tmp_path):
    fixture_envs.Counted.open = 0
    train(small(tmp_path / "sync", "Counted-v0", eval={"episodes": 4, "greedy": True}))
    assert fixture_envs.Counted.open == 0
    train(small(tmp_path / "async", "Counted-v0", rollout={"mode": "async", "max_staleness": 1,
                                                          "turn_wait_s": 60.0}))
    assert fixture_envs.Counted.open == 0
    cfg = small(tmp_path / "eval", "Counted-v0")
    from looprl.train.policy import build_policy

    model, tokenizer = build_policy(cfg)
    records, lost = evaluate_episodes(HFEngine(model, tokenizer), tokenizer, ENV + "Counted-v0", {"max_operand": 2},
                                      6, max_new_tokens=8, max_tokens=192)
    assert len(records) == 6 and not lost
    assert fixture_envs.Counted.open == 0


def test_the_overlap_env_really_detects_overlapping_calls():
    env, other = fixture_envs.NoOverlap(), fixture_envs.NoOverlap()
    inside, release = threading.Event(), threading.Event()
    real = other.env.reset

    def slow_reset(**kwargs):
        inside.set()
        release.wait(30)
        return real(**kwargs)

    other.env.reset = slow_reset
    thread = threading.Thread(target=other.reset, kwargs={"seed": 0})
    thread.start()
    assert inside.wait(30)
    with pytest.raises(fixture_envs.Overlap):
        env.reset(seed=1)
    release.set()
    thread.join(30)


def test_a_thread_unsafe_env_trains_and_evaluates_with_serial_calls(tmp_path):
    cfg = small(tmp_path, "NoOverlap-v0", env_section={"concurrency": "serial"}, eval={"episodes": 6, "greedy": True})
    results = train(cfg)
    records = [r for r in read_metrics(cfg.run_dir) if "rollout/reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r[f"rollout/dropped/{reason}"] == 0 for r in records for reason in ("env_error", "incomplete_group"))
    assert results["final"]["sampled"]["episodes"] == 6 and results["final"]["sampled"]["lost_episodes"] == 0


def test_a_sync_run_counts_its_drops(tmp_path):
    # The run's sampler draws the step's task seeds: make two of its six fail.
    from looprl.rollout.sampler import TaskSampler

    seeds = TaskSampler(3).sample(6)
    cfg = small(tmp_path, "FailSeeds-v0", env_kwargs={"bad": seeds[:2]}, train={"steps": 1, "save_every": 1})
    train(cfg)
    (record,) = [r for r in read_metrics(cfg.run_dir) if "rollout/reward_mean" in r]
    k = cfg.rollout.group_size
    # 2 groups x K episodes, each lost on both attempts (1 retry); no healthy episode of theirs was kept.
    assert record["rollout/dropped/env_garbage"] == 2 * k * 2
    assert record["rollout/dropped/incomplete_group"] == 0


def test_an_evaluation_with_lost_episodes_keys_every_record_by_its_own_seed(tmp_path):
    from looprl.envs import make_env
    from looprl.train.policy import build_policy

    cfg = small(tmp_path, "FailSeeds-v0")
    model, tokenizer = build_policy(cfg)
    records, lost = evaluate_episodes(HFEngine(model, tokenizer), tokenizer, ENV + "FailSeeds-v0",
                                      {"max_operand": 2, "bad": [1, 3]}, 6, max_new_tokens=8, max_tokens=192)
    assert [r["seed"] for r in records] == [0, 2, 4, 5]
    assert [r["task_id"] for r in records] == [make_env("looprl/Calc-v0", max_operand=2).reset(seed=s)[1]["task_id"]
                                               for s in (0, 2, 4, 5)]
    assert [(r["seed"], r["reason"]) for r in lost] == [(1, "env_garbage"), (3, "env_garbage")]


def test_a_run_reports_the_episodes_its_evaluation_lost(tmp_path):
    cfg = small(tmp_path, "FailSeeds-v0", env_kwargs={"bad": [-1]}, eval={"episodes": 5, "greedy": False,
                                                                         "env_kwargs": {"split": "test", "bad": [2]}})
    results = train(cfg)
    assert results["final"]["sampled"]["episodes"] == 4 and results["final"]["sampled"]["lost_episodes"] == 1
    lost = (cfg.run_dir / "eval" / "final_sampled_lost.jsonl").read_text()
    assert '"seed": 2' in lost and "env_garbage" in lost
    assert "change" in results and results["change"]["sampled"]["episodes"] == 4  # paired without seed 2


# --- devices -------------------------------------------------------------------------------


def test_every_tensor_of_an_update_is_made_on_the_models_device(tmp_path):
    """With torch's default device set to `meta`, a tensor made without naming a device
    lands there and the update fails; made on (or moved to) the policy's device, it runs."""
    import random

    from looprl.algorithms import build_algorithm
    from looprl.algorithms.core import PairLossInputs  # noqa: F401 (imported before the default moves)
    from looprl.train.policy import build_policy
    from looprl.train.sft import sft_loss
    from looprl.train.update import update_policy
    from tests.train.test_batch import random_trajectory

    cfg = from_dict({"model": {"tiny": TINY}, "lora": {"enabled": False},
                     "algorithm": {"micro_batch_tokens": 64, "loss_agg": "token-mean"}})
    model, tokenizer = build_policy(cfg)
    rng = random.Random(0)
    rows = [(random_trajectory(rng, len(tokenizer), n), a) for n, a in zip([7, 30, 12, 25], [1.0, -0.5, 0.25, -1.0])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.set_default_device("meta")
    try:
        metrics = update_policy(cfg, build_algorithm(cfg), model, tokenizer, optimizer, rows)
        loss = sft_loss(model, [t for t, _ in rows], tokenizer.pad_token_id)
    finally:
        torch.set_default_device(None)
    assert metrics["train/optimizer_steps"] > 0 and torch.isfinite(loss).item()
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_tiny_recipe_trains_on_cuda(tmp_path):
    cfg = small(tmp_path, model={"name": "looprl/tiny", "tiny": TINY, "device": "cuda"},
                eval={"episodes": 4, "greedy": True})
    results = train(cfg)
    assert results["final"]["sampled"]["episodes"] == 4
    records = [r for r in read_metrics(cfg.run_dir) if "rollout/reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2]
