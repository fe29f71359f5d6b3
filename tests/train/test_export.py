"""Export parity: the merged model, reloaded from disk with plain transformers, gives the
LoRA policy's logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from looprl.cli import main
from looprl.config import from_dict
from looprl.rollout.engine import left_pad
from looprl.train.checkpoint import CheckpointManager
from looprl.train.export import export
from looprl.train.policy import build_policy, trainable_state
from looprl.train.tiny import CHAT_TEMPLATE

SMALL = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
TOLERANCE = 1e-4
TEXTS = ["Compute 7 + 12 * 3.", '<tool_call>{"name": "answer", "arguments": {"value": 43}}</tool_call>', "1 2"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder whose checkpoint holds a LoRA adapter that changes the model's output."""
    root = tmp_path_factory.mktemp("export")
    cfg = from_dict({
        "name": "run", "output_dir": str(root),
        "model": {"tiny": SMALL},
        "lora": {"enabled": True, "r": 4, "alpha": 8},
    })
    model, tokenizer = build_policy(cfg)
    # LoRA starts with B = 0 (a no-op adapter); give it weights so parity can fail.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert lora_b
        for p in lora_b:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    CheckpointManager(cfg.run_dir / "checkpoints").save(
        1, model_state=trainable_state(model), optimizer_state=None,
        extra={"config": cfg.model_dump(mode="json")}, blocking=True,
    )
    return cfg.run_dir, model, tokenizer


@pytest.fixture(scope="module")
def batch(trained_run):
    """A fixed left-padded batch of three texts."""
    _, _, tokenizer = trained_run
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    return left_pad(ids, tokenizer.pad_token_id)


def logits(model, batch) -> torch.Tensor:
    input_ids, attention_mask = batch
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    return out[attention_mask.bool()]  # real positions only


def test_exported_model_matches_the_lora_policy(trained_run, batch, tmp_path):
    run_dir, lora_model, tokenizer = trained_run
    out = export(run_dir, tmp_path / "exported")
    assert out == tmp_path / "exported"

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    expected = logits(lora_model, batch)
    assert (logits(merged, batch) - expected).abs().max().item() < TOLERANCE

    # The adapter mattered: without it the logits are far off.
    with lora_model.disable_adapter():
        base = logits(lora_model, batch)
    assert (base - expected).abs().max().item() > 100 * TOLERANCE

    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == CHAT_TEMPLATE
    for text in TEXTS:
        assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert reloaded.eos_token_id == tokenizer.eos_token_id == merged.generation_config.eos_token_id


def test_export_refuses_a_non_empty_folder(trained_run, tmp_path):
    run_dir, _, _ = trained_run
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError) as e:
        export(run_dir, out)
    assert repr(str(out)) in str(e.value)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_cli_export_into_an_empty_folder(trained_run, batch, tmp_path):
    run_dir, lora_model, _ = trained_run
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (logits(merged, batch) - logits(lora_model, batch)).abs().max().item() < TOLERANCE
    # Only the export itself is left next to it (no temporary folder).
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]
