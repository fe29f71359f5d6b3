"""Seeded requests: each row samples from its own stream, so what it samples does not depend
on the other rows of its batch, and the unseeded (training) path is left as it was."""

from __future__ import annotations

import pytest
import torch

from looprl.rollout.engine import GenerationRequest, HFEngine, SamplingParams, seeded_tokens, stream_seed

from .test_engine import SpyEngine, generate_concurrently, prompts
from .test_prefix_cache import fresh_logprobs


def test_seeded_tokens_invert_the_cdf_and_skip_impossible_tokens():
    probs = torch.tensor([[0.2, 0.0, 0.5, 0.3]]).expand(6, 4)
    uniforms = torch.tensor([0.0, 0.1, 0.2, 0.69, 0.7, 0.999], dtype=torch.float64)
    # cdf 0.2, 0.2, 0.7, 1.0: the first token whose cdf exceeds u; token 1 has no mass.
    assert seeded_tokens(probs, uniforms).tolist() == [0, 0, 2, 2, 3, 3]


def test_seeded_tokens_are_distributed_as_the_probabilities():
    probs = torch.tensor([0.1, 0.6, 0.3])
    uniforms = torch.rand(40_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(seeded_tokens(probs.expand(40_000, 3), uniforms), minlength=3) / 40_000
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)


def test_stream_seeds_are_stable_and_distinct():
    assert stream_seed(1234, 0, 0) == stream_seed(1234, 0, 0)
    assert len({stream_seed(1234, s, k) for s in range(100) for k in range(4)}) == 400
    assert 0 <= stream_seed(2**40, 7) < 2**63


@pytest.mark.parametrize("prefix_cache", [True, False])  # the engine's own loop, and model.generate
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_seeded_row_samples_the_same_in_any_batch(peaked_model, tokenizer, prefix_cache, temperature):
    engine = HFEngine(peaked_model, tokenizer, prefix_cache=prefix_cache)
    assert engine.own_decoding == prefix_cache
    params = SamplingParams(12, temperature)
    requests = [GenerationRequest(p, params, seed=stream_seed(9, i)) for i, p in enumerate(prompts(tokenizer, 6))]
    torch.manual_seed(0)
    before = torch.rand(1)
    together = engine.generate_batch(requests)
    torch.manual_seed(0)
    engine.generate_batch(requests[::-1])
    assert torch.equal(torch.rand(1), before)  # seeded sampling draws nothing from the torch stream
    alone = [engine.generate_batch([r])[0] for r in requests]
    reversed_ = engine.generate_batch(requests[::-1])[::-1]
    for a, b, c in zip(together, alone, reversed_):
        assert a.token_ids == b.token_ids == c.token_ids
    assert len({tuple(c.token_ids) for c in together}) == 6
    for r, c in zip(requests, together):  # logprobs are the sampling distribution's, as unseeded
        torch.testing.assert_close(torch.tensor(c.logprobs), fresh_logprobs(peaked_model, r.prompt_ids, c.token_ids,
                                                                              temperature), atol=1e-5, rtol=0)


def test_both_decoding_paths_draw_the_same_seeded_tokens(peaked_model, tokenizer):
    requests = [GenerationRequest(p, SamplingParams(12), seed=stream_seed(5, i))
                for i, p in enumerate(prompts(tokenizer, 4))]
    own = HFEngine(peaked_model, tokenizer, prefix_cache=True).generate_batch(requests)
    generate = HFEngine(peaked_model, tokenizer, prefix_cache=False).generate_batch(requests)
    assert [c.token_ids for c in own] == [c.token_ids for c in generate]


def test_another_seed_samples_other_tokens(peaked_model, tokenizer):
    engine = HFEngine(peaked_model, tokenizer)
    prompt = prompts(tokenizer, 1)[0]
    draws = {tuple(engine.generate_batch([GenerationRequest(prompt, SamplingParams(12), seed=s)])[0].token_ids)
             for s in range(8)}
    assert len(draws) > 4


def test_seeded_and_unseeded_requests_never_share_a_batch(peaked_model, tokenizer):
    params = SamplingParams(4)
    ps = prompts(tokenizer, 4)
    mixed = [GenerationRequest(ps[0], params), GenerationRequest(ps[1], params, seed=1)]
    with pytest.raises(ValueError, match="all seeded or all unseeded"):
        HFEngine(peaked_model, tokenizer).generate_batch(mixed)
    engine = SpyEngine(peaked_model, tokenizer)
    generate_concurrently(engine, [GenerationRequest(p, params, seed=i if i % 2 else None) for i, p in enumerate(ps)])
    assert sorted(len({r.seed is None for r in batch}) for batch in engine.batches) == [1, 1]


def test_vllm_requests_carry_their_seed():
    from looprl.rollout.vllm_engine import to_vllm_request

    from .test_vllm_engine import FAKE_API

    _, params = to_vllm_request(GenerationRequest([5, 6], SamplingParams(4), seed=77), FAKE_API)
    assert params.seed == 77
    _, params = to_vllm_request(GenerationRequest([5, 6], SamplingParams(4)), FAKE_API)
    assert not hasattr(params, "seed")  # unseeded: vLLM's own stream, as before
