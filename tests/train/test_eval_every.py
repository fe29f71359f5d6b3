"""`eval.every`: held-out evaluations during training, which leave the training itself unchanged."""

from __future__ import annotations

from looprl.report.charts import eval_curves
from looprl.train.metrics import read_metrics
from looprl.train.trainer import train
from tests.recipes.test_recipes import rl_records, tiny_recipe


def training(records):
    return [{k: v for k, v in r.items() if k.startswith(("rollout/", "train/")) and "seconds" not in k
             and "per_s" not in k} for r in records]


def test_evaluations_during_training_give_curves_and_change_no_training_step(tmp_path):
    plain = tiny_recipe(tmp_path / "plain", train={"steps": 4, "save_every": 2}, eval={"episodes": 6, "greedy": False})
    every = tiny_recipe(tmp_path / "every", train={"steps": 4, "save_every": 2},
                        eval={"episodes": 6, "greedy": False, "every": 2})
    train(plain)
    results = train(every)
    assert training(rl_records(every.run_dir)) == training(rl_records(plain.run_dir))
    assert sum(r["train/optimizer_steps"] for r in rl_records(every.run_dir)) > 0
    assert list(results["during"]) == ["2"]  # step 4 is the final evaluation
    assert (every.run_dir / "eval" / "step_00002_sampled.jsonl").read_text().count("\n") == 6
    curve = eval_curves(read_metrics(every.run_dir))["success_rate"]["sampled"]
    assert [step for step, _ in curve] == [0, 2, 4]
    assert curve[1][1] == results["during"]["2"]["sampled"]["success_rate"]
