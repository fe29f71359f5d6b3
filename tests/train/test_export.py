"""Export parity: the merged model, reloaded from disk with plain transformers, gives the
LoRA policy's logits."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from looprl.cli import main
from looprl.config import from_dict
from looprl.rollout.engine import left_pad
from looprl.train.checkpoint import CheckpointManager
from looprl.train.export import (
    base_model_reference,
    config_for_transformers4,
    export,
    make_transformers4_compatible,
    tokenizer_config_for_transformers4,
)
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


def make_run(root, model: dict | None = None, lora: bool = True, step: int = 1, lora_r: int = 4,
             scale: float = 0.5):
    """A run folder whose checkpoint at `step` holds a policy that differs from its base model:
    a LoRA adapter of rank `lora_r` whose B is drawn at `scale` (or, with `lora=False`, every
    weight moved by 0.1 `scale`). Returns `(run_dir, model, tokenizer)`."""
    cfg = from_dict({
        "name": "run", "output_dir": str(root),
        "model": model or {"tiny": SMALL},
        "lora": {"enabled": lora, "r": lora_r, "alpha": 2 * lora_r},
    })
    model, tokenizer = build_policy(cfg)
    # LoRA starts with B = 0 (a no-op adapter); give it weights so parity can fail.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        assert lora_b or not lora
        for p in lora_b:
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
        if not lora:
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * scale / 10)
    CheckpointManager(cfg.run_dir / "checkpoints").save(
        step, model_state=trainable_state(model), optimizer_state=None,
        extra={"config": cfg.model_dump(mode="json")}, blocking=True,
    )
    return cfg.run_dir, model, tokenizer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run folder whose checkpoint holds a LoRA adapter that changes the model's output."""
    return make_run(tmp_path_factory.mktemp("export"))


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


# --- transformers 4.x: the JSON it reads (tests/train/test_export_transformers4.py loads it with 4.57) ---

def test_exported_json_reads_as_transformers4_expects_and_5_reads_it_back(trained_run, tmp_path):
    run_dir, lora_model, tokenizer = trained_run
    out = export(run_dir, tmp_path / "exported")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert "rope_scaling" not in config  # the default RoPE has none in 4.x
    assert config["torch_dtype"] == config["dtype"] == "float32"
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert not isinstance(tokenizer_config.get("extra_special_tokens", {}), list)
    assert tokenizer_config["additional_special_tokens"] == ["<|im_start|>"]

    # transformers 5 reads the rewritten files as the model and tokenizer it saved.
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.config.rope_parameters == lora_model.config.rope_parameters
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.extra_special_tokens == tokenizer.extra_special_tokens == ["<|im_start|>"]
    assert reloaded.all_special_tokens == tokenizer.all_special_tokens
    assert (reloaded.eos_token, reloaded.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)
    assert reloaded.get_added_vocab() == tokenizer.get_added_vocab()


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1e6},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 1e6},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512, "rope_theta": 5e5},
}


@pytest.mark.parametrize("rope", ROPES)
def test_rope_fields_for_transformers4_round_trip_through_transformers5(tmp_path, rope):
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    cls = LlamaConfig if rope == "llama3" else Qwen2Config
    cls(rope_parameters=dict(ROPES[rope]), max_position_embeddings=2048).save_pretrained(tmp_path)
    before = AutoConfig.from_pretrained(tmp_path).to_dict()
    make_transformers4_compatible(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == ROPES[rope]["rope_theta"]
    scaling = {k: v for k, v in ROPES[rope].items() if k != "rope_theta"}
    assert config.get("rope_scaling") == (None if rope == "default" else scaling)
    assert AutoConfig.from_pretrained(tmp_path).to_dict() == before


def test_rope_per_layer_type_gets_4x_thetas_and_keeps_5x_config(tmp_path):
    from transformers import AutoConfig, Gemma3TextConfig

    Gemma3TextConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, vocab_size=100).save_pretrained(tmp_path)
    before = AutoConfig.from_pretrained(tmp_path).to_dict()
    make_transformers4_compatible(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["rope_theta"], config["rope_local_base_freq"]) == (1e6, 1e4)
    assert "rope_scaling" not in config
    assert AutoConfig.from_pretrained(tmp_path).to_dict() == before


def test_sub_configs_and_v5_tokenizer_class_are_converted():
    config = config_for_transformers4({"model_type": "x", "text_config": {
        "model_type": "y", "rope_parameters": {"rope_type": "default", "rope_theta": 2.0, "partial_rotary_factor": 0.5}}})
    assert config["text_config"]["rope_theta"] == 2.0 and config["text_config"]["partial_rotary_factor"] == 0.5
    assert "rope_theta" not in config
    tokenizer = tokenizer_config_for_transformers4({
        "tokenizer_class": "TokenizersBackend", "additional_special_tokens": ["<a>"], "extra_special_tokens": ["<a>", "<b>"]})
    assert tokenizer == {"tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["<a>", "<b>"]}
    named = {"extra_special_tokens": {"image_token": "<img>"}}  # 4.x's own form: kept
    assert tokenizer_config_for_transformers4(named) == named


# --- permissions, the adapter, the model card ---

def test_export_has_normal_permissions(trained_run, tmp_path):
    run_dir, _, _ = trained_run
    before = os.umask(0o022)
    try:
        out = export(run_dir, tmp_path / "exported")
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    files = [p for p in out.rglob("*")]
    assert files and all(p.is_file() for p in files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o644" for p in files}


def test_cli_adapter_only_loads_with_peft_on_the_base_model(trained_run, batch, tmp_path):
    from peft import PeftModel

    run_dir, lora_model, tokenizer = trained_run
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--out", str(out), "--adapter-only"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "README.md"} <= names
    assert "model.safetensors" not in names  # the adapter only, not the base weights
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    cfg = from_dict(CheckpointManager.load(CheckpointManager(run_dir / "checkpoints").latest()).extra["config"])
    assert adapter_config["base_model_name_or_path"] == base_model_reference(cfg)
    assert Path(adapter_config["base_model_name_or_path"]).is_absolute()  # looprl/tiny's cached folder

    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, out).eval()
    assert (logits(model, batch) - logits(lora_model, batch)).abs().max().item() < TOLERANCE
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == CHAT_TEMPLATE
    assert [reloaded.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()


def test_cli_adapter_only_of_a_full_fine_tune_is_one_line(capsys, tmp_path):
    run_dir, _, _ = make_run(tmp_path / "full", lora=False)
    out = tmp_path / "adapter"
    assert main(["export", str(run_dir), "--out", str(out), "--adapter-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("looprl: error: ") and len(err.splitlines()) == 1
    assert "full fine-tune run (lora.enabled=false)" in err and "drop --adapter-only" in err
    assert not out.exists()
    # The whole model exports as it is.
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_model_card_has_the_eval_table_and_the_settings(tmp_path):
    run_dir, _, _ = make_run(tmp_path / "card", step=4)
    summary = {"episodes": 300, "lost_episodes": 0, "success_stderr": 0.02}
    results = {
        "warmstart": {"sampled": {**summary, "success_rate": 0.25}, "greedy": {**summary, "success_rate": 0.4}},
        "rl": {"steps": 4, "seconds": 1.0},
        "final": {"sampled": {**summary, "success_rate": 0.5}, "greedy": {**summary, "success_rate": 0.625}},
        "change": {"sampled": {"episodes": 300, "before": 0.25, "after": 0.5, "change": 0.25, "gained": 80,
                               "lost": 5, "p_value": 1e-6}},
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    card = (export(run_dir, tmp_path / "out") / "README.md").read_text()
    assert "| warm start (SFT), before RL | 25.0% ± 2.0% | 40.0% ± 2.0% |" in card
    assert "| after RL (step 4) | 50.0% ± 2.0% | 62.5% ± 2.0% |" in card
    assert "| change (paired by task) | +25.0 pts (80 gained, 5 lost; sign test p = 1e-06) | - |" in card
    assert "lora:\n  r: 4\n  alpha: 8\n" in card  # the settings that differ from the defaults
    assert "library_name: transformers" in card

    # A results.json of another step (a later checkpoint's) is not this checkpoint's evaluation.
    (run_dir / "results.json").write_text(json.dumps({**results, "rl": {"steps": 9, "seconds": 1.0}}))
    card = (export(run_dir, tmp_path / "out2") / "README.md").read_text()
    assert "No held-out evaluation of this checkpoint was recorded" in card
