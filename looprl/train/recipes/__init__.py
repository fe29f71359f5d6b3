"""Recipes: what one RL step does, one module each, chosen from `RECIPES`.

`looprl.train.trainer.train` runs every recipe the same way: it builds the
`RunContext`, warm-starts, then calls `recipe.step(ctx)` until the run is done. A
recipe is a class built as `Recipe(ctx, fresh)` (`fresh`: a new run, not a resumed one)
with

- `step(ctx) -> metrics`: one RL step (raise `Interrupted` if the run was asked to
  stop before the step trained anything);
- `state_dict()` / `load_state_dict(state)`: what a checkpoint must keep of it;
- `close()`: stop whatever it started (producers, actors);
- optionally `sampler(cfg)`, a static method: the task sampler its steps draw from
  (default `TaskSampler`), and `expert_env(cfg)`: the environment factory its warm
  start's expert episodes are played in (default: the plain environment).

A registry entry names a recipe, describes it, and says which configs select it
(`selects(cfg)`); exactly one entry selects any valid config. An entry with `run`
instead of a recipe class trains a whole run its own way (offline DPO: TRL's loop).
A new loop mode is one new module and one entry here; the trainer never learns its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from looprl.config import RunConfig


class Interrupted(Exception):
    """The run was asked to stop while a step waited for its data: nothing was trained."""


class Recipe(Protocol):
    def step(self, ctx) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Stateless:
    """The `state_dict` / `load_state_dict` / `close` of a recipe that keeps nothing
    between steps (its sampler and the policy are the run's, checkpointed by the run)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class RecipeEntry:
    """One registered recipe.

    Attributes:
        name: its name (in `results.json` and the CLI's list).
        description: one line for `looprl train --help`.
        selects: whether a config runs this recipe.
        load: returns the recipe class (imported only when a run uses it).
        run: for a recipe with its own loop, returns `train(cfg, resume) -> results`.
    """

    name: str
    description: str
    selects: Callable[[RunConfig], bool]
    load: Callable[[], type] | None = None
    run: Callable[[], Callable[..., dict[str, Any]]] | None = None


def _load(module: str, name: str) -> Callable[[], Any]:
    def load():
        import importlib

        return getattr(importlib.import_module(f"looprl.train.recipes.{module}"), name)

    return load


def _is_dpo(cfg: RunConfig) -> bool:
    return cfg.algorithm.name == "dpo"


RECIPES: dict[str, RecipeEntry] = {entry.name: entry for entry in (
    RecipeEntry("on-policy", "LOOP or GRPO: collect K rollouts per task, then train on them (rollout.mode=sync)",
                lambda c: not _is_dpo(c) and not c.exit.enabled and c.rollout.mode == "sync",
                load=_load("onpolicy", "OnPolicy")),
    RecipeEntry("streaming", "LOOP or GRPO on groups streamed by producers that keep generating while the trainer "
                             "updates (rollout.mode=async; local thread or Ray actors)",
                lambda c: c.rollout.mode == "async", load=_load("streaming", "Streaming")),
    RecipeEntry("exit", "ExIt: GRPO or LOOP on self-improvement steps from a prioritised buffer (exit.enabled=true)",
                lambda c: c.exit.enabled, load=_load("exit", "ExIt")),
    RecipeEntry("online-dpo", "DPO on the best and worst rollout of each task's group (algorithm.name=dpo)",
                lambda c: _is_dpo(c) and c.algorithm.dataset is None, load=_load("online_dpo", "OnlineDPO")),
    RecipeEntry("offline-dpo", "DPO on a JSONL of preference pairs with TRL's DPOTrainer (algorithm.dataset)",
                lambda c: _is_dpo(c) and c.algorithm.dataset is not None,
                run=_load("offline_dpo", "train_offline_dpo")),
)}


def select_recipe(cfg: RunConfig) -> RecipeEntry:
    """The one registered recipe that `cfg` selects."""
    chosen = [entry for entry in RECIPES.values() if entry.selects(cfg)]
    if len(chosen) != 1:  # the config's validators make the selectors exclusive
        raise ValueError(f"Expected one recipe for this config, actually {[e.name for e in chosen]}; known: "
                         f"{', '.join(RECIPES)}")
    return chosen[0]
