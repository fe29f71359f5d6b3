"""What `--resume` may change: the checkpoint's config against the new one.

A resumed run continues the same experiment. Fields that define it (the model and its
LoRA shape, the environment and its kwargs, the seed, the algorithm and the recipe's
mode) cannot change: the weights, the optimizer state and the sampled tasks would no
longer mean what the run records say; such a change is refused, naming each field.
Every other field (the learning rate, the number of steps, evaluation, logging, ...) may
change: the new value is used for real (the optimizer's learning rate too) and printed.
"""

from __future__ import annotations

from typing import Any

from looprl.config import RunConfig

# Dotted prefixes of the fields a resumed run must keep.
IMMUTABLE = ("seed", "model", "lora.enabled", "lora.r", "lora.alpha", "lora.target_modules",
             "env.id", "env.kwargs", "env.max_tokens", "algorithm.name", "rollout.mode", "rollout.group_size",
             "rollout.context_window", "exit.enabled", "sft")


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    # Kwargs and the tiny model's shape compare whole: `env.kwargs: {...} -> {...}`.
    if isinstance(data, dict) and data and not prefix.rstrip(".").endswith(("kwargs", "tiny")):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def config_changes(old: dict[str, Any], new: RunConfig) -> tuple[list[str], list[str]]:
    """`(refused, applied)`: each a list of `field: old -> new` for the fields that differ.

    Args:
        old: the checkpoint's config (as its manifest stores it).
        new: the config the run is resumed with.
    """
    before, after = _flat(old), _flat(new.model_dump(mode="json"))
    refused, applied = [], []
    for key in sorted(set(before) | set(after)):
        if key in ("name", "output_dir") or before.get(key) == after.get(key):  # the folder: the same by lookup
            continue
        line = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        immutable = any(key == p or key.startswith(p + ".") for p in IMMUTABLE)
        (refused if immutable else applied).append(line)
    return refused, applied


def check_resume(old: dict[str, Any], new: RunConfig) -> list[str]:
    """The changes `--resume` applies; raises if it would change what the run is.

    Raises:
        ValueError: a field that cannot change on resume differs (each is named).
    """
    refused, applied = config_changes(old, new)
    if refused:
        raise ValueError("--resume cannot change what the run is: " + "; ".join(refused)
                         + " (start a new run with another name=, or resume with the checkpoint's values)")
    return applied


def apply_optimizer_settings(optimizer, cfg: RunConfig) -> None:
    """The config's optimizer settings on a restored optimizer (its state dict holds the old ones)."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.optim.lr
        group["weight_decay"] = cfg.optim.weight_decay
        group["betas"] = tuple(cfg.optim.betas)
