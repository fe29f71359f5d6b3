"""`looprl` CLI: user errors exit non-zero with one line naming the culprit, before any heavy work."""

import subprocess
import sys
from pathlib import Path

import pytest

from looprl.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def _boom(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the bad argument was reported")
    return fail


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Any model build or SFT data generation fails the test (AssertionError is not a user error)."""
    import looprl.train.context as context
    import looprl.train.models as models
    import looprl.train.trainer as trainer

    monkeypatch.setattr(context, "build_policy", _boom("build_policy"))
    monkeypatch.setattr(trainer, "expert_pool", _boom("expert_pool"))
    monkeypatch.setattr(models, "load_policy", _boom("load_policy"))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Resolving a model name is allowed; building or loading one is not."""
    import looprl.train.models as models
    import looprl.train.trainer as trainer

    monkeypatch.setattr(models, "tiny_path", _boom("tiny model build"))
    monkeypatch.setattr(models, "load_tokenizer", _boom("load_tokenizer"))
    monkeypatch.setattr(models, "load_model", _boom("load_model"))
    monkeypatch.setattr(trainer, "expert_pool", _boom("expert_pool"))


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("looprl: error: ") and err.endswith("\n")
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("override, named", [
    ("rollout.group_size=abc", "rollout.group_size: Input should be a valid integer (got 'abc')"),
    ("algorithm.clip_epsilon=0.2", "unknown key 'algorithm.clip_epsilon'"),
])
def test_train_bad_config_is_one_line(capsys, tmp_path, no_heavy_work, override, named):
    err = _one_line_error(capsys, ["train", QUICKSTART, f"output_dir={tmp_path}", override])
    assert named in err
    assert not list(tmp_path.iterdir())  # rejected before a run folder is made


def test_train_unknown_env_fails_before_the_model_is_built(capsys, tmp_path, no_heavy_work):
    err = _one_line_error(capsys, ["train", QUICKSTART, f"output_dir={tmp_path}", "env.id=looprl/Nope-v0"])
    assert "Unknown environment id 'looprl/Nope-v0'" in err
    assert "looprl/Calc-v0" in err  # says what exists


def test_train_missing_model_path_fails_before_loading(capsys, tmp_path, no_model_loading):
    err = _one_line_error(capsys, ["train", QUICKSTART, f"output_dir={tmp_path}", "model.name=/no/such/dir"])
    assert "Model path '/no/such/dir' does not exist" in err


def test_eval_unknown_env_fails_before_the_model_is_loaded(capsys, no_heavy_work):
    err = _one_line_error(capsys, ["eval", "--model", "looprl/tiny", "--env", "looprl/Nope-v0"])
    assert "Unknown environment id 'looprl/Nope-v0'" in err


def test_eval_missing_model_path(capsys, no_model_loading):
    err = _one_line_error(capsys, ["eval", "--model", "./no/such/model", "--env", "looprl/Calc-v0"])
    assert "Model path './no/such/model' does not exist" in err


def test_console_script_reports_bad_value_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "looprl.cli", "train", QUICKSTART, f"output_dir={tmp_path}", "rollout.group_size=abc"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [
        "looprl: error: Invalid config: rollout.group_size: Input should be a valid integer (got 'abc')"
    ]


def test_envs_lists_calc_and_its_tools(capsys):
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    assert "looprl/Calc-v0" in out
    assert "calculator:" in out
    assert "answer:" in out


def test_envs_check_reports_every_check(capsys):
    assert main(["envs", "check", "looprl/Calc-v0", "--episodes", "5", "--hostile", "20"]) == 0
    out = capsys.readouterr().out
    for check in ("gymnasium checker", "determinism", "replay", "hostile actions", "oracle", "empty policy"):
        assert check in out


def test_envs_check_names_a_bad_env_kwarg(capsys):
    assert main(["envs", "check", "looprl/Calc-v0", "bogus=1"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bogus" in err


def test_envs_play_shows_what_the_agent_sees_and_plays_the_oracle(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/oracle\n/oracle\n"))
    assert main(["envs", "play", "looprl/Calc-v0", "split=test", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "Compute" in out and "calculator" in out
    assert "no tool call found" in out  # the person's plain text got the agent's error message
    assert "return 1, success True" in out
