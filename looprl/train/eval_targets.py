"""What `looprl eval` evaluates: run folders, checkpoints or models, each with the settings
its evaluation plays under (a run's own config unless the command line overrides it).

A run or checkpoint is evaluated as the run evaluated itself (`eval_settings`, `eval_modes`,
the run's engine batch size and prefix cache), so `looprl eval RUN` reproduces the run's
final evaluation; a model id or folder has no config, and takes `--env` and the defaults.
Reports go to the run's `eval/` folder, never inside a checkpoint (rotation deletes those).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looprl.config import RunConfig, from_dict
from looprl.envs import make_env
from looprl.train.any_checkpoint import find_any_checkpoint, verify_checkpoint
from looprl.train.evaluate import dataset_rows, eval_modes, eval_settings

# Without a run config: what `looprl eval --model M --env E` plays.
DEFAULTS = {"episodes": 100, "max_new_tokens": 64, "max_tokens": 1024, "temperature": 1.0, "split": "test",
            "max_batch_size": 64}


@dataclass
class EvalTarget:
    """One thing to evaluate.

    Attributes:
        source: what was named (a run or checkpoint folder, or a model id or folder).
        label: how the table names it (`run/step_00000150`).
        checkpoint: the checkpoint folder that holds its weights (None: a model).
        cfg: the run's config (None: a model).
        settings: `evaluate_episodes` keyword arguments but the temperature.
        modes: mode name -> temperature.
        engine: `HFEngine` keyword arguments (batch size, turn wait, prefix cache).
        report_dir: where its reports go by default (None: the current folder).
        rows: the environment's dataset rows, when its tasks are a finite dataset (each is
            played once, the first `settings["episodes"]` of them); None: generated tasks.
    """

    source: str
    label: str
    checkpoint: Path | None
    cfg: RunConfig | None
    settings: dict[str, Any]
    modes: dict[str, float]
    engine: dict[str, Any]
    report_dir: Path | None
    rows: int | None = None

    def report_path(self, mode: str) -> Path:
        env, split = self.settings["env_id"].replace("/", "_"), self.settings["env_kwargs"].get("split", "all")
        prefix = f"{self.checkpoint.name}_" if self.checkpoint is not None else ""
        return (self.report_dir or Path(".")) / f"{prefix}{env}_{split}_{mode}_t{self.modes[mode]:g}.json"


def is_trained(source: str) -> bool:
    """Whether `source` is a run folder or a checkpoint folder (else a model id or folder)."""
    path = Path(source)
    return path.is_dir() and ((path / "manifest.json").is_file() or (path / "checkpoints").is_dir())


def mode_name(temperature: float) -> str:
    return "greedy" if temperature == 0 else "sampled"


def resolve_target(source: str, options: dict[str, Any], env_kwargs: dict[str, Any]) -> EvalTarget:
    """`source` with its settings: the run's config (if it is a run or checkpoint) under
    `options` (`env`, `episodes`, `max_new_tokens`, `max_tokens`, `temperature`, `split`,
    `max_batch_size`; None: not given) and `env_kwargs` (given key=value pairs)."""
    given = {k: v for k, v in options.items() if v is not None}
    if is_trained(source):
        checkpoint = find_any_checkpoint(source)
        cfg = checkpoint_config(checkpoint)
        settings = eval_settings(cfg)
        modes = eval_modes(cfg)
        r = cfg.rollout
        engine = {"max_batch_size": r.max_batch_size, "turn_wait_s": r.turn_wait_s, "prefix_cache": r.prefix_cache,
                  "shared_prefix": r.shared_prefix}
        run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None
        label = f"{run_dir.name}/{checkpoint.name}" if run_dir is not None else str(checkpoint)
        report_dir = run_dir / "eval" if run_dir is not None else None
    else:
        if "env" not in given:
            raise ValueError(f"{source} is a model, not a run or checkpoint folder: give --env (and its kwargs)")
        checkpoint, cfg, engine, label = None, None, {}, source
        settings = {"env_id": given["env"], "env_kwargs": {}, "episodes": DEFAULTS["episodes"],
                    "max_new_tokens": DEFAULTS["max_new_tokens"], "max_tokens": DEFAULTS["max_tokens"]}
        modes = {}
        path = Path(source)
        report_dir = path if path.is_dir() else None
    other_env = "env" in given and given["env"] != settings["env_id"]
    if other_env:  # another environment: the run's kwargs do not apply
        settings["env_id"], settings["env_kwargs"] = given["env"], {}
    settings["env_kwargs"] = {**settings["env_kwargs"], **env_kwargs}
    if "split" in given or cfg is None or other_env:
        settings["env_kwargs"]["split"] = given.get("split", DEFAULTS["split"])
    for key in ("episodes", "max_new_tokens", "max_tokens"):
        settings[key] = given.get(key, settings[key])
    if "temperature" in given or not modes:
        temperature = given.get("temperature", DEFAULTS["temperature"])
        modes = {mode_name(temperature): temperature}
    engine["max_batch_size"] = given.get("max_batch_size", engine.get("max_batch_size", DEFAULTS["max_batch_size"]))
    make_env(settings["env_id"], **settings["env_kwargs"]).close()  # a bad id or kwarg: fail before loading models
    rows = dataset_rows(settings["env_id"], settings["env_kwargs"])
    if rows is not None:  # each row once, as the run's own evaluation plays them; a model's default: all rows
        asked = settings["episodes"] if "episodes" in given or cfg is not None else len(rows)
        settings["episodes"] = min(asked, len(rows))
    return EvalTarget(source, label, checkpoint, cfg, settings, modes, engine, report_dir,
                      None if rows is None else len(rows))


def checkpoint_config(checkpoint: Path) -> RunConfig:
    """The run config a checkpoint's manifest stores, read without loading its weights."""
    config = verify_checkpoint(checkpoint).get("extra", {}).get("config")
    if not isinstance(config, dict):
        raise ValueError(f"Checkpoint {checkpoint} holds no run config (manifest extra.config): it was not written "
                         "by `looprl train`, so its weights cannot be rebuilt into a policy")
    return from_dict(config)
