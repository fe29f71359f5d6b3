"""HFEngine batches concurrent requests, samples what it records, and never hangs a caller;
collect_groups and TaskSampler around it."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from looprl.envs import make_env
from looprl.rollout.collect import collect_groups
from looprl.rollout.engine import GenerationRequest, HFEngine, SamplingParams, left_pad
from looprl.rollout.sampler import TaskSampler

TIMEOUT_S = 30


class SpyEngine(HFEngine):
    """HFEngine that keeps the requests of every `generate_batch` call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches: list[list[GenerationRequest]] = []

    def generate_batch(self, requests, keys=None):
        self.batches.append(list(requests))
        return super().generate_batch(requests, keys)


def prompts(tokenizer, n: int) -> list[list[int]]:
    """n distinct prompts of different lengths."""
    return [tokenizer.encode(f"Compute {i} + {i * 7}." + " x" * i, add_special_tokens=False) for i in range(n)]


def generate_concurrently(engine, requests):
    """Each request from its own task, as concurrent episodes do."""

    async def run():
        calls = [engine.generate([r]) for r in requests]
        results = await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT_S)
        return [c for (c,) in results]

    return asyncio.run(run())


def test_concurrent_requests_share_one_generate_call(model, tokenizer):
    engine = SpyEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=4, temperature=0)
    requests = [GenerationRequest(p, params) for p in prompts(tokenizer, 12)]
    batched = generate_concurrently(engine, requests)

    assert engine.stats["generate_calls"] == 1 and engine.stats["sequences"] == 12
    assert [r.prompt_ids for r in engine.batches[0]] == [r.prompt_ids for r in requests]
    # Each caller gets its own row: greedy ids equal those of the request run alone
    # (left padding does not change what a row sees).
    alone = [engine.generate_batch([r])[0] for r in requests]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    for b, a in zip(batched, alone):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)


def test_max_batch_size_splits_batches(model, tokenizer):
    engine = SpyEngine(model, tokenizer, max_batch_size=5)
    params = SamplingParams(max_new_tokens=2)
    completions = generate_concurrently(engine, [GenerationRequest(p, params) for p in prompts(tokenizer, 12)])

    assert [len(b) for b in engine.batches] == [5, 5, 2]
    assert engine.stats["generate_calls"] == 3 and engine.stats["sequences"] == 12
    assert len(completions) == 12 and all(1 <= len(c.token_ids) <= 2 for c in completions)


def test_requests_with_different_sampling_params_are_not_mixed(model, tokenizer):
    engine = SpyEngine(model, tokenizer)
    short, long = SamplingParams(max_new_tokens=3, temperature=1.0), SamplingParams(max_new_tokens=7, temperature=0.5)
    requests = [GenerationRequest(p, short if i % 2 else long) for i, p in enumerate(prompts(tokenizer, 8))]
    completions = generate_concurrently(engine, requests)

    assert engine.stats["generate_calls"] == 2
    assert [{r.params for r in b} for b in engine.batches] == [{long}, {short}]
    for request, completion in zip(requests, completions):
        limit = request.params.max_new_tokens
        assert len(completion.token_ids) == limit or (completion.finished and len(completion.token_ids) < limit)


@pytest.fixture
def eos_prone_model(model, tokenizer):
    """The tiny model with an lm_head bias that makes eos likely (~1 in 4 tokens), so
    rows of one batch stop at different steps."""
    with torch.no_grad():
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        head.weight = model.lm_head.weight
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 4.5
        model.lm_head = head
    return model


def test_completions_end_at_the_first_stop_token(eos_prone_model, tokenizer):
    torch.manual_seed(0)
    engine = HFEngine(eos_prone_model, tokenizer)
    assert engine.stop_ids == [tokenizer.eos_token_id]
    eos, limit = tokenizer.eos_token_id, 8
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=limit)) for p in prompts(tokenizer, 16)]
    completions = engine.generate_batch(requests)

    finished = [c for c in completions if c.finished]
    cut = [c for c in completions if not c.finished]
    assert finished and cut, "the bias must give both kinds of rows"
    assert len({len(c.token_ids) for c in finished}) > 1, "rows must stop at different steps"
    for c in completions:
        assert len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0.0 for lp in c.logprobs)
    for c in finished:  # nothing after the stop token (generate pads there)
        assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
    for c in cut:
        assert len(c.token_ids) == limit and eos not in c.token_ids
    assert engine.stats["sampled_tokens"] == sum(len(c.token_ids) for c in completions)


def test_greedy_decoding_is_deterministic(model, tokenizer):
    engine = HFEngine(model, tokenizer)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=6, temperature=0)) for p in prompts(tokenizer, 3)]
    torch.manual_seed(0)
    first = engine.generate_batch(requests)
    torch.manual_seed(1)
    second = engine.generate_batch(requests)
    assert first == second
    # Greedy picks the argmax: its logprob is the row's largest.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([requests[0].prompt_ids])).logits[0, -1]
    assert first[0].token_ids[0] == int(logits.argmax())
    assert first[0].logprobs[0] == pytest.approx(float(torch.log_softmax(logits, -1).max()), abs=1e-5)


def test_sampling_differs_across_seeds(model, tokenizer):
    """The other side of the greedy test: at temperature 1 the seed matters."""
    engine = HFEngine(model, tokenizer)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=6)) for p in prompts(tokenizer, 3)]
    torch.manual_seed(0)
    first = engine.generate_batch(requests)
    torch.manual_seed(1)
    assert engine.generate_batch(requests) != first


def test_left_pad():
    input_ids, attention_mask = left_pad([[1, 2, 3], [4], []], pad_id=9)
    assert input_ids.tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert input_ids.dtype == attention_mask.dtype == torch.long


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "Expect `max_new_tokens` to be positive, actually: 0"),
        ({"max_new_tokens": -3}, "Expect `max_new_tokens` to be positive, actually: -3"),
        ({"temperature": -0.5}, "Expect `temperature` to be >= 0, actually: -0.5"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message


def test_max_batch_size_validation(model, tokenizer):
    with pytest.raises(ValueError, match="Expect `max_batch_size` to be positive, actually: 0"):
        HFEngine(model, tokenizer, max_batch_size=0)


def test_update_weights_bumps_version_and_completions_carry_it(model, tokenizer):
    engine = HFEngine(model, tokenizer)
    request = GenerationRequest(prompts(tokenizer, 1)[0], SamplingParams(max_new_tokens=3, temperature=0))
    before = generate_concurrently(engine, [request])[0]
    assert (engine.version, before.version) == (0, 0)

    engine.update_weights()  # the trainer changed the shared model in place
    assert engine.version == 1
    assert generate_concurrently(engine, [request])[0].version == 1

    # With a state dict the weights are loaded: greedy output follows the new weights.
    name = "model.norm.weight"
    new = {name: torch.full_like(model.state_dict()[name], 40.0)}
    engine.update_weights(new)
    after = generate_concurrently(engine, [request])[0]
    assert engine.version == after.version == 2
    assert torch.equal(model.state_dict()[name], new[name])
    assert after.logprobs != pytest.approx(before.logprobs, abs=1e-3)


class FailingEngine(HFEngine):
    def generate_batch(self, requests, keys=None):
        raise RuntimeError("generation broke")


def test_an_error_in_generation_reaches_every_waiting_caller(model, tokenizer):
    engine = FailingEngine(model, tokenizer)
    requests = [GenerationRequest(p, SamplingParams(max_new_tokens=2)) for p in prompts(tokenizer, 3)]

    async def run():
        calls = [engine.generate([r]) for r in requests]
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), TIMEOUT_S)

    results = asyncio.run(run())
    assert [type(r) for r in results] == [RuntimeError] * 3
    assert all(str(r) == "generation broke" for r in results)


def test_engine_keeps_serving_after_a_failed_batch(model, tokenizer):
    """A real failure (token id outside the vocabulary) fails its caller only."""
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(max_new_tokens=2, temperature=0)
    bad = GenerationRequest([model.config.vocab_size + 10], params)
    good = GenerationRequest(prompts(tokenizer, 1)[0], params)

    async def run():
        with pytest.raises(IndexError):
            await asyncio.wait_for(engine.generate([bad]), TIMEOUT_S)
        return await asyncio.wait_for(engine.generate([good]), TIMEOUT_S)

    (completion,) = asyncio.run(run())
    assert len(completion.token_ids) == 2


def test_collect_groups_returns_one_group_of_k_per_task(model, tokenizer):
    torch.manual_seed(0)
    engine = HFEngine(model, tokenizer)
    engine.update_weights()
    seeds, k = [3, 14, 15], 2
    groups = collect_groups(engine, tokenizer, lambda: make_env("looprl/Calc-v0"), seeds, k,
                            SamplingParams(max_new_tokens=6), max_tokens=300)

    assert [len(g) for g in groups] == [k] * len(seeds)
    expected_tasks = [make_env("looprl/Calc-v0").reset(seed=s)[1]["task_id"] for s in seeds]
    for g, (group, task_id) in enumerate(zip(groups, expected_tasks)):
        assert [t.task_id for t in group] == [task_id] * k
        assert [t.group_id for t in group] == [g] * k
        assert all(t.policy_version == 1 for t in group)
    # The K rollouts of a task are separate samples, not copies.
    assert any(a.input_ids != b.input_ids for a, b in groups)
    # All episodes ran concurrently: one generate call per turn, not per episode turn.
    turns = [t.num_turns for group in groups for t in group]
    assert engine.stats["sequences"] == sum(turns)
    assert engine.stats["generate_calls"] == max(turns)


def test_task_sampler_state_round_trip():
    sampler = TaskSampler(seed=3)
    sampler.sample(5)
    state = json.loads(json.dumps(sampler.state_dict()))  # it is saved in a JSON manifest
    expected = sampler.sample(7)

    restored = TaskSampler(seed=99)
    assert restored.sample(7) != expected
    restored.load_state_dict(state)
    assert restored.sample(7) == expected
    assert all(isinstance(s, int) and 0 <= s < 2**31 - 1 for s in expected)


def test_task_sampler_is_seeded():
    assert TaskSampler(seed=1).sample(4) == TaskSampler(seed=1).sample(4)
    assert TaskSampler(seed=1).sample(4) != TaskSampler(seed=2).sample(4)
