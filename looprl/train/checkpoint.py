"""Crash-safe, asynchronous checkpoints.

A checkpoint is a directory ``step_{step:08d}`` holding

- ``model.safetensors``: the model's state dict;
- ``optimizer.pt``: the optimizer's state dict, if given (readable with
  ``torch.load(weights_only=True)``);
- ``rng.pt``: the random number generator states (:func:`capture_rng_state`);
- ``manifest.json``: step, creation time, size and SHA-256 of every file, and the
  caller's JSON ``extra`` (policy version, config, sampler state ...);
- ``manifest.sha256``, written last: the SHA-256 of ``manifest.json``, so an edited
  manifest (a hand-changed policy version) is refused like a corrupted file.

It is written under a temporary name (``.tmp-step_{step:08d}-{pid}``), fsynced, and
renamed into place only when complete, so a crash or kill at any moment leaves a
``step_*`` directory either complete or absent, never half-written. Leftovers of a
killed writer are cleaned up when the next :class:`CheckpointManager` starts.

:meth:`CheckpointManager.save` copies the tensors to host memory and returns; the
files are written in a background thread (the same split as
``torch.distributed.checkpoint.async_save``: stage on the caller, write behind).

Typical use::

    manager = CheckpointManager(run_dir / "checkpoints", keep_last=3)
    manager.save(step, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
                 extra={"policy_version": version, "config": config, "sampler": sampler_state})
    ...
    manager.wait()  # before exiting, to surface a failed save

    checkpoint = CheckpointManager.load(find_checkpoint(run_dir))
    model.load_state_dict(checkpoint.model_state)
    restore_rng_state(checkpoint.rng_state)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

FORMAT = 1
MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"

_STEP_DIR = re.compile(r"step_(?P<step>\d+)")
# `.tmp-step_..-PID` (being written), `.tmp-delete-step_..-PID` (being pruned),
# `.old-step_..-PID` (a checkpoint moved aside while the same step is re-saved).
_LEFTOVER = re.compile(r"\.(?P<kind>tmp|old)-(?P<name>.+)-(?P<pid>\d+)")
_CHUNK = 1 << 20
_SCALARS = (type(None), bool, int, float, str)
_EXPECTED_LOCATION = (
    "expected a checkpoint directory (with manifest.json), a directory of step_* "
    "checkpoints, or a run directory containing checkpoints/"
)

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found, verified or loaded."""


@dataclass
class Checkpoint:
    """A checkpoint loaded into CPU memory.

    Attributes:
        path: The checkpoint directory.
        step: The training step it was saved at.
        model_state: The model's state dict, from ``model.safetensors``. Tensors that
            shared storage when saved (tied weights) come back as separate tensors
            with equal values; ``load_state_dict`` re-ties them.
        optimizer_state: The optimizer's state dict, or None if none was saved.
        extra: The JSON data given to :meth:`CheckpointManager.save`.
        rng_state: The RNG states at save time, for :func:`restore_rng_state`.
    """

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None
    extra: dict
    rng_state: dict


@dataclass
class _Snapshot:
    """Everything one save writes, already detached from the training loop."""

    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict | None
    extra: dict
    rng: dict = field(repr=False)


# ---------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Captures the global RNG states of Python, NumPy, torch CPU and CUDA.

    CUDA states are captured only once CUDA is initialised: before that no CUDA
    random number has been drawn, and touching CUDA would create a context.

    Returns:
        A dict of tensors, numbers, lists and tuples (safe for ``torch.save`` and
        ``torch.load(weights_only=True)``) for :func:`restore_rng_state`.
    """
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": numpy_state["state"]["key"].tolist(),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restores the global RNG states captured by :func:`capture_rng_state`.

    Args:
        state: The dict returned by :func:`capture_rng_state` (or ``Checkpoint.rng_state``).

    Raises:
        CheckpointError: If ``state`` lacks one of the python, numpy or torch states.
    """
    missing = sorted({"python", "numpy", "torch"} - state.keys())
    if missing:
        raise CheckpointError(
            f"RNG state is missing {missing} (has {sorted(state)}); "
            "expected the dict returned by capture_rng_state()"
        )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": np.asarray(numpy_state["key"], dtype=np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        _restore_cuda_rng(state["cuda"])


def _restore_cuda_rng(states: list[torch.Tensor]) -> None:
    if not torch.cuda.is_available():
        warnings.warn("the checkpoint holds CUDA RNG states but CUDA is not available; not restoring them")
        return
    torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])


# ----------------------------------------------------------------- host snapshot


def _to_host(obj: Any, memo: dict, where: str) -> Any:
    """Deep-copies ``obj``, every tensor to a fresh contiguous CPU tensor.

    A tensor reached twice (tied weights) is copied once; the writer un-shares it.
    """
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device, obj.storage_offset(),
               tuple(obj.shape), obj.stride(), obj.dtype)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        return memo[key]
    if isinstance(obj, dict):
        return {k: _to_host(v, memo, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_to_host(v, memo, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, _SCALARS):
        return obj
    raise TypeError(
        f"{where} has type {type(obj).__name__}; expected tensors, None, bools, numbers, "
        "strings, and lists, tuples or dicts of them (what torch.load(weights_only=True) reads)"
    )


def _snapshot(step: int, model_state: Any, optimizer_state: Any, extra: Any) -> _Snapshot:
    if not isinstance(model_state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model_state.items()
    ):
        raise TypeError("model_state must be a dict of str to torch.Tensor (a model's state_dict())")
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    try:
        extra = json.loads(json.dumps(extra))  # also a deep copy, so later edits don't leak in
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra must be JSON-serialisable (dicts, lists, strings, numbers, None): {exc}") from exc
    memo: dict = {}
    optimizer = None if optimizer_state is None else _to_host(optimizer_state, memo, "optimizer_state")
    return _Snapshot(step, _to_host(model_state, memo, "model_state"), optimizer, extra, capture_rng_state())


# ------------------------------------------------------------------------ writing


def fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Path], None]) -> dict:
    """Writes a file with ``write(path)``, fsyncs it, and returns its size and SHA-256.

    Raises:
        OSError: Naming ``path``, if writing or syncing it failed (e.g. a full disk).
    """
    try:
        write(path)
        with open(path, "rb") as f:
            sha256 = _sha256(f)
            os.fsync(f.fileno())
    except OSError as exc:
        if exc.filename or not exc.errno:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    return {"sha256": sha256, "bytes": path.stat().st_size}


def _sha256(file: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := file.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clones repeated tensors: safetensors refuses to save shared storage."""
    seen: set[int] = set()
    result = {}
    for name, tensor in state.items():
        result[name] = tensor.clone() if id(tensor) in seen else tensor
        seen.add(id(tensor))
    return result


def _write_files(tmp: Path, snapshot: _Snapshot) -> dict:
    # Written through Python file objects, so a failed write (a full disk) raises the
    # OSError that says so, instead of a serializer's own message.
    files = {MODEL_FILE: _write_durably(tmp / MODEL_FILE, lambda p: _write_bytes(
        p, save_safetensors(_unshared(snapshot.model), metadata={"format": "pt"})))}
    if snapshot.optimizer is not None:
        files[OPTIMIZER_FILE] = _write_durably(tmp / OPTIMIZER_FILE, lambda p: _torch_save(snapshot.optimizer, p))
    files[RNG_FILE] = _write_durably(tmp / RNG_FILE, lambda p: _torch_save(snapshot.rng, p))
    return files


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def _write_manifest(tmp: Path, snapshot: _Snapshot, files: dict) -> None:
    manifest = {
        "format": FORMAT,
        "step": snapshot.step,
        "created": datetime.now(timezone.utc).isoformat(),
        "files": files,
        "extra": snapshot.extra,
    }
    digest = _write_durably(tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2)))["sha256"]
    _write_durably(tmp / MANIFEST_HASH, lambda p: p.write_text(digest + "\n"))


def publish_folder(tmp: Path, final: Path) -> None:
    """Renames the complete ``tmp`` to ``final``, moving an existing ``final`` aside first.

    A kill between the two renames leaves ``.old-step_*-PID``, which the next
    manager renames back (see :func:`clean_leftovers`), so nothing saved is lost.
    """
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    if final.exists():
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old.exists():
            os.rename(old, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint(directory: Path, snapshot: _Snapshot) -> Path:
    final = directory / _step_name(snapshot.step)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_manifest(tmp, snapshot, _write_files(tmp, snapshot))  # the manifest goes last
        fsync_dir(tmp)
        publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(directory: Path, keep_last: int | None, keep_every: int | None = None) -> None:
    """Deletes all but the newest `keep_last` complete checkpoints (None: keeps all), and
    keeps, in addition, every one whose step is a multiple of `keep_every` (None: none)."""
    if keep_last is None:
        return
    for path in step_folders(directory)[:-keep_last]:
        if keep_every is not None and int(_STEP_DIR.fullmatch(path.name)["step"]) % keep_every == 0:
            continue
        doomed = path.with_name(f".tmp-delete-{path.name}-{os.getpid()}")
        try:
            os.rename(path, doomed)  # atomic: a kill mid-delete leaves a leftover, not a broken step_*
        except OSError as exc:  # the new checkpoint is saved; an old one staying is no failure
            warnings.warn(f"could not remove old checkpoint {path} (keep_last={keep_last}): {exc}")
            continue
        shutil.rmtree(doomed, ignore_errors=True)


def check_keep(keep_last: int | None, keep_every: int | None) -> None:
    """Fails unless `keep_last` and `keep_every` are each None or an int >= 1."""
    for name, value in (("keep_last", keep_last), ("keep_every", keep_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")


# ------------------------------------------------------------------------ reading


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_folders(directory: Path) -> list[Path]:
    """Returns the ``step_*`` directories that have a manifest, oldest step first."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP_DIR.fullmatch(entry.name)
        if match and (entry / MANIFEST).is_file():
            found.append((int(match["step"]), entry))
    return [path for _, path in sorted(found)]


def _latest_verified(directory: Path) -> Path | None:
    for path in reversed(step_folders(directory)):
        try:
            CheckpointManager.verify(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=3)
            continue
        return path
    return None


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a looprl checkpoint (no {MANIFEST})")
    try:
        raw = manifest_path.read_bytes()
        manifest = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path} is unreadable ({exc}); expected a JSON manifest") from exc
    hash_path = path / MANIFEST_HASH
    try:
        expected = hash_path.read_text().strip()
    except OSError:
        raise CheckpointError(f"{path} has no readable {MANIFEST_HASH} (the manifest's checksum, written last): "
                              "incomplete, or written by a looprl older than this one") from None
    if hashlib.sha256(raw).hexdigest() != expected:
        raise CheckpointError(f"{manifest_path} does not match its checksum in {MANIFEST_HASH}: the manifest was "
                              "edited or corrupted")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CheckpointError(f"{manifest_path} has format {found!r}; expected format {FORMAT}")
    missing = sorted({"step", "files", "extra"} - manifest.keys())
    if missing or MODEL_FILE not in manifest["files"] or RNG_FILE not in manifest["files"]:
        raise CheckpointError(
            f"{manifest_path} is incomplete (missing keys {missing}, files {sorted(manifest.get('files', {}))}); "
            f"expected step, files (with {MODEL_FILE} and {RNG_FILE}) and extra"
        )
    return manifest


def _check_file(path: Path, name: str, expected: dict) -> None:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{path}: {name} is missing; the manifest lists it")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{path}: {name} has {size} bytes; the manifest expects {expected['bytes']}")
    with open(file, "rb") as f:
        sha256 = _sha256(f)
    if sha256 != expected["sha256"]:
        raise CheckpointError(f"{path}: {name} is corrupt: sha256 {sha256}, the manifest expects {expected['sha256']}")


# ------------------------------------------------------------------------ manager


def _describe_failure(exc: BaseException) -> str:
    """The OS error behind a failed write when there is one (`[Errno 28] No space left on
    device: path`), else the exception itself."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError):
            where = f": {seen.filename}" if seen.filename else ""
            return f"{seen.strerror or seen}{where} (errno {seen.errno})" if seen.errno else f"{seen}{where}"
        seen = seen.__cause__ or seen.__context__
    return repr(exc)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_leftovers(directory: Path) -> None:
    """Removes what killed writers left behind; restores a checkpoint moved aside."""
    for entry in directory.iterdir():
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or _pid_alive(int(match["pid"])):
            continue
        original = directory / match["name"]
        if match["kind"] == "old" and not original.exists():
            os.rename(entry, original)  # its replacement never landed: it is still the saved one
        else:
            shutil.rmtree(entry, ignore_errors=True)


class CheckpointManager:
    """Saves checkpoints under one directory, in the background, and finds them again.

    Not thread-safe: call :meth:`save` and :meth:`wait` from one thread (the training loop).

    Args:
        directory: Where the ``step_*`` checkpoints go; created if missing.
        keep_last: How many complete checkpoints to keep (the newest); None keeps all.
        keep_every: Also keep, forever, every checkpoint whose step is a multiple of this
            (None: only the newest `keep_last`).

    Raises:
        ValueError: If ``keep_last`` or ``keep_every`` is not None or a positive int.
    """

    def __init__(self, directory: str | Path, keep_last: int | None = 3, keep_every: int | None = None):
        check_keep(keep_last, keep_every)
        self.directory = Path(directory)
        self.keep_last, self.keep_every = keep_last, keep_every
        self.directory.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.directory)
        self._thread: threading.Thread | None = None
        self._failure: tuple[int, BaseException] | None = None

    def save(self, step: int, *, model_state: dict[str, torch.Tensor], optimizer_state: dict | None = None,
             extra: dict | None = None, blocking: bool = False) -> Path:
        """Saves a checkpoint; returns once everything is copied to host memory.

        Waits for the previous save first (so at most one snapshot sits in host
        memory), then captures the RNG states and copies every tensor to CPU, so
        in-place updates after this returns do not reach the checkpoint.

        Args:
            step: The training step, an int >= 0; names the directory ``step_{step:08d}``.
                Saving a step that exists replaces it once the new one is complete.
            model_state: The model's state dict.
            optimizer_state: The optimizer's state dict: tensors, numbers, strings,
                None, and lists, tuples or dicts of them.
            extra: JSON data stored in the manifest (tuples become lists, keys strings).
            blocking: Write before returning instead of in a background thread.

        Returns:
            The checkpoint's final path; with ``blocking=False`` it is complete only
            after :meth:`wait`.

        Raises:
            ValueError: If ``step`` is not an int >= 0.
            TypeError: If a state holds an unsupported value or ``extra`` is not JSON.
            CheckpointError: If this (blocking) or the previous (background) save failed.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.wait()
        snapshot = _snapshot(step, model_state, optimizer_state, {} if extra is None else extra)
        if blocking:
            self._write(snapshot)
            self._raise_failure()
        else:
            # Non-daemon: an exiting interpreter waits for the write to finish.
            self._thread = threading.Thread(target=self._write_in_background, args=(snapshot,),
                                            name=f"looprl-checkpoint-{step}", daemon=False)
            self._thread.start()
        return self.directory / _step_name(step)

    def _write(self, snapshot: _Snapshot) -> None:
        try:
            _write_checkpoint(self.directory, snapshot)
        except BaseException as exc:  # raised by the caller, or by wait() for a thread
            self._failure = (snapshot.step, exc)
            return
        prune_checkpoints(self.directory, self.keep_last, self.keep_every)

    def _write_in_background(self, snapshot: _Snapshot) -> None:
        self._write(snapshot)
        if self._failure is not None:  # also logged, in case nobody calls wait()
            step, exc = self._failure
            logger.error("saving checkpoint step %d in %s failed: %r", step, self.directory, exc)

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            step, exc = failure
            raise CheckpointError(f"saving checkpoint step {step} in {self.directory} failed: {_describe_failure(exc)}; "
                                  "the checkpoints before it are intact") from exc

    def poll(self) -> None:
        """Raises now if the background save has finished and failed (call it every step,
        so a full disk is reported at the next step, not at the next save).

        Raises:
            CheckpointError: Naming the step, the folder and the OS error.
        """
        if self._thread is not None and not self._thread.is_alive():
            self._thread.join()
            self._thread = None
            self._raise_failure()

    def wait(self) -> None:
        """Blocks until the pending save is written.

        Raises:
            CheckpointError: Naming the step, if the pending save failed; no
                ``step_*`` directory was created for it.
        """
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        self._raise_failure()

    def latest(self) -> Path | None:
        """Returns the newest checkpoint that verifies, or None.

        A newer one that fails verification is skipped with a warning naming it.
        """
        return _latest_verified(self.directory)

    def list(self) -> list[Path]:
        """Returns the complete checkpoints (with a manifest), oldest first, unverified."""
        return step_folders(self.directory)

    @staticmethod
    def verify(path: str | Path) -> dict:
        """Checks every file of a checkpoint against its manifest.

        Args:
            path: A checkpoint directory.

        Returns:
            The manifest.

        Raises:
            CheckpointError: Naming the directory and what is wrong: no manifest, or a
                file that is missing, has the wrong size or the wrong checksum.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        for name, expected in manifest["files"].items():
            _check_file(path, name, expected)
        return manifest

    @staticmethod
    def load(path: str | Path, *, verify: bool = True) -> Checkpoint:
        """Loads a checkpoint into CPU memory.

        Args:
            path: A checkpoint directory.
            verify: Check sizes and checksums first (reads every file twice).

        Returns:
            The loaded :class:`Checkpoint`.

        Raises:
            CheckpointError: If the checkpoint fails verification or cannot be read.
        """
        path = Path(path)
        manifest = CheckpointManager.verify(path) if verify else _read_manifest(path)
        try:
            optimizer_state = None
            if OPTIMIZER_FILE in manifest["files"]:
                optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
            return Checkpoint(
                path=path,
                step=manifest["step"],
                model_state=load_file(path / MODEL_FILE),
                optimizer_state=optimizer_state,
                extra=manifest["extra"],
                rng_state=torch.load(path / RNG_FILE, weights_only=True),
            )
        except Exception as exc:
            raise CheckpointError(f"could not load checkpoint {path}: {exc}") from exc


class NoCheckpoints:
    """The checkpoints of a rank that writes none: with DeepSpeed every rank gathers the
    state (collectives) and rank 0's `CheckpointManager` writes it."""

    def save(self, step: int, **kwargs) -> None:
        pass

    def poll(self) -> None:
        pass

    def wait(self) -> None:
        pass


def find_checkpoint(path: str | Path) -> Path:
    """Finds the checkpoint to resume from, reading only (no clean-up).

    Args:
        path: A checkpoint directory, a directory of ``step_*`` checkpoints, or a run
            directory containing ``checkpoints/``.

    Returns:
        ``path`` itself if it is a checkpoint (verified), else the newest checkpoint
        that verifies.

    Raises:
        CheckpointError: Naming ``path`` and what was expected, if none is found.
    """
    path = Path(path)
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise CheckpointError(f"{path} {state}; {_EXPECTED_LOCATION}")
    if (path / MANIFEST).is_file():
        CheckpointManager.verify(path)
        return path
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = _latest_verified(directory)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint in {path}; {_EXPECTED_LOCATION}")
    return latest
