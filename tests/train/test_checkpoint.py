"""Tests for looprl.train.checkpoint: round trips, async safety, crash safety."""

import os
import random
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from looprl.train import checkpoint as ckpt
from looprl.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    find_checkpoint,
    restore_rng_state,
)


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.hidden = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied: two state_dict keys, one storage

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


def train_step(model, optimizer):
    optimizer.zero_grad()
    ids = torch.arange(10)
    nn.functional.cross_entropy(model(ids), ids.flip(0)).backward()
    optimizer.step()


def make_trained(seed=0):
    torch.manual_seed(seed)
    model = TiedModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    train_step(model, optimizer)
    return model, optimizer


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def draw():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_round_trip_restores_model_optimizer_extra_and_rng(tmp_path):
    model, optimizer = make_trained()
    extra = {"policy_version": 3, "config": {"lr": 0.1}, "sampler": {"cursor": [1, 2]}}
    path = CheckpointManager(tmp_path).save(
        5, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(), extra=extra, blocking=True)
    expected_draws = draw()

    loaded = CheckpointManager.load(path)

    assert (loaded.path, loaded.step, loaded.extra) == (tmp_path / "step_00000005", 5, extra)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model_state[name], tensor), name
    fresh_model = TiedModel()
    fresh_model.load_state_dict(loaded.model_state)
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=0.5)
    fresh_optimizer.load_state_dict(loaded.optimizer_state)
    train_step(model, optimizer)
    train_step(fresh_model, fresh_optimizer)
    assert fresh_model.head.weight is fresh_model.embed.weight
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[name], tensor), name
    draw()
    restore_rng_state(loaded.rng_state)
    assert draw() == expected_draws


def test_restore_rng_state_names_missing_parts():
    state = capture_rng_state()
    del state["numpy"]
    with pytest.raises(CheckpointError, match=r"missing \['numpy'\]"):
        restore_rng_state(state)


def test_save_copies_state_before_returning(tmp_path, monkeypatch):
    model, optimizer = make_trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg_before = optimizer.state[model.embed.weight]["exp_avg"].clone()
    release = threading.Event()
    write = ckpt._write_durably
    monkeypatch.setattr(ckpt, "_write_durably", lambda path, w: release.wait(10) and write(path, w))
    manager = CheckpointManager(tmp_path)
    extra = {"metrics": [1.0]}
    try:
        path = manager.save(1, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(), extra=extra)
        assert not path.exists()  # the writer is held: save() returned before writing
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        optimizer.state[model.embed.weight]["exp_avg"].add_(1.0)
        extra["metrics"].append(2.0)
    finally:
        release.set()
    manager.wait()

    loaded = CheckpointManager.load(path)
    for name, tensor in before.items():
        assert torch.equal(loaded.model_state[name], tensor), name
    embed_index = list(model.parameters()).index(model.embed.weight)
    assert torch.equal(loaded.optimizer_state["state"][embed_index]["exp_avg"], exp_avg_before)
    assert loaded.extra == {"metrics": [1.0]}


def test_leftover_tmp_dir_is_never_latest_and_is_cleaned(tmp_path):
    manager = CheckpointManager(tmp_path)
    good = manager.save(1, model_state={"w": torch.ones(2)}, blocking=True)
    stale = tmp_path / f".tmp-step_00000002-{dead_pid()}"
    (stale / "model.safetensors").parent.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".tmp-step_00000003-{os.getpid()}"
    live.mkdir()

    assert manager.latest() == good
    assert manager.list() == [good]
    CheckpointManager(tmp_path)
    assert not stale.exists()
    assert live.exists()  # a live writer's directory is left alone


def test_corrupt_checkpoint_is_rejected_and_latest_falls_back(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=None)
    good = manager.save(1, model_state={"w": torch.ones(64)}, blocking=True)
    bad = manager.save(2, model_state={"w": torch.zeros(64)}, blocking=True)
    model_file = bad / "model.safetensors"
    original = model_file.read_bytes()
    data = bytearray(original)
    data[-8:] = bytes(b ^ 0xFF for b in data[-8:])
    model_file.write_bytes(data)

    with pytest.raises(CheckpointError, match=r"step_00000002: model\.safetensors is corrupt: sha256"):
        CheckpointManager.verify(bad)
    with pytest.warns(UserWarning, match="step_00000002.*model.safetensors"):
        assert manager.latest() == good
    model_file.write_bytes(data[:-1])
    with pytest.raises(CheckpointError, match=r"model\.safetensors has \d+ bytes; the manifest expects"):
        CheckpointManager.verify(bad)
    (bad / "rng.pt").unlink()
    model_file.write_bytes(original)
    with pytest.raises(CheckpointError, match=r"rng\.pt is missing"):
        CheckpointManager.load(bad)
    with pytest.raises(CheckpointError, match=r"not a looprl checkpoint \(no manifest.json\)"):
        CheckpointManager.verify(tmp_path)


def test_writer_failure_surfaces_from_wait_and_leaves_no_checkpoint(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    manager = CheckpointManager(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save_safetensors", disk_full)
        manager.save(7, model_state={"w": torch.ones(2)})
        with pytest.raises(CheckpointError, match="step 7 .*disk full"):
            manager.wait()
        with pytest.raises(CheckpointError, match="step 8 .*disk full"):
            manager.save(8, model_state={"w": torch.ones(2)}, blocking=True)
        manager.save(9, model_state={"w": torch.ones(2)})
        with pytest.raises(CheckpointError, match="step 9 .*disk full"):  # reported by the next save
            manager.save(10, model_state={"w": torch.ones(2)}, blocking=True)
    assert list(tmp_path.iterdir()) == []
    manager.wait()  # each failure is reported once
    assert manager.save(11, model_state={"w": torch.ones(2)}, blocking=True).is_dir()


def test_keep_last_prunes_oldest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        manager.save(step, model_state={"w": torch.full((2,), float(step))})
    manager.wait()

    assert manager.list() == [tmp_path / "step_00000003", tmp_path / "step_00000004"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003", "step_00000004"]
    with pytest.raises(ValueError, match="keep_last must be None or an int >= 1, got 0"):
        CheckpointManager(tmp_path, keep_last=0)


def test_keep_every_keeps_those_steps_forever_beside_the_newest(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, keep_every=3)
    for step in range(0, 9):
        manager.save(step, model_state={"w": torch.full((2,), float(step))})
    manager.wait()
    assert [p.name for p in manager.list()] == [f"step_{s:08d}" for s in (0, 3, 6, 7, 8)]
    with pytest.raises(ValueError, match="keep_every must be None or an int >= 1, got 0"):
        CheckpointManager(tmp_path, keep_every=0)


def test_keep_every_must_be_a_saved_step():
    from looprl.config import load_config

    assert load_config(None, ["train.save_every=5", "train.keep_every=20"]).train.keep_every == 20
    with pytest.raises(ValueError, match=r"Expect train.keep_every to be a multiple of train.save_every \(5\)"):
        load_config(None, ["train.save_every=5", "train.keep_every=12"])


def test_resaving_a_step_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save(3, model_state={"w": torch.zeros(2)}, blocking=True)
    path = manager.save(3, model_state={"w": torch.ones(2)}, blocking=True)

    assert torch.equal(CheckpointManager.load(path).model_state["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]


def test_checkpoint_moved_aside_by_a_killed_resave_is_restored(tmp_path):
    manager = CheckpointManager(tmp_path)
    path = manager.save(5, model_state={"w": torch.ones(2)}, blocking=True)
    path.rename(tmp_path / f".old-step_00000005-{dead_pid()}")

    assert CheckpointManager(tmp_path).latest() == path
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]


def test_bad_inputs_are_rejected_with_the_expected_form(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match=r"optimizer_state\['state'\]\[0\] has type object"):
        manager.save(1, model_state={}, optimizer_state={"state": {0: object()}})
    with pytest.raises(TypeError, match="extra must be JSON-serialisable"):
        manager.save(1, model_state={}, extra={"x": {1, 2}})
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        manager.save(-1, model_state={})
    assert list(tmp_path.iterdir()) == []


def test_find_checkpoint_accepts_run_checkpoints_and_checkpoint_dirs(tmp_path):
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints")
    manager.save(1, model_state={"w": torch.ones(2)}, blocking=True)
    newest = manager.save(2, model_state={"w": torch.ones(2)}, blocking=True)

    assert find_checkpoint(run) == newest
    assert find_checkpoint(run / "checkpoints") == newest
    assert find_checkpoint(run / "checkpoints" / "step_00000001") == run / "checkpoints" / "step_00000001"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*empty; expected a checkpoint directory"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="missing does not exist; expected"):
        find_checkpoint(tmp_path / "missing")


CHILD = """
import sys, time
import torch
from looprl.train import checkpoint as ckpt

manager = ckpt.CheckpointManager(sys.argv[1])
manager.save(1, model_state={"w": torch.ones(4)}, blocking=True)
write = ckpt._write_durably

def write_then_stall(path, writer):
    result = write(path, writer)
    print("saving", flush=True)
    time.sleep(120)
    return result

ckpt._write_durably = write_then_stall
manager.save(2, model_state={"w": torch.zeros(13_107_200)})  # 50 MiB
manager.wait()
"""


def test_kill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
    finally:
        child.kill()
        _, stderr = child.communicate()
    assert line == "saving\n", stderr
    half_written = tmp_path / f".tmp-step_00000002-{child.pid}"
    assert (half_written / "model.safetensors").stat().st_size > 50_000_000
    assert not (half_written / "manifest.json").exists()
    assert not (tmp_path / "step_00000002").exists()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        latest = CheckpointManager(tmp_path).latest()
    assert latest == tmp_path / "step_00000001"
    assert torch.equal(CheckpointManager.load(latest).model_state["w"], torch.ones(4))
    assert not half_written.exists()
