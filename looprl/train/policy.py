"""Build the trained policy from a config, and move its trainable state in and out."""

from __future__ import annotations

import torch

from looprl.config import RunConfig
from looprl.train.models import add_lora, load_policy


def build_policy(cfg: RunConfig):
    """The model (with a fresh LoRA adapter when enabled) and its tokenizer."""
    model, tokenizer, _ = load_policy(cfg.model.name, cfg.model.tiny or None, cfg.model.dtype, cfg.model.device)
    if cfg.lora.enabled:
        model = add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    model.eval()  # no dropout anywhere: rollouts and training must see the same policy
    return model, tokenizer


def trainable_state(model) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold to restore the policy: the trainable parameters."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load `state` into `model`'s trainable parameters; every one must be present."""
    expected = set(trainable_state(model))
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in state.items():
            params[name].copy_(value)
