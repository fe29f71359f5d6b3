"""`looprl eval` reproduces a run's own evaluation, and an episode's outcome depends on
neither the engine's batch size nor how many episodes are evaluated."""

from __future__ import annotations

import itertools
import json

import pytest

from looprl.cli import main
from looprl.rollout.engine import HFEngine
from looprl.train.eval_stats import pass_at_k, pass_hat_k
from looprl.train.evaluate import EVAL_SEED, eval_settings, evaluate_episodes
from looprl.train.export import load_trained_policy
from looprl.train.metrics import read_jsonl
from looprl.train.trainer import train

from .test_recipes import tiny_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run whose policy succeeds on some tasks and fails on others: a small lr keeps
    the warm start's ~15% (on the train split, which its 80 SFT steps fit), and two checkpoints."""
    cfg = tiny_recipe(tmp_path_factory.mktemp("run"), train={"steps": 2}, optim={"lr": 1e-4},
                      eval={"episodes": 60, "greedy": True, "env_kwargs": {"split": "train"}})
    return cfg, train(cfg)


def test_eval_of_a_run_reproduces_its_final_evaluation(run, capsys):
    cfg, results = run
    assert 0 < results["final"]["sampled"]["success_rate"] < 1, "every episode alike: the test would prove nothing"
    assert main(["eval", str(cfg.run_dir)]) == 0
    out = capsys.readouterr().out
    for mode, temperature in (("sampled", 1), ("greedy", 0)):
        report = json.loads((cfg.run_dir / "eval" / f"step_00000002_looprl_Calc-v0_train_{mode}_t{temperature}.json")
                            .read_text())
        assert report["success_rate"] == results["final"][mode]["success_rate"]
        assert report["records"] == read_jsonl(cfg.run_dir / "eval" / f"final_{mode}.jsonl")
        assert f"{report['success_rate']:.1%}" in out


def test_a_runs_own_records_are_a_baseline(run, capsys, tmp_path):
    cfg, _ = run
    own = cfg.run_dir / "eval" / "final_sampled.jsonl"
    assert main(["eval", str(cfg.run_dir), "--temperature", "1", "--baseline", str(own),
                 "--out", str(tmp_path / "r.json")]) == 0
    assert "+0.0 pts (0 gained, 0 lost; sign test p = 1)" in capsys.readouterr().out
    change = json.loads((tmp_path / "r.json").read_text())["change"]
    assert (change["gained"], change["lost"], change["episodes"]) == (0, 0, 60)


@pytest.mark.parametrize("prefix_cache", [True, False])  # the engine's own decoding loop, and model.generate
def test_episode_outcomes_do_not_depend_on_batch_size_or_episodes(run, prefix_cache):
    cfg, _ = run
    model, tokenizer, _ = load_trained_policy(cfg.run_dir)
    settings = eval_settings(cfg)

    def play(batch: int, episodes: int, seed: int = EVAL_SEED) -> dict[int, dict]:
        engine = HFEngine(model, tokenizer, max_batch_size=batch, turn_wait_s=60.0, prefix_cache=prefix_cache)
        records, lost = evaluate_episodes(engine, tokenizer, **{**settings, "episodes": episodes}, temperature=1.0,
                                          sampling_seed=seed)
        assert not lost
        return {r["seed"]: r for r in records}

    reference = play(128, 100)
    assert 0 < sum(r["success"] for r in reference.values()) < 100
    # A record holds the episode's every sampled token (its transcript): equal records, equal episodes.
    differ = {name: sum(got[s] != reference[s] for s in reference)
              for name, got in {"batch 8": play(8, 100), "batch 64": play(64, 100),
                                "300 episodes": play(128, 300)}.items()}
    print(f"episodes of 100 that changed against batch 128 (prefix_cache={prefix_cache}): {differ}")
    assert all(n <= 1 for n in differ.values()), f"episodes of 100 that changed against batch 128: {differ}"
    other = play(128, 100, seed=EVAL_SEED + 1)  # the comparison can fail: other draws give other episodes
    assert sum(other[s] != reference[s] for s in reference) > 50


def test_eval_of_several_checkpoints_prints_one_table_with_pass_at_k(run, capsys):
    cfg, _ = run
    checkpoints = sorted(str(p) for p in (cfg.run_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 2
    assert main(["eval", *checkpoints, "--pass-k", "1,4", "--episodes", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("held-out evaluation") == 1
    assert "t/step_00000000" in out and "t/step_00000002" in out and "pass@4" in out and "pass^4" in out
    report = json.loads((cfg.run_dir / "eval" / "step_00000002_looprl_Calc-v0_train_sampled_t1.json").read_text())
    assert (report["tasks"], report["samples"], len(report["records"])) == (20, 4, 80)
    by_task = {s: [r["success"] for r in report["records"] if r["seed"] == s] for s in range(20)}
    for k in (1, 4):  # the report's figures from its own records
        assert report["pass_at_k"][str(k)] == pytest.approx(sum(pass_at_k(4, sum(v), k) for v in by_task.values()) / 20)
        assert report["pass_hat_k"][str(k)] == pytest.approx(sum(pass_hat_k(4, sum(v), k) for v in by_task.values()) / 20)
    assert report["pass_at_k"]["1"] == pytest.approx(report["success_rate"])


@pytest.mark.parametrize("argv, named", [
    (["--pass-k", "1,x"], "Expect --pass-k to be comma-separated positive integers"),
    (["--pass-k", "0,2"], "Expect --pass-k to be comma-separated positive integers"),
    (["--pass-k", "4", "--samples", "2"], "Expect --samples >= the largest --pass-k (4)"),
    (["--out", "x.json"], "--out names one report, but 2 would be written"),
    (["--baseline", "b.json"], "--baseline pairs with one mode per target"),
])
def test_bad_eval_arguments_are_one_line_errors(run, capsys, argv, named):
    cfg, _ = run
    assert main(["eval", str(cfg.run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1, err


def test_a_model_without_a_run_config_needs_an_env(capsys):
    assert main(["eval", "looprl/tiny"]) == 2
    assert "looprl/tiny is a model, not a run or checkpoint folder: give --env" in capsys.readouterr().err


def brute(outcomes: list[bool], k: int) -> tuple[float, float]:
    """pass@k and pass^k of one task by enumerating every k-subset of its samples."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets), sum(all(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_pass_at_k_and_pass_hat_k_match_enumerating_every_subset(n):
    for outcomes in itertools.product((False, True), repeat=n):
        for k in range(1, n + 1):
            at, hat = brute(list(outcomes), k)
            assert pass_at_k(n, sum(outcomes), k) == pytest.approx(at, abs=1e-12)
            assert pass_hat_k(n, sum(outcomes), k) == pytest.approx(hat, abs=1e-12)


def test_flags_override_the_runs_settings(run):
    from looprl.train.eval_targets import resolve_target

    cfg, _ = run
    none = dict.fromkeys(("env", "episodes", "max_new_tokens", "max_tokens", "temperature", "split", "max_batch_size"))
    own = resolve_target(str(cfg.run_dir), none, {})
    assert own.settings["env_kwargs"] == {"max_operand": 2, "split": "train"} and own.settings["episodes"] == 60
    assert own.modes == {"sampled": 1.0, "greedy": 0.0} and own.engine["max_batch_size"] == cfg.rollout.max_batch_size
    given = resolve_target(str(cfg.run_dir), {**none, "episodes": 5, "split": "test", "temperature": 0.0,
                                              "max_batch_size": 8}, {"max_operand": 3})
    assert given.settings["env_kwargs"] == {"max_operand": 3, "split": "test"} and given.settings["episodes"] == 5
    assert given.modes == {"greedy": 0.0} and given.engine["max_batch_size"] == 8
