"""Sharded, asynchronous checkpoints for data-parallel (FSDP2) runs, with torch.distributed.checkpoint.

A sharded checkpoint is a directory ``step_{step:08d}`` holding

- DCP's files (``.metadata``, ``__{rank}_0.distcp``): the model and optimizer state of
  :func:`torch.distributed.checkpoint.state_dict.get_state_dict`, each rank writing its
  own shards, so it loads into any world size (2 ranks -> 1 process, 1 -> 2);
- ``rng_rank_{rank:05d}.pt``: each rank's RNG states (:func:`capture_rng_state`);
- ``manifest.json`` (format ``dcp-1``): step, world size, size and SHA-256 of every file,
  and the caller's JSON ``extra``; ``manifest.sha256``, written last, its checksum.

The folder is written as ``.tmp-step_{step:08d}-{PID of rank 0}`` and renamed into place
by rank 0 once every rank's files are written and the manifest is synced: the naming and
completeness rule of :class:`looprl.train.checkpoint.CheckpointManager`, so a kill at any
moment leaves a ``step_*`` directory complete or absent (its leftover clean-up also
applies). ``CheckpointManager.latest()`` skips these folders with a warning (their
manifest has another format); :func:`latest` here applies the same rule to this format.
Rank 0 reads every rank's files to hash them, and the leftover clean-up checks rank 0's
PID on its own host: the directory must be shared, as on one node.

:meth:`ShardedCheckpointer.save` blocks only while it agrees on the folder with the other
ranks, writes the RNG file and starts ``dcp.async_save``: the tensors are copied to host
memory by a staging thread (``DefaultStager`` with ``use_async_staging``) while the caller
goes on with forward and backward, and :meth:`~ShardedCheckpointer.wait_staged`, called
before the next ``optimizer.step()``, waits for that copy. The files are then written by
DCP's writer thread. Its collectives run on a gloo group of their own, created by the
checkpointer: on the training's group they would interleave with the all-gathers and
reduce-scatters that the main thread issues meanwhile, and the ranks would disagree on
which collective comes next.

Typical use (every rank)::

    checkpointer = ShardedCheckpointer(run_dir / "checkpoints", keep_last=3)
    for step in ...:
        checkpointer.poll()               # a failed background save raises here
        loss = forward_backward(batch)
        checkpointer.wait_staged()        # the staged copy must not see this step
        optimizer.step()
        if step % save_every == 0:
            checkpointer.save(step, model, optimizer, extra={"policy_version": step})
    checkpointer.close()

    extra = load(latest(run_dir / "checkpoints"), model, optimizer)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from looprl.train.checkpoint import (
    MANIFEST,
    MANIFEST_HASH,
    CheckpointError,
    capture_rng_state,
    check_keep,
    clean_leftovers,
    fsync_dir,
    prune_checkpoints,
    publish_folder,
    restore_rng_state,
    step_folders,
)

FORMAT = "dcp-1"
DCP_METADATA = ".metadata"

_CHUNK = 1 << 20


def rng_file(rank: int) -> str:
    """The name of rank ``rank``'s RNG file inside a sharded checkpoint."""
    return f"rng_rank_{rank:05d}.pt"


@dataclass
class _Pending:
    step: int
    tmp: Path
    staged: Any  # concurrent.futures.Future: the state is in host memory
    thread: threading.Thread


# ------------------------------------------------------------------------ files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: Path, write: Callable[[Any], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_manifest(tmp: Path, step: int, world: int, extra: dict) -> None:
    """Lists every file of ``tmp`` with its size and SHA-256, then writes the manifest and, last, its hash."""
    missing = [name for name in [DCP_METADATA, *map(rng_file, range(world))] if not (tmp / name).is_file()]
    if missing:
        raise CheckpointError(f"{tmp} lacks {missing} after every rank's write finished")
    files = {p.relative_to(tmp).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
             for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"format": FORMAT, "step": step, "world_size": world,
                "created": datetime.now(timezone.utc).isoformat(), "files": files, "extra": extra}
    raw = json.dumps(manifest, indent=2).encode()
    _write_synced(tmp / MANIFEST, lambda f: f.write(raw))
    _write_synced(tmp / MANIFEST_HASH, lambda f: f.write(hashlib.sha256(raw).hexdigest().encode() + b"\n"))
    fsync_dir(tmp)


def verify(path: str | Path) -> dict:
    """Checks a sharded checkpoint's manifest and every file's size and SHA-256.

    Args:
        path: A ``step_*`` directory written by :class:`ShardedCheckpointer`.

    Returns:
        The manifest.

    Raises:
        CheckpointError: One line naming the directory and what is wrong: missing,
            incomplete (no manifest or no manifest checksum), another format, or a
            file missing, of the wrong size or corrupt.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; expected a sharded checkpoint directory step_* (with {MANIFEST})")
    if not (path / MANIFEST).is_file() or not (path / MANIFEST_HASH).is_file():
        raise CheckpointError(f"{path} is incomplete: no {MANIFEST} or {MANIFEST_HASH} (both are written last; "
                              "an interrupted save leaves .tmp-step_*-PID)")
    raw = (path / MANIFEST).read_bytes()
    if hashlib.sha256(raw).hexdigest() != (path / MANIFEST_HASH).read_text().strip():
        raise CheckpointError(f"{path / MANIFEST} does not match {MANIFEST_HASH}: edited or corrupted")
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}; expected {FORMAT!r} (a sharded "
                              "checkpoint); a format-1 one loads with CheckpointManager.load")
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing; the manifest lists it")
        if file.stat().st_size != expected["bytes"]:
            raise CheckpointError(f"{path}: {name} has {file.stat().st_size} bytes; the manifest expects {expected['bytes']}")
        if (sha256 := _sha256(file)) != expected["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupt: sha256 {sha256}, the manifest expects {expected['sha256']}")
    return manifest


def latest(directory: str | Path) -> Path | None:
    """The newest ``step_*`` checkpoint under ``directory`` that verifies, or None.

    A newer one that fails verification is skipped with a warning naming it.
    """
    for path in reversed(step_folders(Path(directory))):
        try:
            verify(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=2)
            continue
        return path
    return None


def _one_line(exc: BaseException) -> str:
    """``Type: first line``; for DCP's multi-rank ``CheckpointException``, the first failed rank's error."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (cause, _) = min(exc.failures.items(), key=lambda item: item[0])
        return f"rank {rank}: {_one_line(cause)}"
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, restore_rng: bool = True) -> dict:
    """Loads a sharded checkpoint into a model and optimizer of any world size.

    Call it on every rank (it makes collectives on the default group, if there is
    one), with the model already sharded as it will train (or plain, in one process).

    Args:
        path: A ``step_*`` directory; verified (every file hashed) first.
        model: The model, plain or sharded with ``fully_shard``.
        optimizer: Its optimizer (built over the sharded parameters).
        restore_rng: Restore this rank's RNG states, when the world size is the one
            saved; with another world size the saved streams cannot continue and a
            warning says they are not restored.

    Returns:
        The ``extra`` given to :meth:`ShardedCheckpointer.save`.

    Raises:
        CheckpointError: If the checkpoint is missing, partial or corrupt, or does not
            fit the model or optimizer.
    """
    path = Path(path)
    manifest = verify(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    try:
        with warnings.catch_warnings():  # DCP warns on every load without a process group, meant or not
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=not dist.is_initialized())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        raise CheckpointError(f"could not load {path} into the model and optimizer: {_one_line(exc)}") from exc
    if restore_rng:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if world == manifest["world_size"]:
            restore_rng_state(torch.load(path / rng_file(rank), weights_only=True))
        else:
            warnings.warn(f"{path} was saved by {manifest['world_size']} ranks, loaded by {world}: "
                          "the RNG states are not restored", stacklevel=2)
    return manifest["extra"]


def to_full_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a sharded checkpoint as plain, unsharded CPU tensors (for export), in one process.

    Goes through ``dcp_to_torch_save`` into a temporary file (a full copy on disk, briefly).

    Returns:
        ``(model_state, optimizer_state)``: the model's full state dict, and the optimizer
        state as ``get_state_dict`` gives it (``state`` and ``param_groups`` keyed by
        parameter names), which ``set_state_dict`` accepts.

    Raises:
        CheckpointError: If the checkpoint is missing, partial or corrupt.
    """
    path = Path(path)
    verify(path)
    with tempfile.TemporaryDirectory(prefix="looprl-dcp-") as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        state = torch.load(Path(tmp) / "full.pt", weights_only=True)
    return state["model"], state["optim"]


# ------------------------------------------------------------------------ saving


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """``get_state_dict(model, optimizer)``, leaving a fresh optimizer as if fresh.

    On an optimizer that has not stepped, ``get_state_dict`` first creates its state with
    a zero-gradient step at lr 0, which sets Adam's ``step`` to 1: the first real update
    would then take the bias correction of the second. Its ``step`` is put back to 0
    (its moments are zeros already), which Adam then treats as it does a new state.
    """
    fresh = not optimizer.state
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if fresh:
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0
        model_state, optimizer_state = get_state_dict(model, optimizer)  # the state exists now: taken as it is
    return model_state, optimizer_state


class ShardedCheckpointer:
    """Saves sharded checkpoints in the background, from every rank (see the module docstring).

    Construct it on every rank at the same point (it creates a gloo process group for
    its collectives), or in one process without a process group. Call its methods from
    the training loop's thread, on every rank, in the same order.

    Args:
        directory: Where the ``step_*`` checkpoints go (shared by the ranks); created if missing.
        keep_last: How many complete checkpoints to keep (the newest); None keeps all.
        keep_every: Also keep, forever, every checkpoint whose step is a multiple of this
            (None: only the newest `keep_last`); the pruning is `CheckpointManager`'s.

    Raises:
        ValueError: If ``keep_last`` or ``keep_every`` is not None or an int >= 1.
    """

    def __init__(self, directory: str | Path, keep_last: int | None = None, keep_every: int | None = None):
        check_keep(keep_last, keep_every)
        self.directory = Path(directory)
        self.keep_last, self.keep_every = keep_last, keep_every
        distributed = dist.is_initialized()
        self._rank, self._world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        self._group = dist.new_group(backend="gloo") if distributed else None
        if self._rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            clean_leftovers(self.directory)
        # Reused across saves: it keeps its host buffers, and copies into them again at
        # the next save, which is why a save first waits for the previous one.
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                                    use_async_staging=True, use_non_blocking_copy=False))
        self._pending: _Pending | None = None
        self._failure: tuple[int, Path, BaseException] | None = None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict) -> None:
        """Starts saving ``model`` and ``optimizer`` as ``step_{step:08d}``; returns once the save has begun.

        Waits for the previous save first. The state is then copied to host memory in
        the background: call :meth:`wait_staged` before changing the parameters or
        the optimizer state (the next ``optimizer.step()``).

        Args:
            step: The training step, an int >= 0.
            model: The (sharded) model.
            optimizer: Its optimizer.
            extra: JSON data for the manifest (policy version, sampler state, ...).

        Raises:
            ValueError: If ``step`` is not an int >= 0.
            TypeError: If ``extra`` is not JSON.
            CheckpointError: If the previous save failed, or this one could not start.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        try:
            extra = json.loads(json.dumps(extra))  # a deep copy: later edits by the caller don't leak in
        except (TypeError, ValueError) as exc:
            raise TypeError(f"extra must be JSON-serialisable (dicts, lists, strings, numbers, None): {exc}") from exc
        self.wait()
        tmp = self._make_tmp(step)
        _write_synced(tmp / rng_file(self._rank), lambda f: torch.save(capture_rng_state(), f))
        model_state, optimizer_state = _state_dicts(model, optimizer)
        response = dcp.async_save(
            {"model": model_state, "optim": optimizer_state},
            storage_writer=dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True),
            process_group=self._group, async_checkpointer_type=AsyncCheckpointerType.THREAD,
            async_stager=self._stager, no_dist=self._group is None)
        thread = threading.Thread(target=self._finish, args=(step, tmp, response.upload_completion, extra),
                                  name=f"looprl-sharded-checkpoint-{step}", daemon=False)
        self._pending = _Pending(step, tmp, response.staging_completion, thread)
        thread.start()

    def _make_tmp(self, step: int) -> Path:
        """Rank 0 creates the folder ``.tmp-step_*-PID`` afresh and tells the other ranks its name."""
        message: list[Any] = [None]
        if self._rank == 0:
            tmp = self.directory / f".tmp-step_{step:08d}-{os.getpid()}"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                message = [tmp.name]
            except OSError as exc:
                message = [OSError(exc.errno, exc.strerror, str(tmp))]
        if self._group is not None:
            dist.broadcast_object_list(message, src=0, group=self._group)
        if isinstance(message[0], OSError):
            raise CheckpointError(f"saving sharded checkpoint step {step} in {self.directory} failed: {message[0]}")
        return self.directory / message[0]

    def _finish(self, step: int, tmp: Path, upload, extra: dict) -> None:
        """Background: waits for DCP's write on this rank; rank 0 then writes the manifest and publishes."""
        try:
            upload.result()  # on rank 0 this returns after every rank's write (DCP gathers their results)
            if self._rank == 0:
                _write_manifest(tmp, step, self._world, extra)
                publish_folder(tmp, self.directory / f"step_{step:08d}")
                prune_checkpoints(self.directory, self.keep_last, self.keep_every)
        except BaseException as exc:  # raised by poll() / wait()
            self._failure = (step, tmp, exc)
            if self._rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            step, tmp, exc = failure
            raise CheckpointError(f"saving sharded checkpoint step {step} in {tmp} failed: {_one_line(exc)}; "
                                  "the checkpoints before it are intact") from exc

    def wait_staged(self) -> None:
        """Returns once the pending save's state is in host memory (at once if none is pending).

        Raises:
            CheckpointError: Naming the step, if staging failed.
        """
        if self._pending is not None:
            try:
                self._pending.staged.result()
            except (Exception, CheckpointException) as exc:
                raise CheckpointError(f"staging sharded checkpoint step {self._pending.step} in {self._pending.tmp} "
                                      f"failed: {_one_line(exc)}") from exc

    def poll(self) -> None:
        """Raises if the pending save has finished and failed; returns at once otherwise.

        Raises:
            CheckpointError: One line naming the step and the folder.
        """
        if self._pending is not None and not self._pending.thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Blocks until the pending save is written on this rank and, on rank 0, published.

        Other ranks return once their own files are written; rank 0's failure to write
        the manifest is raised on rank 0 only.

        Raises:
            CheckpointError: Naming the step and the folder, if the pending save failed.
        """
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.thread.join()
        self._raise_failure()

    def latest(self) -> Path | None:
        """The newest complete, verified checkpoint in :attr:`directory` (see :func:`latest`)."""
        return latest(self.directory)

    def close(self) -> None:
        """Waits for the pending save, then frees the staging buffers and thread."""
        try:
            self.wait()
        finally:
            self._stager.close()
