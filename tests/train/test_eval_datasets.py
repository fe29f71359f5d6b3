"""Evaluation over finite datasets (each row once), the tool-error rate, and several
environments in one `looprl eval` call."""

from __future__ import annotations

import json
import shutil

import gymnasium
import pytest

from looprl.cli import main
from looprl.envs import format_tool_call, make_env
from looprl.envs.wrappers import RecordToolErrors
from looprl.rollout.engine import Completion
from looprl.train.evaluate import dataset_rows, evaluate_episodes
from looprl.train.models import load_tokenizer, resolve_model_path

SMALL_TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
DATASET = "looprl/Dataset-v0"


@pytest.fixture(scope="module")
def tiny_path() -> str:
    return resolve_model_path("looprl/tiny", SMALL_TINY)


class TextEngine:
    """Answers every request with the same text, then the stop token."""

    version = 0

    def __init__(self, tokenizer, text: str):
        self.ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]

    async def generate(self, requests):
        return [Completion(list(self.ids), [-0.1] * len(self.ids), True, self.version) for _ in requests]


def test_only_a_dataset_env_lists_its_tasks():
    env = make_env(DATASET, split="test")
    assert dataset_rows(DATASET, {"split": "test"}) == [r.task_id for r in env.unwrapped.rows]
    assert 0 < len(env.unwrapped.rows) < 242  # the built-in rows' held-out fifth, not all of them
    assert dataset_rows("looprl/Calc-v0", {}) is None


def test_record_tool_errors_counts_error_results_of_the_episode():
    env = RecordToolErrors(make_env(DATASET, split="test"))
    env.reset(seed=0)
    env.step("no call here")  # "Error: no tool call found"
    env.step(format_tool_call("answer", {"text": "7"}))  # graded: not an error
    assert env.counts() == {"tool_results": 2, "tool_errors": 1}
    env.reset(seed=1)
    assert env.counts() == {"tool_results": 0, "tool_errors": 0}


def test_record_tool_errors_passes_garbage_on_for_the_checker_to_judge():
    class Garbage(gymnasium.Env):
        def step(self, action):
            return ("obs", 0.0)

    assert RecordToolErrors(Garbage()).step("x") == ("obs", 0.0)


def test_a_dataset_is_evaluated_row_by_row_once_each(tiny_path):
    tokenizer = load_tokenizer(tiny_path)
    rows = dataset_rows(DATASET, {"split": "test"})
    engine = TextEngine(tokenizer, "I do not know.")  # no tool call: every turn an error, to the turn limit

    records, lost = evaluate_episodes(engine, tokenizer, DATASET, {"split": "test"}, episodes=1000)
    assert not lost and [r["task_id"] for r in records] == rows  # every row once, in order (not 1000 draws)
    assert [r["seed"] for r in records] == list(range(len(rows)))
    assert all((r["turns"], r["tool_results"], r["tool_errors"]) == (3, 3, 3) for r in records)
    few, _ = evaluate_episodes(engine, tokenizer, DATASET, {"split": "test"}, episodes=5)
    assert [r["task_id"] for r in few] == rows[:5]

    answering = TextEngine(tokenizer, format_tool_call("answer", {"text": "7"}))
    records, _ = evaluate_episodes(answering, tokenizer, DATASET, {"split": "test"}, episodes=5)
    assert all((r["turns"], r["tool_results"], r["tool_errors"]) == (1, 1, 0) for r in records)


def test_eval_plays_every_target_on_every_env_in_one_table(tiny_path, tmp_path, monkeypatch, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_path, model)
    rows = dataset_rows(DATASET, {"split": "test"})
    assert main(["eval", str(model), "--env", DATASET, "--env", "looprl/Calc-v0", "--episodes", "60",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("held-out evaluation") == 1 and "tool errors" in out
    assert f"is a dataset of {len(rows)} rows: playing {len(rows)} of them, each once" in out
    dataset = json.loads((model / "looprl_Dataset-v0_test_sampled_t1.json").read_text())
    calc = json.loads((model / "looprl_Calc-v0_test_sampled_t1.json").read_text())
    assert (dataset["tasks"], calc["tasks"]) == (len(rows), 60)
    assert [r["task_id"] for r in dataset["records"]] == rows
    errors = sum(r["tool_errors"] for r in dataset["records"]) / sum(r["tool_results"] for r in dataset["records"])
    assert dataset["tool_error_rate"] == pytest.approx(errors) and f"{errors:.1%}" in out


def test_eval_refuses_an_env_named_twice(tiny_path, capsys):
    assert main(["eval", tiny_path, "--env", DATASET, "--env", DATASET]) == 2
    err = capsys.readouterr().err
    assert "Expect each --env once" in err and len(err.strip().splitlines()) == 1
