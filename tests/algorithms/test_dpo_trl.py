"""`dpo_loss` equals TRL's `DPOTrainer._compute_loss` (trl 1.16) on single-turn pairs.

Each test builds a `DPOTrainer` around a tiny Qwen2 policy and a differently initialised
reference (so the log-ratios are not zero), both built from a config and saved in a tmp
folder, and collates two (prompt, chosen, rejected) pairs with TRL's own tokenisation and
collator. TRL scores them with its fused LM head; our side recomputes the per-token
logprobs from each model's logits (`core.token_logprobs`), sums them with
`sequence_logps` under TRL's completion mask, and calls `dpo_loss`. Loss, policy
gradients and the `rewards/*` metrics must agree.

Covered: `loss_type="sigmoid"` (DPO eq. 7) at two betas. TRL 1.16's "sigmoid" ignores
`label_smoothing`; conservative DPO's smoothed loss survives in its "aot_unpaired" (and
"aot") loss, which sorts the log-ratios over the batch first: with one pair the sort is the
identity, so that is where our `label_smoothing` is checked. Not covered: TRL's other
loss types (hinge, ipo, robust, exo_pair, ...), `ld_alpha`, `use_weighting` and the
f-divergence variants, which `dpo_loss` does not implement.
"""

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from looprl.algorithms.core import token_logprobs
from looprl.algorithms.dpo import dpo_loss, sequence_logps
from tests.algorithms.tiny_word_model import save_tiny_word_model

PAIRS = {
    "prompt": ["w1 w2", "w3"],
    "chosen": [" w5 w6", " w7 w8 w9"],
    "rejected": [" w10", " w11 w12 w13 w14"],
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Policy (seed 0) and reference (seed 1) tiny Qwen2s with a word-level tokenizer."""
    return {name: save_tiny_word_model(tmp_path_factory.mktemp(name), seed)
            for seed, name in [(0, "policy"), (1, "ref")]}


def make_trainer(model_dirs, tmp_path, loss_type: str, beta: float, label_smoothing: float) -> DPOTrainer:
    args = DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=2,
        loss_type=[loss_type], beta=beta, label_smoothing=label_smoothing,
    )
    return DPOTrainer(
        model=str(model_dirs["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(model_dirs["ref"]),
        args=args,
        train_dataset=Dataset.from_dict(PAIRS),
        processing_class=PreTrainedTokenizerFast.from_pretrained(model_dirs["policy"]),
    )


def our_sequence_logps(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-prob sums; TRL's batch is [chosen rows..., rejected rows...]."""
    input_ids = inputs["input_ids"]
    logits = model(input_ids=input_ids, attention_mask=inputs["attention_mask"]).logits  # (2B, L, V)
    logps = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # (2B, L - 1): token t+1 given its prefix
    return sequence_logps(logps, inputs["completion_mask"][:, 1:]).chunk(2)


@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing", "n_pairs"), [
    ("sigmoid", 0.1, 0.0, 2),
    ("sigmoid", 0.5, 0.0, 2),
    ("aot_unpaired", 0.5, 0.2, 1),  # one pair: cDPO's label smoothing
])
def test_dpo_loss_equals_trl(model_dirs, tmp_path, loss_type, beta, label_smoothing, n_pairs):
    trainer = make_trainer(model_dirs, tmp_path, loss_type, beta, label_smoothing)
    model = trainer.model
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(n_pairs)])
    assert inputs["completion_mask"].sum(1).unique().numel() > 1  # completions of different lengths

    chosen, rejected = our_sequence_logps(model, inputs)
    with torch.no_grad():
        ref_chosen, ref_rejected = our_sequence_logps(trainer.ref_model, inputs)
    ours, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, label_smoothing=label_smoothing)
    ours.backward()
    our_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    assert abs(metrics["rewards/margins"]) > 1e-3  # the policy and the reference differ

    theirs = trainer._compute_loss(model, inputs, return_outputs=False)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    trl_metrics = trainer._metrics["train" if model.training else "eval"]
    for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]:
        assert metrics[key] == pytest.approx(trl_metrics[key][-1], abs=1e-6), key


def test_trl_sigmoid_ignores_label_smoothing(model_dirs, tmp_path):
    # Why label smoothing is checked against "aot_unpaired" above: TRL 1.16's "sigmoid" is
    # plain eq. 7 whatever label_smoothing says (older TRL applied cDPO there).
    trainer = make_trainer(model_dirs, tmp_path, "sigmoid", 0.5, 0.2)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        chosen, rejected = our_sequence_logps(trainer.model, inputs)
        ref_chosen, ref_rejected = our_sequence_logps(trainer.ref_model, inputs)
        theirs = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    plain, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    smoothed, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5, label_smoothing=0.2)
    torch.testing.assert_close(plain, theirs, rtol=0, atol=1e-6)
    assert abs(smoothed.item() - theirs.item()) > 1e-3
