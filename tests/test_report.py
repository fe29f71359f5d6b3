"""`looprl report`: the page of a tiny run renders in headless Chromium, the trajectory viewer
opens an episode from the URL and shows its turns, and a folder that is not a run is refused."""

from __future__ import annotations

import doctest
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from looprl.cli import main
from looprl.report import charts, tables
from looprl.report.run import load_run
from tests.recipes.test_recipes import tiny_recipe

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (`make setup` installs it as root with apt)")


def chromium(page: Path, fragment: str, tmp_path: Path, *, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran (`--dump-dom`), opened at `#fragment`; with
    `screenshot`, a PNG of the window instead (and an empty string)."""
    action = [f"--screenshot={screenshot}", "--window-size=1280,1700", "--hide-scrollbars"] if screenshot else ["--dump-dom"]
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium'}",
           "--run-all-compositor-stages-before-draw", "--virtual-time-budget=3000", *action,
           f"{page.resolve().as_uri()}#{fragment}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True).stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny run with held-out evaluations before and after two RL steps (6 episodes each)."""
    from looprl.train.trainer import train

    cfg = tiny_recipe(tmp_path_factory.mktemp("report"), train={"steps": 2, "save_every": 2},
                      sft={"steps": 30}, eval={"episodes": 6})
    train(cfg)
    return cfg.run_dir


@pytest.fixture
def chat_run(tmp_path) -> Path:
    """A hand-written run folder whose eval records hold their messages, as the viewer reads them."""
    run = tmp_path / "chat"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("name: chat\n")
    metrics = [{"step": s, "time": 0.0, "rollout/reward_mean": 0.1 * s, "train/pg_loss": 1.0 / s} for s in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    chat = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": 'Let me compute.<tool_call>{"name": "calculator", "arguments": '
                                             '{"expression": "2 + 3"}}</tool_call>'},
            {"role": "tool", "name": "calculator", "content": "5"},
            {"role": "assistant", "content": '<tool_call>{"name": "answer", "arguments": {"value": "5"}}</tool_call>'},
            {"role": "tool", "name": "answer", "content": "correct </script><b>not bold</b>"}]
    records = [{"seed": s, "task_id": f"calc:2 + {s}", "success": s == 1, "return": float(s == 1), "turns": 2,
                "tokens": 30, "truncated": False, "messages": chat} for s in range(3)]
    (run / "eval" / "final_sampled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@needs_chromium
def test_report_of_a_tiny_run_renders_and_opens_an_episode(tiny_run, tmp_path):
    assert main(["report", str(tiny_run)]) == 0
    page = tiny_run / "report" / "index.html"
    html = page.read_text()
    # Self-contained: nothing is fetched.
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", html)
    assert "http://" not in html and "https://" not in html
    assert list((tiny_run / "report").glob("training_*.png"))  # matplotlib is in the dev extra

    dom = chromium(page, "episode=final/sampled/2", tmp_path)
    assert 'id="training"' in dom and "<svg" in dom and "reward_mean" in dom
    assert len(re.findall(r"<tr[^>]*data-id=", dom)) == 4 * 6  # warmstart and final, sampled and greedy
    assert dom.count("<tr><td>") == 4  # the evaluation table's rows
    opened = re.search(r'<div id="episode" class="episode" data-id="final/sampled/2">(.*?)</div>', dom, re.S)
    assert opened and "seed 2" in opened.group(1)
    # The evaluation records hold each episode's transcript: the viewer shows its turns.
    episode = dom[opened.start():]
    episode = episode[:episode.index("<script")] if "<script" in episode else episode  # the page's code quotes it
    assert "summary only" not in episode
    assert episode.count('class="role"') >= 3 and "assistant" in episode and "Compute" in episode

    shot = tmp_path / "report.png"
    chromium(page, "episode=final/sampled/2", tmp_path, screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


@needs_chromium
def test_viewer_shows_each_turn_and_filters_from_the_url(chat_run, tmp_path):
    out = tmp_path / "out"
    assert main(["report", str(chat_run), "--out", str(out)]) == 0
    dom = chromium(out / "index.html", "episode=final/sampled/1", tmp_path)
    turns = re.findall(r'<div class="turn" data-turn="\d">(.*?)</div></div>(?=<div class="turn"|</div>)', dom, re.S)
    assert len(turns) == 2
    assert "Let me compute." in turns[0] and "calculator" in turns[0] and 'class="msg tool-result"' in turns[0]
    assert '"value": "5"' in turns[1]
    # Model and tool text is shown as text, never parsed as markup.
    assert "&lt;b&gt;not bold&lt;/b&gt;" in dom and "<b>not bold</b>" not in dom

    dom = chromium(out / "index.html", "outcome=failure&q=calc:2", tmp_path)
    assert len(re.findall(r"<tr[^>]*data-id=", dom)) == 2
    assert "2 of 3 episodes" in dom


def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.yaml" in err and str(tmp_path) in err


def test_series_are_grouped_by_folder_and_the_interval_is_wilsons():
    metrics = [{"step": 1, "rollout/reward_mean": 0.5, "rollout/dropped/stale": 0, "train/pg_loss": 0.1,
                "eval/final/greedy/success_rate": 1.0, "note": "text"},
               {"step": 2, "rollout/reward_mean": 0.7, "rollout/dropped/stale": 0, "train/pg_loss": float("nan")}]
    groups = charts.training_groups(metrics)
    assert list(groups) == ["rollout", "rollout/dropped", "train"]
    assert groups["rollout"]["rollout/reward_mean"] == [(1, 0.5), (2, 0.7)]
    assert groups["train"]["train/pg_loss"] == [(1, 0.1)]  # non-finite values are left out
    assert charts.is_constant(groups["rollout/dropped"]["rollout/dropped/stale"])
    assert charts.eval_curves(metrics) == {"success_rate": {"greedy": [(1, 1.0)]}}
    assert doctest.testmod(tables).failed == 0


def test_the_eval_table_gives_the_tool_error_rate_over_tool_results(chat_run):
    [row] = tables.eval_rows(load_run(chat_run))
    assert row["tool_error_rate"] is None  # records written before evaluation counted tool results
    records = [{"seed": s, "task_id": "t", "success": True, "return": 1.0, "turns": 2, "tokens": 9,
                "truncated": False, "tool_results": results, "tool_errors": errors}
               for s, (results, errors) in enumerate([(3, 1), (1, 0), (0, 0)])]
    (chat_run / "eval" / "final_sampled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    [row] = tables.eval_rows(load_run(chat_run))
    assert row["tool_error_rate"] == pytest.approx(1 / 4)
