"""Chunked log-probs: the same numbers and gradients as the full logits, without them."""

from __future__ import annotations

import logging

import pytest
import torch

from looprl.config import from_dict
from looprl.train.batch import collate, micro_batches, policy_logprobs, reference_logprobs
from looprl.train.logprobs import (
    CHUNK_LOGITS,
    chunked_support,
    default_chunk_tokens,
    lm_parts,
    token_logprobs_chunked,
    token_logprobs_full,
)
from looprl.train.policy import build_policy
from looprl.train.sft import sft_backward, sft_loss
from looprl.types import Trajectory

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
LORA = {"enabled": True, "r": 4, "alpha": 8}
TOL = {"atol": 1e-6, "rtol": 0}


def tiny(lora: dict | None = None):
    model, tokenizer = build_policy(from_dict({"model": {"tiny": TINY}, "lora": lora or {"enabled": False}}))
    if lora:
        # A fresh adapter's B is zero, so it would change nothing: make it count.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    return model, tokenizer


@pytest.fixture(scope="module")
def plain():
    return tiny()


def padded_inputs(vocab: int, pad_id: int, lengths=(13, 5, 9), seed: int = 0):
    """Right-padded (B, L) ids and mask, rows of unequal length as the trainer builds them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(0, vocab, (n,), generator=gen)
        mask[row, :n] = 1
    return ids, mask


def grads(model, fn):
    """Gradient of every trainable parameter of the loss `fn()`."""
    model.zero_grad()
    fn().backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


def assert_same_grads(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and got
    for name in expected:
        # float32 sums in another order: on some CPUs (their kernels' order) an element of
        # the tied embedding's gradient lands 1.5e-6 away; a wrong gradient is off by 1e-3 or more.
        torch.testing.assert_close(got[name], expected[name], atol=5e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_logprobs_and_entropy_equal_the_full_logits(plain, chunk, temperature):
    model, tokenizer = plain
    ids, mask = padded_inputs(len(tokenizer), tokenizer.pad_token_id)
    assert chunked_support(model) is None  # the tiny Qwen2 (tied embeddings) takes the chunked path
    with torch.no_grad():
        lp, ent = token_logprobs_chunked(model, ids, mask, ids[:, 1:], temperature, chunk, with_entropy=True)
        full_lp, full_ent = token_logprobs_full(model, ids, mask, ids[:, 1:], temperature, with_entropy=True)
        only_lp = token_logprobs_chunked(model, ids, mask, ids[:, 1:], temperature, chunk)
    assert lp.shape == ent.shape == (3, 12) and lp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(lp, full_lp, **TOL)
    torch.testing.assert_close(only_lp, full_lp, **TOL)
    torch.testing.assert_close(ent, full_ent, **TOL)
    # The entropy is the textbook one, of softmax(logits / T).
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / temperature
    textbook = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(ent, textbook, atol=1e-5, rtol=0)
    assert (ent > 0).all()


@pytest.mark.parametrize("terms", [(1.0, 0.1), (1.0, 0.0), (0.0, 1.0)], ids=["both", "logprobs", "entropy"])
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_gradients_equal_the_full_logits_gradients(plain, chunk, terms):
    model, tokenizer = plain
    ids, mask = padded_inputs(len(tokenizer), tokenizer.pad_token_id)
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(1))
    weights = weights * mask[:, 1:]  # padded targets weigh nothing, as under a loss mask
    lp_weight, ent_weight = terms

    def loss(fn, **kw):
        lp, ent = fn(model, ids, mask, ids[:, 1:], 0.8, with_entropy=True, **kw)
        # A zero weight leaves that output out of the graph: its gradient arrives as None.
        return sum(w * (x * weights).sum() for w, x in ((lp_weight, lp), (ent_weight, ent)) if w)

    expected = grads(model, lambda: loss(token_logprobs_full))
    assert_same_grads(grads(model, lambda: loss(token_logprobs_chunked, chunk_tokens=chunk)), expected)
    assert len(expected) == len(list(model.parameters()))  # every parameter, embeddings (= the head) included


def test_policy_logprobs_keeps_its_shape_and_values_on_padded_rows(plain):
    model, tokenizer = plain
    trajs = [Trajectory(list(range(3, 3 + n)), [0] * (n // 2) + [1] * (n - n // 2), [0.0] * n) for n in (11, 4, 7)]
    batch = collate(trajs, tokenizer.pad_token_id)
    with torch.no_grad():
        got = policy_logprobs(model, batch, temperature=0.9)
        expected = token_logprobs_full(model, batch.input_ids, batch.attention_mask, batch.input_ids[:, 1:], 0.9)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, expected, **TOL)  # padded positions included: callers mask them
    # A padded row gives the same log-probs as the row alone: padding does not leak in.
    with torch.no_grad():
        alone = policy_logprobs(model, collate(trajs[1:2], tokenizer.pad_token_id), temperature=0.9)
    torch.testing.assert_close(got[1, :3], alone[0], atol=1e-5, rtol=0)


def test_the_head_never_projects_more_than_a_chunk_forward_or_backward(plain):
    """What saves the memory: no (all tokens x vocabulary) logits, not even in the backward."""
    model, tokenizer = plain
    ids, mask = padded_inputs(len(tokenizer), tokenizer.pad_token_id)
    rows: list[int] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o[..., 0].numel()))
    try:
        token_logprobs_chunked(model, ids, mask, ids[:, 1:], chunk_tokens=7).sum().backward()
    finally:
        handle.remove()
        model.zero_grad()
    n = ids.shape[0] * (ids.shape[1] - 1)
    assert max(rows) == 7 and sum(rows) == 2 * n  # each chunk once forward, once recomputed in the backward
    rows.clear()
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o[..., 0].numel()))
    try:
        with torch.no_grad():
            token_logprobs_chunked(model, ids, mask, ids[:, 1:], chunk_tokens=7)
    finally:
        handle.remove()
    assert max(rows) == 7 and sum(rows) == n  # nothing to recompute without a backward


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj", "lm_head"]])
def test_lora_with_and_without_the_adapter_on_the_head(targets):
    model, tokenizer = tiny({**LORA, "target_modules": targets})
    head = model.get_base_model().get_output_embeddings()
    # peft's all-linear leaves the output layer alone; naming lm_head puts an adapter on it.
    assert hasattr(head, "lora_A") == ("lm_head" in targets)
    assert chunked_support(model) is None
    ids, mask = padded_inputs(len(tokenizer), tokenizer.pad_token_id)
    batch = collate([Trajectory(row[m.bool()].tolist(), [1] * int(m.sum()), [0.0] * int(m.sum()))
                     for row, m in zip(ids, mask)], tokenizer.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.input_ids[:, 1:], 0.7)

    weights = batch.loss_mask
    expected = grads(model, lambda: (token_logprobs_full(model, *args) * weights).sum())
    assert_same_grads(grads(model, lambda: (token_logprobs_chunked(model, *args, 7) * weights).sum()), expected)
    assert all("lora_" in n for n in expected)
    assert any("lm_head" in n for n in expected) == ("lm_head" in targets)

    with torch.no_grad():
        adapted = policy_logprobs(model, batch, 0.7)
        torch.testing.assert_close(adapted, token_logprobs_full(model, *args), **TOL)
        with model.disable_adapter():
            base = token_logprobs_full(model, *args)
            torch.testing.assert_close(token_logprobs_chunked(model, *args, 7), base, **TOL)
        torch.testing.assert_close(reference_logprobs(model, batch, 0.7), base, **TOL)
    assert (adapted - base).abs().max() > 1e-2  # the adapter counts, so disabling it is seen


def small_models():
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    shape = {"vocab_size": 97, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8, "eos_token_id": 1,
             "bos_token_id": 0, "pad_token_id": 0}
    torch.manual_seed(0)
    return {
        "llama-untied": LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).eval(),
        "gemma2-softcap": Gemma2ForCausalLM(Gemma2Config(**shape, final_logit_softcapping=0.5)).eval(),
        "cohere-logit-scale": CohereForCausalLM(CohereConfig(**shape, logit_scale=0.5)).eval(),
    }


def test_other_architectures_softcapping_and_the_explicit_fallback(caplog):
    models = small_models()
    ids, mask = padded_inputs(97, 0, lengths=(9, 4))
    with caplog.at_level(logging.WARNING, logger="looprl.train.logprobs"):
        support = {name: chunked_support(m) for name, m in models.items()}
    assert support["llama-untied"] is None and support["gemma2-softcap"] is None
    assert lm_parts(models["gemma2-softcap"])[2] == 0.5  # the tanh cap is applied in the chunks
    # Cohere multiplies its logits by logit_scale after the head: the probe sees it, and says so.
    assert "differs from the model's logits" in support["cohere-logit-scale"]
    assert lm_parts(models["cohere-logit-scale"]) is None
    assert "CohereForCausalLM take the full-logits path" in caplog.text and "Gemma2" not in caplog.text
    for name, model in models.items():
        expected = grads(model, lambda: token_logprobs_full(model, ids, mask, ids[:, 1:], 0.7).sum())
        got = grads(model, lambda: token_logprobs_chunked(model, ids, mask, ids[:, 1:], 0.7, chunk_tokens=3).sum())
        assert_same_grads(got, expected)
        with torch.no_grad():
            torch.testing.assert_close(token_logprobs_chunked(model, ids, mask, ids[:, 1:], 0.7, 3),
                                       token_logprobs_full(model, ids, mask, ids[:, 1:], 0.7), **TOL, msg=name)


def test_a_model_that_is_not_a_transformers_causal_lm_takes_the_full_path(plain):
    model, tokenizer = plain

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    wrapped = Wrapped()
    assert "is not a transformers model" in chunked_support(wrapped)
    ids, mask = padded_inputs(len(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs_chunked(wrapped, ids, mask, ids[:, 1:]),
                                   token_logprobs_chunked(model, ids, mask, ids[:, 1:]), **TOL)


def test_a_head_with_a_bias_goes_through_the_module():
    model, tokenizer = tiny()
    with torch.no_grad():  # as tests/rollout's peaked model: the tied weight, plus a bias
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        head.weight = model.lm_head.weight
        head.bias.normal_(0, 3.0)
        model.lm_head = head
    assert chunked_support(model) is None
    ids, mask = padded_inputs(len(tokenizer), tokenizer.pad_token_id)
    expected = grads(model, lambda: token_logprobs_full(model, ids, mask, ids[:, 1:], 0.7).sum())
    assert_same_grads(grads(model, lambda: token_logprobs_chunked(model, ids, mask, ids[:, 1:], 0.7, 5).sum()), expected)
    assert "lm_head.bias" in expected


def test_a_prompt_learning_adapter_is_not_bypassed():
    from peft import PromptTuningConfig, get_peft_model

    model, _ = tiny()
    prompted = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert "prompt learning" in chunked_support(prompted)
    assert lm_parts(prompted) is None


def test_the_probe_leaves_train_and_eval_modes_as_they_were():
    model, _ = tiny()
    model.train()
    model.model.layers[0].eval()
    assert chunked_support(model) is None
    assert model.training and model.lm_head.training and not model.model.layers[0].training


def test_bad_arguments_and_empty_targets(plain):
    model, tokenizer = plain
    ids, mask = padded_inputs(len(tokenizer), tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="Expected targets"):
        token_logprobs_chunked(model, ids, mask, torch.cat([ids, ids], dim=1))
    with pytest.raises(ValueError, match="chunk_tokens"):
        token_logprobs_chunked(model, ids, mask, ids[:, 1:], chunk_tokens=0)
    lp, ent = token_logprobs_chunked(model, ids, mask, ids[:, :0], with_entropy=True)
    assert lp.shape == ent.shape == (3, 0)


def test_the_default_chunk_holds_a_fixed_budget_of_logits(plain):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen_vocab = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                              num_attention_heads=1, num_key_value_heads=1))
    assert default_chunk_tokens(qwen_vocab) == 384 and 384 * 151936 <= CHUNK_LOGITS
    model, tokenizer = plain
    assert default_chunk_tokens(model) * len(tokenizer) <= CHUNK_LOGITS < (default_chunk_tokens(model) + 64) * len(tokenizer)


def test_bfloat16_model_gives_float32_logprobs_close_to_the_full_path():
    model = small_models()["llama-untied"].to(torch.bfloat16)
    ids, mask = padded_inputs(97, 0, lengths=(9, 4))
    lp = token_logprobs_chunked(model, ids, mask, ids[:, 1:], 0.7, chunk_tokens=3)
    assert lp.dtype == torch.float32 and chunked_support(model) is None
    torch.testing.assert_close(lp, token_logprobs_full(model, ids, mask, ids[:, 1:], 0.7), atol=1e-5, rtol=0)
    lp.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_micro_batched_sft_gradients_equal_the_one_pass_ones(lora):
    """`sft.micro_batch_tokens`: each micro-batch's NLL over the whole batch's tokens, so
    the accumulated gradient and the loss are the one-pass ones (to float rounding)."""
    model, tokenizer = tiny(lora)
    trajs = [Trajectory(list(range(3, 3 + n)), [0] * (n // 2) + [1] * (n - n // 2), [0.0] * n)
             for n in (11, 4, 7, 9, 3)]
    pad = tokenizer.pad_token_id

    def backward(max_tokens):
        model.zero_grad()
        loss = sft_backward(model, trajs, pad, max_tokens)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_one, one = backward(None)
    loss_split, split = backward(16)  # 4 micro-batches of these rows
    assert len(micro_batches([len(t.input_ids) for t in trajs], 16)) > 1
    assert loss_split == pytest.approx(loss_one, abs=1e-6)
    assert loss_one == sft_loss(model, trajs, pad).item()
    for name in one:
        torch.testing.assert_close(split[name], one[name], atol=5e-6, rtol=0)
    assert any(g.abs().max() > 1e-3 for g in one.values())  # the comparison is not of zeros
