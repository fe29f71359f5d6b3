"""VLLMEngine: the conversions and adapter bookkeeping with fakes; real vLLM in test_vllm_real.py."""

from __future__ import annotations

import asyncio
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from looprl.rollout.engine import GenerationRequest, SamplingParams
from looprl.rollout.vllm_engine import (
    AdapterRegistry,
    VLLMEngine,
    adapter_file_state,
    disabled_top_k,
    engine_args_kwargs,
    load_vllm_api,
    to_completion,
    to_vllm_request,
)


class FakeSamplingParams(SimpleNamespace):
    def __init__(self, top_k: int = 0, **kwargs):
        super().__init__(top_k=top_k, **kwargs)


class FakeTokensPrompt(dict):
    pass


FAKE_API = SimpleNamespace(
    SamplingParams=FakeSamplingParams, TokensPrompt=FakeTokensPrompt,
    LoRARequest=lambda name, id_, path: SimpleNamespace(lora_name=name, lora_int_id=id_, lora_path=path),
    RequestOutputKind=SimpleNamespace(FINAL_ONLY="final"),
)


def output(ids, logprobs, reason="stop", stop_reason=None):
    positions = [{t: SimpleNamespace(logprob=lp), t + 1000: SimpleNamespace(logprob=-9.0)} for t, lp in zip(ids, logprobs)]
    return SimpleNamespace(request_id="r", outputs=[SimpleNamespace(
        token_ids=ids, logprobs=positions, finish_reason=reason, stop_reason=stop_reason)])


def test_missing_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'looprl\[vllm\]'"):
        load_vllm_api()


def test_engine_args_ask_for_processed_logprobs():
    kwargs = engine_args_kwargs("m", lora=True, max_lora_rank=16, extra={"dtype": "float16"})
    assert kwargs == {"model": "m", "logprobs_mode": "processed_logprobs", "enable_lora": True,
                      "max_lora_rank": 16, "dtype": "float16"}
    assert "enable_lora" not in engine_args_kwargs("m", lora=False, max_lora_rank=16)
    assert engine_args_kwargs("m", lora=True, max_lora_rank=4)["max_lora_rank"] == 8  # vLLM takes 1, 8, 16, ...
    assert engine_args_kwargs("m", lora=False, max_lora_rank=8, on_cpu=True)["enable_chunked_prefill"] is False
    with pytest.raises(ValueError, match="processed_logprobs"):
        engine_args_kwargs("m", lora=False, max_lora_rank=8, extra={"logprobs_mode": "raw_logprobs"})


def test_request_to_prompt_and_sampling_params():
    request = GenerationRequest([5, 6, 7], SamplingParams(max_new_tokens=12, temperature=0.7))
    prompt, params = to_vllm_request(request, FAKE_API, stop_token_ids=[2])
    assert prompt == {"prompt_token_ids": [5, 6, 7]}
    assert (params.max_tokens, params.temperature, params.n, params.logprobs) == (12, 0.7, 1, 0)
    assert (params.top_p, params.top_k, params.repetition_penalty, params.min_p) == (1.0, 0, 1.0, 0.0)
    assert params.detokenize is False and params.stop_token_ids == [2] and params.output_kind == "final"


def test_disabled_top_k_follows_the_version():
    assert disabled_top_k(FakeSamplingParams) == 0
    assert disabled_top_k(lambda: SimpleNamespace(top_k=-1)) == -1
    assert disabled_top_k(lambda: SimpleNamespace(top_k=50)) == -1


def test_output_to_completion():
    done = to_completion(output([3, 4, 2], [-0.5, -1.0, -0.1]), version=7)
    assert (done.token_ids, done.logprobs, done.finished, done.version) == ([3, 4, 2], [-0.5, -1.0, -0.1], True, 7)
    cut = to_completion(output([3, 4], [-0.5, -1.0], reason="length"), version=0)
    assert not cut.finished and cut.logprobs == [-0.5, -1.0]
    plain = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1], logprobs=[{1: -0.25}], finish_reason="length")])
    assert to_completion(plain, 0).logprobs == [-0.25]  # float entries as well as Logprob objects


@pytest.mark.parametrize("bad, match", [
    (output([3], [-0.5], reason="abort"), "finish_reason"),
    (output([3], [-0.5], stop_reason="</s>"), "string"),
    (SimpleNamespace(outputs=[SimpleNamespace(token_ids=[3, 4], logprobs=None, finish_reason="stop")]), "logprob"),
    (SimpleNamespace(outputs=[SimpleNamespace(token_ids=[3], logprobs=[{9: -1.0}], finish_reason="stop")]), "sampled token"),
])
def test_bad_outputs_raise(bad, match):
    with pytest.raises(RuntimeError, match=match):
        to_completion(bad, 0)


def test_adapter_state_renamed_as_peft_saves_it():
    state = {"base_model.model.q_proj.lora_A.default.weight": torch.ones(2, 2),
             "base_model.model.q_proj.lora_B.weight": torch.zeros(2, 2)}
    assert sorted(adapter_file_state(state)) == ["base_model.model.q_proj.lora_A.weight",
                                                 "base_model.model.q_proj.lora_B.weight"]


def test_adapter_registry_ids_and_retirement(tmp_path):
    registry = AdapterRegistry()
    first = registry.switch(tmp_path / "a", owned=True)
    held = registry.acquire()
    second = registry.switch(tmp_path / "b", owned=True)
    assert (first.id, second.id, held is first) == (1, 2, True)
    assert registry.retire() == []  # the first is still in flight
    registry.release(held)
    assert registry.retire() == [first] and registry.retire() == []
    assert registry.live == [2]


class FakeAsyncEngine:
    def __init__(self, reset_ok: bool = True):
        self.calls, self.removed, self.rpcs, self.cache_resets, self.reset_ok = [], [], [], 0, reset_ok
        self.loops = set()  # the event loops generate ran on: vLLM's AsyncLLM works on one only

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.calls.append((prompt["prompt_token_ids"], params, request_id, lora_request))
        self.loops.add(asyncio.get_running_loop())
        await asyncio.sleep(0)
        ids = [t + 1 for t in prompt["prompt_token_ids"][-2:]]
        yield output(ids, [-0.1 * (i + 1) for i in range(len(ids))])

    async def remove_lora(self, lora_id):
        self.removed.append(lora_id)

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        from safetensors.torch import load_file

        assert method == "reload_weights"
        self.rpcs.append(load_file(str(Path(kwargs["weights_path"]) / "model.safetensors")))

    async def reset_prefix_cache(self, reset_running_requests=False):
        self.cache_resets += 1
        return self.reset_ok


class FakePolicy:
    peft_config = {"default": SimpleNamespace(to_dict=lambda: {"peft_type": "LORA", "r": 2})}

    def save_pretrained(self, folder):
        (Path(folder) / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')


def test_engine_with_lora_moves_only_the_adapter(tmp_path):
    fake = FakeAsyncEngine()
    engine = VLLMEngine("m", policy=FakePolicy(), adapter_root=tmp_path, engine=fake, api=FAKE_API)
    request = GenerationRequest([1, 2, 3], SamplingParams(max_new_tokens=4))
    [done] = asyncio.run(engine.generate([request]))
    assert (done.token_ids, done.version, done.finished) == ([3, 4], 0, True)
    assert math.isclose(done.logprobs[1], -0.2)
    first = Path(fake.calls[0][3].lora_path)
    assert fake.calls[0][3].lora_int_id == 1 and first.exists()

    engine.update_weights()  # the policy's adapter, saved again
    engine.update_weights({"base_model.model.q_proj.lora_A.default.weight": torch.ones(2, 2)})
    assert not first.exists()  # retired: nothing uses it any more
    [done] = asyncio.run(engine.generate([request, request]))[:1]
    lora = fake.calls[-1][3]
    assert (lora.lora_int_id, done.version) == (3, 2)
    assert sorted(p.name for p in Path(lora.lora_path).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert fake.removed == [1, 2] and len(list(tmp_path.iterdir())) == 1
    assert engine.metrics()["perf/engine_requests"] == 3.0 and engine.stats["sampled_tokens"] == 6
    engine.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_engine_full_update_loads_before_the_next_request():
    fake = FakeAsyncEngine()
    engine = VLLMEngine("m", engine=fake, api=FAKE_API)
    engine.update_weights({"w": torch.ones(1)})
    assert fake.rpcs == []  # deferred to the engine's loop
    [done] = asyncio.run(engine.generate([GenerationRequest([1], SamplingParams())]))
    assert list(fake.rpcs[0]) == ["w"] and fake.cache_resets == 1 and done.version == 1
    assert fake.calls[0][3] is None
    with pytest.raises(ValueError, match="LoRA"):
        engine.update_weights("some/adapter")
    engine.shutdown()


def test_every_caller_loop_reaches_vllm_on_one_loop():
    fake = FakeAsyncEngine()
    engine = VLLMEngine("m", engine=fake, api=FAKE_API)
    for _ in range(2):  # collect.py starts a fresh loop per step
        asyncio.run(engine.generate([GenerationRequest([1, 2], SamplingParams())]))
    assert len(fake.calls) == 2 and len(fake.loops) == 1
    engine.shutdown()


def test_full_update_without_a_prefix_cache_reset_is_an_error():
    class NoReset:
        async def generate(self, prompt, params, request_id, lora_request=None):
            yield output([1], [-0.1])

    with pytest.raises(RuntimeError, match="reset_prefix_cache"):
        VLLMEngine("m", engine=NoReset(), api=FAKE_API)
    engine = VLLMEngine("m", engine=FakeAsyncEngine(reset_ok=False), api=FAKE_API)
    engine.update_weights({"w": torch.ones(1)})
    with pytest.raises(RuntimeError, match="did not reset its prefix cache"):
        asyncio.run(engine.generate([GenerationRequest([1], SamplingParams())]))
    engine.shutdown()
