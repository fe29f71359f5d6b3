"""`grpo_loss` equals TRL's `GRPOTrainer._compute_loss` (trl 1.16) on the same model and ids.

TRL exports no standalone GRPO loss, so each test builds a `GRPOTrainer` around a tiny
Qwen2 saved in a tmp folder (built from a config, no download), hands `_compute_loss` an
`inputs` dict of prompt/completion ids, advantages, old and reference logprobs, and
compares its loss and its parameter gradients with ours. TRL scores the completion with
its fused LM head at its sampling temperature; our side recomputes the per-token
logprobs from the same model's logits / temperature with `core.token_logprobs`, so the
test also checks that the two logprob paths agree.

TRL `loss_type` -> our `loss_agg`, each with epsilon != epsilon_high and three KL settings:
`beta=0`; `beta>0` with `use_bias_correction_kl=False` (GRPO eq. 3: our `kl_coef`); and
`beta>0` with TRL's default `use_bias_correction_kl=True` (the KL term times the ratio:
our `kl_importance_weight=True`).
- "grpo" -> "seq-mean-token-mean".
- "bnpo" -> "token-mean": TRL divides by the masked tokens of the local batch.
- "dapo" -> "token-mean": TRL divides by `num_items_in_batch`, the masked tokens of the
  whole generation batch gathered over processes, rescaled by num_processes and
  gradient_accumulation_steps / steps_per_generation to one micro-batch. On one process
  with gradient_accumulation_steps = steps_per_generation = 1 (here) that is the
  micro-batch's token count; with accumulation it is the accumulation window's mean
  token count, which our per-micro-batch token-mean does not reproduce on its own.
- "dr_grpo" -> "seq-mean-token-sum-norm" with max_len = TRL's `max_completion_length`.
- "luspo" -> "seq-mean-token-sum-norm" with max_len = 1 (per-sequence token sum), but only
  with `importance_sampling_level="token"`; the LUSPO paper's sequence-level ratio has no
  counterpart here.
Not covered, no counterpart in `grpo_loss`: "cispo" (clipped, detached IS weight times
logprob), "sapo" (sigmoid gate instead of a clip), "vespo" (Gamma weighting of sequence
ratios), and `importance_sampling_level="sequence"` (GSPO) for any loss type.
"""

import pytest
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

from looprl.algorithms.core import token_logprobs
from looprl.algorithms.grpo import group_advantages, grpo_loss
from tests.algorithms.tiny_word_model import save_tiny_word_model

TEMPERATURE = 0.7
MAX_COMPLETION_LENGTH = 7  # > the 5 completion columns, so dr_grpo's constant is not T
EPS_LOW, EPS_HIGH = 0.2, 0.28

# TRL loss_type -> (our loss_agg, our max_len)
MODES = {
    "grpo": ("seq-mean-token-mean", None),
    "bnpo": ("token-mean", None),
    "dapo": ("token-mean", None),
    "dr_grpo": ("seq-mean-token-sum-norm", MAX_COMPLETION_LENGTH),
    "luspo": ("seq-mean-token-sum-norm", 1),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A ~5k-parameter Qwen2 and a word-level tokenizer, saved so TRL can load (and copy as ref) it."""
    return save_tiny_word_model(tmp_path_factory.mktemp("tiny_qwen2"), seed=0)


def make_trainer(model_dir, tmp_path, loss_type: str, beta: float, kl_ratio: bool = False) -> GRPOTrainer:
    args = GRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
        per_device_train_batch_size=4, num_generations=2, max_completion_length=MAX_COMPLETION_LENGTH,
        temperature=TEMPERATURE, loss_type=loss_type, beta=beta, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
        importance_sampling_level="token", use_bias_correction_kl=kl_ratio,
    )
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5 w6"]}),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dir),
    )
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets with no accumulation
    return trainer


def batch(seed: int = 0):
    """Two groups of two completions: prompts of 3 tokens, completions of 5, 3, 4, 2 tokens."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, 32, (4, 3), generator=gen)
    lengths = torch.tensor([5, 3, 4, 2])
    completion_mask = (torch.arange(5)[None, :] < lengths[:, None]).long()  # right-padded
    completion_ids = torch.randint(2, 32, (4, 5), generator=gen) * completion_mask
    advantages = torch.tensor([1.2, -0.7, 0.5, -1.0])
    # Offsets of up to +-0.4 from the current logprobs: ratios in [0.67, 1.49], many clipped.
    old_offset = (torch.rand(4, 5, generator=gen) - 0.5) * 0.8
    ref_offset = (torch.rand(4, 5, generator=gen) - 0.5) * 0.8
    return prompt_ids, completion_ids, completion_mask, advantages, old_offset, ref_offset


def our_logprobs(model, prompt_ids, completion_ids, completion_mask):
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, P + C, V)
    p = prompt_ids.shape[1]
    return token_logprobs(logits[:, p - 1 : -1] / TEMPERATURE, completion_ids)  # (B, C)


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(("beta", "kl_ratio"), [(0.0, False), (0.2, False), (0.2, True)],
                         ids=["no-kl", "kl", "kl-ratio"])
@pytest.mark.parametrize("loss_type", list(MODES))
def test_grpo_loss_equals_trl(model_dir, tmp_path, loss_type, beta, kl_ratio):
    trainer = make_trainer(model_dir, tmp_path, loss_type, beta, kl_ratio)
    model = trainer.model
    prompt_ids, completion_ids, completion_mask, advantages, old_offset, ref_offset = batch()

    logprobs = our_logprobs(model, prompt_ids, completion_ids, completion_mask)
    old_logprobs = logprobs.detach() + old_offset
    ref_logprobs = logprobs.detach() + ref_offset
    loss_agg, max_len = MODES[loss_type]
    ours, metrics = grpo_loss(
        logprobs, old_logprobs, advantages, completion_mask, EPS_LOW, EPS_HIGH,
        loss_agg=loss_agg, max_len=max_len, ref_logprobs=ref_logprobs, kl_coef=beta,
        kl_importance_weight=kl_ratio,
    )
    ours.backward()
    our_grads = grads(model)
    assert 0.1 < metrics["clipfrac"] < 0.9  # the clip binds on some tokens, on both sides of 1
    if beta:
        assert metrics["kl"] > 0.01

    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids, "completion_mask": completion_mask,
        "advantages": advantages, "old_per_token_logps": old_logprobs,
        "ref_per_token_logps": ref_logprobs, "num_items_in_batch": completion_mask.sum(),
    }
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    trl_grads = grads(model)

    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_our_logprobs_equal_trls_fused_head(model_dir, tmp_path):
    trainer = make_trainer(model_dir, tmp_path, "dapo", 0.0)
    prompt_ids, completion_ids, completion_mask, *_ = batch(seed=1)
    ours = our_logprobs(trainer.model, prompt_ids, completion_ids, completion_mask)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], dim=1)
    theirs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 5)
    mask = completion_mask.bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_follow_trls_formula(scale):
    # TRL (grpo_trainer.py, "sum_then_normalize"): (R - group mean) / (nanstd + 1e-4), nanstd
    # with Bessel's correction; scale_rewards="none" skips the division.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.9, 0.4, 0.4], [3.0, 3.0, 3.0, 3.0]])
    trl = rewards - rewards.mean(1, keepdim=True)
    if scale == "std":
        trl = trl / (nanstd(rewards, dim=1, keepdim=True) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, scale=scale), trl, rtol=0, atol=1e-6)
