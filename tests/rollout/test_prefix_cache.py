"""HFEngine's own decoding and its per-episode prefix cache.

Without a cache the engine's decode loop must be `model.generate` exactly (same ids, same
logprobs, same random draws); with one, a later turn must feed only its new tokens and
still sample from the distribution a fresh forward pass gives.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from looprl.envs import make_env
from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.engine import (
    MIN_SHARED_TOKENS,
    GenerationRequest,
    HFEngine,
    SamplingParams,
    _RoomyLayer,
    decodes_with_cache,
)
from looprl.rollout.turns import EpisodeTurn

from .test_engine import prompts


def fresh_logprobs(model, prompt: list[int], sampled: list[int], temperature: float) -> torch.Tensor:
    """Logprobs of `sampled` after `prompt` from one forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + sampled])).logits[0, len(prompt) - 1:-1].float()
    scores = logits / temperature if temperature else logits
    return torch.log_softmax(scores, -1).gather(-1, torch.tensor(sampled)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@torch.no_grad()
def test_own_decoding_is_model_generate_exactly(peaked_model, tokenizer, temperature):
    engine = HFEngine(peaked_model, tokenizer)
    assert engine.own_decoding
    requests = [GenerationRequest(p, SamplingParams(12, temperature)) for p in prompts(tokenizer, 5)]
    torch.manual_seed(3)
    ids, logprobs = engine._generate(requests)
    torch.manual_seed(3)
    own_ids, own_logprobs = engine._decode(requests, [None] * len(requests))

    assert torch.equal(own_ids, ids)
    # Up to each row's stop token (after it, a row only carries padding nobody reads).
    kept = [engine._cut(i, lp) for i, lp in zip(ids.tolist(), logprobs.tolist())]
    own_kept = [engine._cut(i, lp) for i, lp in zip(own_ids.tolist(), own_logprobs.tolist())]
    assert own_kept == kept and any(c.finished for c in kept)
    torch.manual_seed(3)
    engine._generate(requests)
    after_generate = torch.rand(1)
    torch.manual_seed(3)
    engine._decode(requests, [None] * len(requests))
    assert torch.equal(torch.rand(1), after_generate)  # the same number of random draws


def two_turns(engine, tokenizer, temperature: float, keys):
    """Turn 1 of three episodes in one batch, then turn 2 (turn 1 + a fake tool result)."""
    params = SamplingParams(10, temperature)
    first_prompts = prompts(tokenizer, 3)
    first = engine.generate_batch([GenerationRequest(p, params) for p in first_prompts], keys)
    observation = tokenizer.encode("\nresult: 42\n", add_special_tokens=False)
    second_prompts = [p + c.token_ids + observation * (i + 1) for i, (p, c) in enumerate(zip(first_prompts, first))]
    second = engine.generate_batch([GenerationRequest(p, params) for p in second_prompts], keys)
    return first_prompts, first, second_prompts, second


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_a_later_turn_feeds_only_new_tokens_and_samples_what_it_records(peaked_model, tokenizer, temperature):
    engine = HFEngine(peaked_model, tokenizer)
    keys = [EpisodeTurn(i) for i in range(3)]
    torch.manual_seed(0)
    first_prompts, first, second_prompts, second = two_turns(engine, tokenizer, temperature, keys)

    # Turn 1's prompt and every sampled token but the last (never fed) were cached.
    held = sum(len(p) + len(c.token_ids) - 1 for p, c in zip(first_prompts, first))
    assert engine.stats["cached_tokens"] == held
    assert engine.metrics()["perf/engine_prefix_hit"] == pytest.approx(
        held / sum(len(p) for p in first_prompts + second_prompts))
    for prompt, completion in zip(second_prompts, second):
        expected = fresh_logprobs(peaked_model, prompt, completion.token_ids, temperature)
        assert torch.tensor(completion.logprobs) == pytest.approx(expected, abs=2e-6)


def test_cached_and_uncached_turns_decode_the_same_greedy_tokens(peaked_model, tokenizer):
    keys = [EpisodeTurn(i) for i in range(3)]
    cached = two_turns(HFEngine(peaked_model, tokenizer), tokenizer, 0.0, keys)
    plain = two_turns(HFEngine(peaked_model, tokenizer, prefix_cache=False), tokenizer, 0.0, keys)
    assert [c.token_ids for c in cached[3]] == [c.token_ids for c in plain[3]]
    assert sum((c.logprobs for c in cached[3]), []) == pytest.approx(sum((c.logprobs for c in plain[3]), []), abs=2e-6)


def test_no_keys_or_no_cache_reuses_nothing(peaked_model, tokenizer):
    for engine, keys in ((HFEngine(peaked_model, tokenizer), None),
                         (HFEngine(peaked_model, tokenizer, prefix_cache=False), [EpisodeTurn(i) for i in range(3)])):
        two_turns(engine, tokenizer, 1.0, keys)
        assert engine.stats["cached_tokens"] == 0 and not engine._prefixes
    assert not HFEngine(peaked_model, tokenizer, prefix_cache=False).own_decoding  # model.generate, as before


def test_new_weights_ended_episodes_and_diverging_prompts_drop_the_cache(peaked_model, tokenizer):
    engine = HFEngine(peaked_model, tokenizer)
    params = SamplingParams(6, 1.0)
    key = EpisodeTurn(0)
    prompt = prompts(tokenizer, 4)[3]
    (done,) = engine.generate_batch([GenerationRequest(prompt, params)], [key])
    context = prompt + done.token_ids

    # A prompt that shares only its first 5 tokens with the cached context reuses 5.
    engine.generate_batch([GenerationRequest(context[:5] + [7, 8, 9], params)], [key])
    assert engine.stats["cached_tokens"] == 5

    engine.update_weights()  # a new policy version: its keys and values are stale
    before = engine.stats["cached_tokens"]
    engine.generate_batch([GenerationRequest(context[:5] + [7, 8, 9, 10], params)], [key])
    assert engine.stats["cached_tokens"] == before

    key.ended = True  # the episode is over: its cache goes at the next batch
    engine.generate_batch([GenerationRequest(prompt, params)], [None])
    assert key not in engine._prefixes


def test_a_batch_mixes_cached_uncached_and_unkeyed_rows(peaked_model, tokenizer):
    """Rows with different cached lengths, none, or no episode share one call, each
    decoding exactly what it decodes alone without a cache."""
    engine, plain = HFEngine(peaked_model, tokenizer), HFEngine(peaked_model, tokenizer, prefix_cache=False)
    params = SamplingParams(8, 0.0)
    keys = [EpisodeTurn(i) for i in range(4)]
    all_prompts = prompts(tokenizer, 6)
    first = engine.generate_batch([GenerationRequest(p, params) for p in all_prompts[:2]], keys[:2])
    mixed = [all_prompts[i] + first[i].token_ids + [5, 6, 7][: i + 1] for i in range(2)] + all_prompts[2:4]
    together = engine.generate_batch([GenerationRequest(p, params) for p in mixed], [keys[0], keys[1], keys[2], None])
    alone = [plain.generate_batch([GenerationRequest(p, params)])[0] for p in mixed]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert sum((c.logprobs for c in together), []) == pytest.approx(sum((c.logprobs for c in alone), []), abs=2e-6)


def test_episodes_through_run_episode_reuse_their_context(peaked_model, tokenizer):
    def play(engine):
        templater = ObservationTemplater(tokenizer)
        params = SamplingParams(12, 0.0)

        async def run():
            return await asyncio.gather(*[
                run_episode(make_env("looprl/Calc-v0", max_turns=3), engine, tokenizer, templater, params,
                            seed=s, max_tokens=400) for s in range(4)])

        return asyncio.run(run())

    cached_engine = HFEngine(peaked_model, tokenizer)
    cached, plain = play(cached_engine), play(HFEngine(peaked_model, tokenizer, prefix_cache=False))
    assert sum(t.num_turns for t in cached) > 4  # later turns happened, and reused their context
    assert cached_engine.metrics()["perf/engine_prefix_hit"] > 0.3  # turn 1 of each episode is never cached
    assert [t.input_ids for t in cached] == [t.input_ids for t in plain]
    assert not cached_engine._prefixes  # every episode ended: nothing is held


def test_models_without_full_attention_everywhere_decode_through_generate(tiny_model_path, tokenizer):
    from looprl.train.models import load_model

    model = load_model(tiny_model_path)
    assert decodes_with_cache(model)
    model.config.use_sliding_window, model.config.sliding_window = True, 16
    engine = HFEngine(model, tokenizer)
    assert not decodes_with_cache(model) and not engine.own_decoding and not engine.prefix_cache
    (completion,) = engine.generate_batch([GenerationRequest(prompts(tokenizer, 1)[0], SamplingParams(4, 1.0))])
    assert len(completion.token_ids) == len(completion.logprobs) > 0


def test_a_roomy_layer_appends_in_place_and_grows_past_its_room():
    layer = _RoomyLayer(room=2, keys=torch.randn(2, 1, 3, 4), values=torch.randn(2, 1, 3, 4))
    keys, values = [layer.keys.clone()], [layer.values.clone()]
    for n in (1, 1, 3):  # the third update outgrows the room and reallocates
        k, v = torch.randn(2, 1, n, 4), torch.randn(2, 1, n, 4)
        keys.append(k), values.append(v)
        out_k, out_v = layer.update(k, v)
        assert torch.equal(out_k, torch.cat(keys, -2)) and torch.equal(out_v, torch.cat(values, -2))
    assert layer.get_seq_length() == 8


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_the_models_generation_config_does_not_bend_what_is_sampled(tiny_model_path, tokenizer, prefix_cache):
    """A real model ships a generation config (Qwen2.5: repetition_penalty 1.05, top_k 20);
    the engine must still sample from softmax(logits / T), the distribution it records and
    the trainer recomputes, and must leave the model's config as it was (export writes it)."""
    from looprl.train.models import load_model

    model = load_model(tiny_model_path).eval()
    model.generation_config.repetition_penalty, model.generation_config.top_k = 3.0, 20
    engine = HFEngine(model, tokenizer, prefix_cache=prefix_cache)
    prompt = tokenizer.encode("Compute 3 + 4 x x x", add_special_tokens=False)
    torch.manual_seed(0)
    (completion,) = engine.generate_batch([GenerationRequest(prompt, SamplingParams(8, 1.0))])
    expected = fresh_logprobs(model, prompt, completion.token_ids, 1.0)
    assert torch.tensor(completion.logprobs) == pytest.approx(expected, abs=2e-6)
    assert model.generation_config.repetition_penalty == 3.0 and model.generation_config.top_k == 20


def shared_start_prompts(tokenizer, n: int = 4) -> list[list[int]]:
    """First-turn prompts that share a long start (a system prompt), then differ."""
    system = tokenizer.encode("Use the calculator, then answer. " * 4, add_special_tokens=False)
    return [system + p for p in prompts(tokenizer, n)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_first_turns_that_start_alike_prefill_their_common_prefix_once(peaked_model, tokenizer, temperature):
    """`shared_prefix`: rows with nothing cached reuse one prefill of their prompts' common
    start, and sample from the distributions a fresh forward pass gives (greedy: the same
    tokens as without it)."""
    first = shared_start_prompts(tokenizer)
    common = next(j for j in range(min(map(len, first))) if len({p[j] for p in first}) > 1)
    assert common >= MIN_SHARED_TOKENS
    params = SamplingParams(10, temperature)
    keys = [EpisodeTurn(i) for i in range(len(first))]
    shared = HFEngine(peaked_model, tokenizer, shared_prefix=True)
    torch.manual_seed(0)
    out = shared.generate_batch([GenerationRequest(p, params) for p in first], keys)

    assert shared.stats["cached_tokens"] == common * len(first)  # every row skipped the shared start
    for prompt, completion in zip(first, out):
        expected = fresh_logprobs(peaked_model, prompt, completion.token_ids, temperature)
        assert torch.tensor(completion.logprobs) == pytest.approx(expected, abs=2e-6)
    # The next turn reuses each episode's own cache, which holds the shared start too.
    second = [p + c.token_ids + tokenizer.encode("\nresult: 42\n", add_special_tokens=False)
              for p, c in zip(first, out)]
    again = shared.generate_batch([GenerationRequest(p, params) for p in second], keys)
    for prompt, completion in zip(second, again):
        expected = fresh_logprobs(peaked_model, prompt, completion.token_ids, temperature)
        assert torch.tensor(completion.logprobs) == pytest.approx(expected, abs=2e-6)
    if temperature == 0:
        plain = HFEngine(peaked_model, tokenizer).generate_batch([GenerationRequest(p, params) for p in first], keys)
        assert [c.token_ids for c in out] == [c.token_ids for c in plain]


def test_a_shared_prefix_needs_two_rows_alike_and_the_engines_own_decoding(peaked_model, tokenizer):
    params = SamplingParams(4, 0.0)
    alone = HFEngine(peaked_model, tokenizer, shared_prefix=True)
    alone.generate_batch([GenerationRequest(shared_start_prompts(tokenizer, 1)[0], params)])
    unlike = HFEngine(peaked_model, tokenizer, shared_prefix=True)
    unlike.generate_batch([GenerationRequest(p, params) for p in prompts(tokenizer, 3)])  # no long common start
    assert alone.stats["cached_tokens"] == unlike.stats["cached_tokens"] == 0
    assert not HFEngine(peaked_model, tokenizer, prefix_cache=False, shared_prefix=True).shared_prefix
