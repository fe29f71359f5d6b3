"""The exported folder under transformers 4.57 (the version vLLM pins): its own loaders
give the trained policy's logits, tokens and chat template.

The run's base model has a RoPE theta of 1e6 (Qwen2.5's), not 4.x's default 10000, and
one has YaRN scaling: a folder whose `rope_theta` 4.x cannot find loads without a word
and gives other logits (checked too). transformers 4.57 lives in a second virtual
environment, built once with pip (torch 2.13.0, transformers 4.57.*, safetensors) in
pytest's cache (`.pytest_cache/d/venv-tf457`) and reused; `LOOPRL_TF4_PYTHON` names an
existing interpreter instead. Where pip cannot install it (no package index), the test
is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from looprl.rollout.engine import left_pad
from looprl.train.export import export
from looprl.train.tiny import CHAT_TEMPLATE, TinySpec, tiny_path
from tests.train.test_export import SMALL, TEXTS, TOLERANCE, logits, make_run

pytestmark = pytest.mark.slow

TRANSFORMERS4 = "4.57"
PACKAGES = ["torch==2.13.0", f"transformers=={TRANSFORMERS4}.*", "safetensors"]
ROPES = {
    "theta-1e6": {"rope_type": "default", "rope_theta": 1e6},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 1e6},
}

# Runs under transformers 4.57: load each folder with its Auto classes, as vLLM's stack
# does, and report what it read. Nothing from looprl is importable there.
PROBE = r"""
import json, sys
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
job = json.loads(open(sys.argv[1]).read())
report = {"version": transformers.__version__, "folders": {}}
for folder in job["folders"]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    input_ids = torch.tensor(job["input_ids"])
    attention_mask = torch.tensor(job["attention_mask"])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask).logits
    config = AutoConfig.from_pretrained(folder)
    report["folders"][folder] = {
        "logits": out[attention_mask.bool()].tolist(),
        "encodings": [tokenizer.encode(t, add_special_tokens=False) for t in job["texts"]],
        "chat": tokenizer.apply_chat_template(job["messages"], tokenize=False, add_generation_prompt=True),
        "chat_template": tokenizer.chat_template,
        "special": [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.additional_special_tokens],
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
    }
json.dump(report, open(sys.argv[2], "w"))
"""


def _python_has_transformers4(python: Path) -> bool:
    probe = "import torch, safetensors, transformers; print(transformers.__version__)"
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip().startswith(TRANSFORMERS4 + ".")


@pytest.fixture(scope="session")
def transformers4_python(request, tmp_path_factory) -> Path:
    """An interpreter with transformers 4.57: `LOOPRL_TF4_PYTHON`, or a venv built once in pytest's cache
    (in this session's tmp under `-p no:cacheprovider`)."""
    if given := os.environ.get("LOOPRL_TF4_PYTHON"):
        if not _python_has_transformers4(Path(given)):
            pytest.fail(f"LOOPRL_TF4_PYTHON={given} cannot import torch, safetensors and transformers {TRANSFORMERS4}")
        return Path(given)
    cache = getattr(request.config, "cache", None)
    venv = Path(cache.mkdir("venv-tf457")) if cache is not None else tmp_path_factory.mktemp("venv-tf457")
    python = venv / "bin" / "python"
    if python.exists() and _python_has_transformers4(python):
        return python
    building = venv.with_name(f"{venv.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(building)], check=True, timeout=300)
        # This venv's pip installs into the new one (`--python`), so the new one needs no pip of its own.
        pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(building / "bin" / "python"), "install",
                              "-q", *PACKAGES], capture_output=True, text=True, timeout=1800)
        if pip.returncode != 0:
            pytest.skip(f"cannot install {' '.join(PACKAGES)} with pip: {pip.stderr.strip()[-500:]}")
        shutil.rmtree(venv)
        os.replace(building, venv)  # complete or absent: an interrupted build is built again
    finally:
        shutil.rmtree(building, ignore_errors=True)
    assert _python_has_transformers4(python), f"{python} was built but cannot import transformers {TRANSFORMERS4}"
    return python


def _rope_base(root: Path, rope: dict) -> Path:
    """The tiny model with `rope` as its RoPE (written as transformers 5 writes it)."""
    folder = root / "base"
    shutil.copytree(tiny_path(TinySpec(**SMALL)), folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = rope
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Per RoPE: the exported folder, the trained LoRA policy, its tokenizer."""
    torch.set_num_threads(1)
    made = {}
    for name, rope in ROPES.items():
        root = tmp_path_factory.mktemp(name)
        run_dir, model, tokenizer = make_run(root, model={"name": str(_rope_base(root, rope)), "tiny": {}})
        made[name] = export(run_dir, root / "exported"), model, tokenizer
    return made


def _without_4x_rope(folder: Path) -> Path:
    """A copy of `folder` whose config.json has RoPE only as transformers 5 writes it."""
    copy = folder.with_name(folder.name + "-5x-rope-only")
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling"):
        config.pop(key, None)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_transformers4_loads_the_export_with_the_trained_logits(transformers4_python, exports, tmp_path):
    _, _, tokenizer = next(iter(exports.values()))
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    batch = left_pad(ids, tokenizer.pad_token_id)
    messages = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "Compute 7 + 12 * 3."}]
    folders = [str(folder) for folder, _, _ in exports.values()]
    unread = {name: str(_without_4x_rope(folder)) for name, (folder, _, _) in exports.items()}
    job = {"folders": folders + list(unread.values()), "texts": TEXTS, "messages": messages,
           "input_ids": batch[0].tolist(), "attention_mask": batch[1].tolist()}
    (tmp_path / "job.json").write_text(json.dumps(job))
    (tmp_path / "probe.py").write_text(PROBE)
    run = subprocess.run([str(transformers4_python), str(tmp_path / "probe.py"), str(tmp_path / "job.json"),
                          str(tmp_path / "report.json")], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["version"].startswith(TRANSFORMERS4 + ".")

    for name, (folder, model, _) in exports.items():
        got = report["folders"][str(folder)]
        expected = logits(model, batch)
        gap = (torch.tensor(got["logits"]) - expected).abs().max().item()
        print(f"{name}: transformers {report['version']} logits vs the trained policy's: max |diff| = {gap:.2e}")
        assert gap < TOLERANCE, name
        assert got["rope_theta"] == ROPES[name]["rope_theta"]
        assert got["encodings"] == ids
        assert got["chat_template"] == CHAT_TEMPLATE
        assert got["chat"] == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert got["special"] == [tokenizer.eos_token_id, tokenizer.pad_token_id, ["<|im_start|>"]]

        # Without the 4.x fields, 4.x reads its default theta, silently, and the logits are far off.
        unread_report = report["folders"][unread[name]]
        assert unread_report["rope_theta"] == 10000.0
        off = (torch.tensor(unread_report["logits"]) - expected).abs().max().item()
        assert off > 100 * TOLERANCE, name
