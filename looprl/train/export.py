"""Export a trained policy as a plain transformers model folder (LoRA merged)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from looprl.config import RunConfig, from_dict
from looprl.train.checkpoint import CheckpointManager, find_checkpoint
from looprl.train.models import merge_lora
from looprl.train.policy import build_policy, load_trainable_state


def load_trained_policy(source: str | Path):
    """Rebuild `(model, tokenizer, config)` from a run folder or a checkpoint folder."""
    ckpt = CheckpointManager.load(find_checkpoint(source))
    cfg: RunConfig = from_dict(ckpt.extra["config"])
    model, tokenizer = build_policy(cfg)
    load_trainable_state(model, ckpt.model_state)
    return model, tokenizer, cfg


def export(source: str | Path, out: str | Path) -> Path:
    """Write the merged model, tokenizer and chat template to `out` (atomically).

    The result loads with `AutoModelForCausalLM.from_pretrained(out)` and
    `AutoTokenizer.from_pretrained(out)`, and serves with vLLM as it is.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"Export folder {str(out)!r} exists and is not empty")
    model, tokenizer, _ = load_trained_policy(source)
    return save_model_folder(merge_lora(model), tokenizer, out)


def save_model_folder(model, tokenizer, out: str | Path) -> Path:
    """Write a plain transformers `model` (no LoRA wrapper) and its tokenizer to `out`,
    atomically: the folder appears complete or not at all, replacing an empty one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
