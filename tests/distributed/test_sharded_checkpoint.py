"""Sharded async checkpoints (looprl.train.sharded_checkpoint) across world sizes and kill -9.

Two torchrun launches (2 gloo processes, FSDP2 per layer then the root, AdamW):
- round trips: 2 ranks -> 1 process and 1 process -> 2 ranks load the weights and the
  optimizer state exactly (a copy, tolerance 0), and the next step's loss matches the
  other world size's within 1e-6 (a different reduction order);
- 20 kill trials: writers SIGKILLed at random moments while saving every step (most
  trials leave a half-written `.tmp-step_*`); every time, the newest checkpoint is the
  last one published, every `step_*` verifies, and it loads.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from looprl.train.checkpoint import MANIFEST_HASH, CheckpointError, CheckpointManager
from looprl.train.sharded_checkpoint import ShardedCheckpointer, latest, load, to_full_state, verify
from tests.distributed import workers

WORKERS = Path(workers.__file__)
LOSS_TOLERANCE = 1e-6
TRIALS = 20


def torchrun(log: Path, *args: str) -> subprocess.Popen:
    """Starts `torchrun ... workers.py *args` in its own session, its output to `log`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKERS.parents[2])}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(WORKERS), *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def assert_same(actual, expected, where: str = "state") -> None:
    """Nested dicts/lists of tensors and scalars are equal, bit for bit."""
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(torch.as_tensor(actual), expected), where
    else:
        assert actual == expected, where


def one_process_state(model, optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {k: v.clone() for k, v in model_state.items()}, optimizer_state


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    """The 1-process run (saved at step 3), then one torchrun launch: 1 -> 2 and 2 -> 1."""
    directory = tmp_path_factory.mktemp("roundtrip")
    model = workers.build_model()
    optimizer = workers.build_optimizer(model)
    for step in range(1, workers.SAVE_STEP + 1):
        workers.train_step(model, optimizer, step)
    checkpointer = ShardedCheckpointer(directory / "one")
    checkpointer.save(workers.SAVE_STEP, model, optimizer, extra={"step": workers.SAVE_STEP})
    checkpointer.wait_staged()
    checkpointer.close()
    one = {"state": one_process_state(model, optimizer),
           "next_loss": workers.forward_backward(model, workers.SAVE_STEP + 1).item()}
    proc = torchrun(directory / "torchrun.log", "roundtrip", str(directory))
    assert proc.wait(timeout=300) == 0, tail(directory / "torchrun.log")
    return directory, one


def test_one_process_to_two_ranks(roundtrip):
    directory, one = roundtrip
    loaded = torch.load(directory / "one_in_two.pt", weights_only=True)
    assert_same(loaded["model"], one["state"][0], "model")
    assert_same(loaded["optim"], one["state"][1], "optim")
    print(f"1 -> 2: next-step loss |delta| {abs(loaded['next_loss'] - one['next_loss']):.2e}")
    assert abs(loaded["next_loss"] - one["next_loss"]) <= LOSS_TOLERANCE


def test_two_ranks_to_one_process(roundtrip):
    directory, _ = roundtrip
    reference = torch.load(directory / "two_reference.pt", weights_only=True)
    path = latest(directory / "two")
    assert path is not None and path.name == f"step_{workers.SAVE_STEP:08d}"
    model = workers.build_model()
    optimizer = workers.build_optimizer(model)
    with pytest.warns(UserWarning, match="saved by 2 ranks, loaded by 1: the RNG states are not restored"):
        extra = load(path, model, optimizer)
    assert extra == {"step": workers.SAVE_STEP}
    model_state, optimizer_state = one_process_state(model, optimizer)
    assert_same(model_state, reference["model"], "model")
    assert_same(optimizer_state, reference["optim"], "optim")
    next_loss = workers.forward_backward(model, workers.SAVE_STEP + 1).item()
    print(f"2 -> 1: next-step loss |delta| {abs(next_loss - reference['next_loss']):.2e}")
    assert abs(next_loss - reference["next_loss"]) <= LOSS_TOLERANCE
    # Exported as plain tensors: the same full state, loadable without DCP.
    full_model, full_optimizer = to_full_state(path)
    assert_same(full_model, reference["model"], "exported model")
    assert_same(full_optimizer, reference["optim"], "exported optim")
    plain = workers.build_model()
    plain.load_state_dict(full_model)
    assert_same(plain.state_dict(), reference["model"], "plain load_state_dict")


def test_trained_two_ranks_match_one_process(roundtrip):
    """Not a checkpoint property, the context for the tolerances: FSDP2 on 2 ranks trains
    like one process to float32 rounding."""
    directory, one = roundtrip
    reference = torch.load(directory / "two_reference.pt", weights_only=True)
    worst = max((reference["model"][name] - tensor).abs().max().item() for name, tensor in one["state"][0].items())
    print(f"weights after {workers.SAVE_STEP} steps, 2 ranks vs 1 process: max |delta| {worst:.2e}")
    assert worst <= 1e-5


# ------------------------------------------------------------------ errors, in one process


@pytest.fixture
def saved(tmp_path):
    model = workers.build_model()
    optimizer = workers.build_optimizer(model)
    workers.train_step(model, optimizer, 1)
    checkpointer = ShardedCheckpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        checkpointer.save(step, model, optimizer, extra={"step": step})
        checkpointer.wait_staged()
        workers.train_step(model, optimizer, step + 1)
    checkpointer.close()
    return tmp_path


def test_keep_last_and_latest(saved):
    assert sorted(p.name for p in saved.iterdir()) == ["step_00000002", "step_00000003"]
    assert latest(saved) == saved / "step_00000003"
    # The one-process manager's rule skips them, by name, instead of misreading them.
    with pytest.warns(UserWarning, match="step_00000003: .*has format 'dcp-1'; expected format 1"):
        assert CheckpointManager(saved).latest() is None


def test_keep_every_keeps_those_steps_beside_the_newest(tmp_path):
    model = workers.build_model()
    optimizer = workers.build_optimizer(model)
    checkpointer = ShardedCheckpointer(tmp_path, keep_last=1, keep_every=2)
    for step in (1, 2, 3, 4, 5):
        checkpointer.save(step, model, optimizer, extra={"step": step})
        checkpointer.wait_staged()
    checkpointer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004", "step_00000005"]


def test_load_restores_rng_in_the_same_world_size(saved):
    torch.manual_seed(123)
    model = workers.build_model()
    load(saved / "step_00000003", model, workers.build_optimizer(model))
    after_load = torch.rand(3)
    load(saved / "step_00000003", model, workers.build_optimizer(model))
    assert torch.equal(torch.rand(3), after_load)


def test_missing_partial_and_corrupt_checkpoints_fail_in_one_line(saved):
    model = workers.build_model()
    optimizer = workers.build_optimizer(model)
    with pytest.raises(CheckpointError, match=r"step_00000009 does not exist; expected a sharded checkpoint") as info:
        load(saved / "step_00000009", model, optimizer)
    assert "\n" not in str(info.value)
    (saved / "step_00000003" / MANIFEST_HASH).unlink()  # what an interrupted save would lack
    with pytest.raises(CheckpointError, match=r"step_00000003 is incomplete: no manifest.json or manifest.sha256"):
        load(saved / "step_00000003", model, optimizer)
    shard = saved / "step_00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"step_00000002: __0_0.distcp is corrupt: sha256 [0-9a-f]+, the manifest"):
        verify(saved / "step_00000002")
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert latest(saved) is None


def test_a_model_that_does_not_fit_fails_in_one_line(saved):
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(CheckpointError, match=r"could not load .*step_00000003 into the model and optimizer: ") as info:
        load(saved / "step_00000003", model, workers.build_optimizer(model))
    assert "\n" not in str(info.value)


def test_a_failed_background_save_raises_at_poll_naming_the_step(tmp_path):
    model = workers.build_model()
    optimizer = workers.build_optimizer(model)
    workers.train_step(model, optimizer, 1)
    checkpointer = ShardedCheckpointer(tmp_path)
    checkpointer.save(1, model, optimizer, extra={})
    checkpointer.wait()
    optimizer.param_groups[0]["schedule"] = lambda step: 1.0  # DCP's writer thread cannot pickle it
    checkpointer.save(2, model, optimizer, extra={})
    with pytest.raises(CheckpointError, match=r"saving sharded checkpoint step 2 in .*\.tmp-step_00000002-\d+ failed: ") as info:
        while True:
            checkpointer.poll()
            time.sleep(0.01)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    checkpointer.close()


# ------------------------------------------------------------------ kill -9


def _await(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"torchrun exited ({proc.returncode}) before {path.name}:\n{tail(log)}"
        trial, rank = path.name.split("_")[1:]
        assert path.name.startswith("reaped_") or not (path.parent / f"reaped_{trial}_{rank}").exists(), \
            f"the writer of trial {trial} rank {rank} exited before {path.name}:\n{tail(log)}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s:\n{tail(log)}"
        time.sleep(0.005)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_after_kill(directory: Path, trial: int) -> dict:
    """What must hold after any kill: every step_* verifies, the newest is the last one
    published (or the one then in flight), and it loads with its weights' fingerprint."""
    checkpoints = directory / "checkpoints"
    steps = sorted(p for p in checkpoints.iterdir() if p.name.startswith("step_")) if checkpoints.is_dir() else []
    for path in steps:
        verify(path)  # raises on a partial one
    published = [int(line) for line in (directory / "published.log").read_text().split()] \
        if (directory / "published.log").exists() else []
    newest = latest(checkpoints)
    if published:
        assert newest is not None, f"trial {trial}: step {published[-1]} was published, latest() found none"
        step = int(newest.name.removeprefix("step_"))
        assert published[-1] <= step <= published[-1] + 1, f"trial {trial}: latest {step}, published {published[-1]}"
    if newest is not None:
        model = workers.build_model(hidden=256)
        with pytest.warns(UserWarning, match="RNG states are not restored"):
            extra = load(newest, model, workers.build_optimizer(model))
        sums = workers.param_sums(model)
        for name, value in extra["sums"].items():
            assert sums[name] == pytest.approx(value, rel=1e-9, abs=1e-9), f"trial {trial}: {newest} {name}"
    return {"newest": newest, "partial": any(p.name.startswith(".tmp-step_") for p in checkpoints.iterdir())
            if checkpoints.is_dir() else False}


def _writer_status(directory: Path, trial: int, rank: int) -> str:
    return (directory / f"reaped_{trial}_{rank}").read_text()


def test_kill_9_during_sharded_async_saves(tmp_path):
    rng = random.Random(0)
    log = tmp_path / "torchrun.log"
    proc = torchrun(log, "crash", str(tmp_path), str(TRIALS))
    results = []
    try:
        for trial in range(TRIALS):
            (tmp_path / f"go_{trial}").touch()
            for rank in (0, 1):
                _await(tmp_path / f"running_{trial}_{rank}", proc, log)
            time.sleep(rng.uniform(0.0, 1.0))
            ranks = [0, 1]
            rng.shuffle(ranks)
            if trial == TRIALS - 1:  # the last: the whole tree, torchrun and its workers' sessions
                os.killpg(proc.pid, signal.SIGKILL)
                for rank in ranks:
                    os.killpg(int((tmp_path / f"supervisor_{rank}").read_text()), signal.SIGKILL)
                proc.wait(timeout=30)
            else:
                for rank in ranks:
                    _kill(int((tmp_path / f"pid_{trial}_{rank}").read_text()))
                    time.sleep(rng.uniform(0.0, 0.005))
                for rank in (0, 1):
                    _await(tmp_path / f"reaped_{trial}_{rank}", proc, log)
                # The first one killed dies of SIGKILL; the other may first fail on its dead peer.
                assert _writer_status(tmp_path, trial, ranks[0]) == str(int(signal.SIGKILL)), tail(log)
            results.append(check_after_kill(tmp_path, trial))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for rank in (0, 1):
            if (tmp_path / f"supervisor_{rank}").exists():
                try:
                    os.killpg(int((tmp_path / f"supervisor_{rank}").read_text()), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        proc.wait(timeout=30)
    partial = sum(r["partial"] for r in results)
    newest = results[-1]["newest"]
    print(f"{TRIALS} kill trials: {partial} left a partial .tmp-step_* folder, none was picked; "
          f"resumed up to {newest.name if newest else None}")
    assert partial >= TRIALS // 4, f"only {partial} of {TRIALS} kills came mid-write"
    assert newest is not None and int(newest.name.removeprefix("step_")) >= TRIALS, "the trials made no progress"


def test_saving_a_fresh_optimizer_leaves_its_first_step_a_first_step(tmp_path):
    """`get_state_dict` creates a fresh optimizer's state with a step at lr 0 (Adam's `step`
    becomes 1): the save puts it back, so training after a step-0 save is training without one."""
    reference = workers.build_model()
    reference_optimizer = workers.build_optimizer(reference)
    model = workers.build_model()
    optimizer = workers.build_optimizer(model)
    checkpointer = ShardedCheckpointer(tmp_path)
    checkpointer.save(0, model, optimizer, extra={})
    checkpointer.wait_staged()
    for step in (1, 2):
        workers.train_step(reference, reference_optimizer, step)
        workers.train_step(model, optimizer, step)
    checkpointer.close()
    assert_same(dict(model.state_dict()), dict(reference.state_dict()), "model")
    assert [s["step"].item() for s in optimizer.state.values()] == [2.0] * len(reference_optimizer.state)
    fresh = workers.build_model()
    fresh_optimizer = workers.build_optimizer(fresh)
    load(tmp_path / "step_00000000", fresh, fresh_optimizer)
    assert {s["step"].item() for s in fresh_optimizer.state.values()} == {0.0}
