"""`looprl config show RECIPE [key=value ...]`: the resolved config with each field's default and help."""

from __future__ import annotations

from pathlib import Path

from looprl.cli import main
from looprl.config import load_config
from looprl.config_show import changed_settings, settings

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_settings_are_every_field_by_section_with_defaults_and_help():
    cfg = load_config(QUICKSTART, ["seed=7", "algorithm.name=grpo", "algorithm.clip_low=0.3"])
    sections = {s.name: s for s in settings(cfg)}
    assert list(sections) == ["run", "model", "lora", "env", "rollout", "algorithm", "optim", "sft", "train",
                              "eval", "exit", "wandb"]
    by_key = {s.key: s for section in sections.values() for s in section.settings}
    assert len(by_key) == sum(len(s.settings) for s in sections.values())
    seed = by_key["seed"]
    assert (seed.value, seed.default, seed.changed) == (7, 0, True)
    assert seed.help == "seeds torch, the task sampler and SFT data order"
    keep = by_key["train.keep_checkpoints"]
    assert (keep.value, keep.default, keep.changed, keep.help) == (2, 2, False, "complete checkpoints to keep")
    # An algorithm's defaults are its own; its name's default is the default algorithm.
    assert [s.name for s in sections["algorithm"].settings][0] == "name"
    assert (by_key["algorithm.name"].value, by_key["algorithm.name"].default) == ("grpo", "loop")
    assert (by_key["algorithm.clip_low"].value, by_key["algorithm.clip_low"].default) == (0.3, 0.2)
    assert not by_key["algorithm.clip_high"].changed
    assert by_key["optim.betas"].value == [0.9, 0.999]  # JSON values, as a recipe writes them
    changed = changed_settings(cfg)
    assert changed["seed"] == 7 and changed["algorithm.clip_low"] == 0.3 and "train.keep_checkpoints" not in changed


def test_cli_config_show_prints_values_defaults_and_help(capsys):
    assert main(["config", "show", QUICKSTART, "train.keep_checkpoints=5"]) == 0
    out = capsys.readouterr().out
    for text in ("train: the RL loop", "keep_checkpoints", "complete checkpoints to keep", "model: the policy",
                 "looprl/Calc-v0", "AdamW"):
        assert text in out, text
    row = next(line for line in out.splitlines() if "keep_checkpoints" in line)
    assert [cell.strip() for cell in row.split("│")][1:4] == ["keep_checkpoints", "5", "2"]  # key, value, default


def test_cli_config_show_yaml_loads_back_to_the_same_config(capsys, tmp_path):
    overrides = ["seed=7", "rollout.group_size=4", "optim.lr=1e-4", "env.kwargs.max_operand=9", "name=a #b"]
    assert main(["config", "show", QUICKSTART, *overrides, "--yaml"]) == 0
    text = capsys.readouterr().out
    assert "seed: 7  # seeds torch, the task sampler and SFT data order (default: 0)" in text
    assert "  keep_checkpoints: 2  # complete checkpoints to keep\n" in text
    (tmp_path / "resolved.yaml").write_text(text)
    assert load_config(tmp_path / "resolved.yaml") == load_config(QUICKSTART, overrides)


def test_cli_config_show_bad_override_is_one_line(capsys):
    assert main(["config", "show", QUICKSTART, "rollout.group_size=abc"]) == 2
    err = capsys.readouterr().err
    assert err == "looprl: error: Invalid config: rollout.group_size: Input should be a valid integer (got 'abc')\n"
