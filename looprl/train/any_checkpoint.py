"""Checkpoints of either format, for the code that finds and reads them.

A one-process run writes format 1 (:class:`looprl.train.checkpoint.CheckpointManager`:
the trainable weights, the optimizer and the RNG, whole); a data-parallel run writes
format ``dcp-1`` (:class:`looprl.train.sharded_checkpoint.ShardedCheckpointer`: the whole
model and optimizer state in every rank's shards). Both are ``step_*`` folders under a
run's ``checkpoints/``, each with a ``manifest.json`` that names its format; a run folder
holds one or the other, or both when a run was resumed with another number of ranks.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from looprl.train import sharded_checkpoint
from looprl.train.checkpoint import MANIFEST, Checkpoint, CheckpointError, CheckpointManager, find_checkpoint, step_folders
from looprl.train.policy import load_trainable_state, trainable_state


def is_sharded(path: str | Path) -> bool:
    """Whether the checkpoint folder `path` is a sharded one (its manifest says ``dcp-1``).

    A folder without a readable manifest is not: `CheckpointManager.verify` then says what is wrong.
    """
    try:
        return json.loads((Path(path) / MANIFEST).read_bytes()).get("format") == sharded_checkpoint.FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def verify_checkpoint(path: str | Path) -> dict:
    """The manifest of a checkpoint of either format, once every file checks against it.

    Raises:
        CheckpointError: Naming the folder and what is wrong.
    """
    return sharded_checkpoint.verify(path) if is_sharded(path) else CheckpointManager.verify(path)


def latest_checkpoint_in(directory: str | Path) -> Path | None:
    """The newest ``step_*`` checkpoint of either format under `directory` that verifies, or None.

    A newer one that fails verification is skipped with a warning naming it.
    """
    for path in reversed(step_folders(Path(directory))):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
            continue
        return path
    return None


def find_any_checkpoint(path: str | Path) -> Path:
    """`looprl.train.checkpoint.find_checkpoint`, for either format: `path` itself if it is
    a checkpoint (verified), else the newest one in it or in its ``checkpoints/``.

    Raises:
        CheckpointError: Naming `path` and what was expected, if none is found.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        verify_checkpoint(path)
        return path
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = latest_checkpoint_in(directory) if path.is_dir() else None
    return latest if latest is not None else find_checkpoint(path)  # which says what is missing


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint of either format in CPU memory, whole.

    A sharded one is gathered by `sharded_checkpoint.to_full_state` (in this process):
    its `model_state` is the model's whole state dict (frozen weights and buffers too;
    `load_trained_weights` takes the trainable ones), its `optimizer_state` keyed by
    parameter names, and its `rng_state` empty (each rank's is in its own file).

    Raises:
        CheckpointError: If it is missing, partial or corrupt.
    """
    path = Path(path)
    if not is_sharded(path):
        return CheckpointManager.load(path)
    manifest = sharded_checkpoint.verify(path)
    model_state, optimizer_state = sharded_checkpoint.to_full_state(path)
    return Checkpoint(path=path, step=manifest["step"], model_state=model_state, optimizer_state=optimizer_state,
                      extra=manifest["extra"], rng_state={})


def load_trained_weights(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """`ckpt`'s trained weights into `model`'s trainable parameters (every one must be there)."""
    state = ckpt.model_state
    if is_sharded(ckpt.path):
        state = {name: state[name] for name in trainable_state(model) if name in state}
    load_trainable_state(model, state)
