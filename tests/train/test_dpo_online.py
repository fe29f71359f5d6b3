"""Online DPO's step on hand-made trajectories and a tiny model: pairs, masking, updates."""

from __future__ import annotations

import copy
import random

import pytest
import torch

import looprl.train.recipes.online_dpo as dpo_online
from looprl.algorithms import build_algorithm
from looprl.algorithms.core import token_logprobs
from looprl.config import from_dict
from looprl.rollout.collect import Collection, PlayedGroup
from looprl.rollout.sampler import TaskSampler
from looprl.train import update as update_module
from looprl.train.batch import collate
from looprl.train.policy import build_policy
from looprl.train.recipes.online_dpo import OnlineDPO, Reference, build_reference
from looprl.train.update import episode_logps, update_on_pairs
from looprl.types import Trajectory
from tests.helpers import make_context

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def config(**algorithm):
    return from_dict({"model": {"tiny": TINY}, "lora": {"enabled": False}, "sft": {"steps": 0},
                      "optim": {"lr": 1e-2, "weight_decay": 0.0, "grad_clip": 1.0},
                      "algorithm": {"name": "dpo", "epochs": 1, "minibatch_size": 4, **algorithm}})


def trajectory(rng: random.Random, vocab: int, prompt: int = 6, sampled: int = 5, obs: int = 4,
               reward: float = 0.0) -> Trajectory:
    """prompt, then a sampled turn (mask 1), then an observation (mask 0)."""
    n = prompt + sampled + obs
    mask = [0] * prompt + [1] * sampled + [0] * obs
    return Trajectory([rng.randrange(3, vocab) for _ in range(n)], mask, [0.0] * n,
                      turn_spans=[(prompt, prompt + sampled)], turn_rewards=[reward])


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    cfg = config()
    model, tokenizer = build_policy(cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  weight_decay=0.0)
    return cfg, model, tokenizer, optimizer


def weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_sequence_logp_sums_only_the_sampled_tokens(setup):
    cfg, model, tokenizer, _ = setup
    rng = random.Random(0)
    traj = trajectory(rng, len(tokenizer))
    batch = collate([traj], tokenizer.pad_token_id)
    with torch.no_grad():
        all_tokens = token_logprobs(model(input_ids=batch.input_ids).logits[:, :-1], batch.input_ids[:, 1:])[0]
        got = episode_logps(lambda b: token_logprobs(model(input_ids=b.input_ids).logits[:, :-1],
                                                     b.input_ids[:, 1:]), [traj], tokenizer.pad_token_id, None)
    sampled = all_tokens[5:10]  # targets 6..10 are the sampled tokens
    torch.testing.assert_close(got[0], sampled.sum())
    assert not torch.isclose(got[0], all_tokens.sum())


def test_pairs_that_differ_only_in_observations_give_no_gradient(setup):
    """Chosen and rejected sample the same tokens and differ only in the tool output that
    follows: with the loss mask their log-ratios are equal and the gradient is 0 (up to
    float rounding). Counting observation tokens would make them differ; a pair that
    differs in one sampled token does get a gradient."""
    cfg, model, tokenizer, optimizer = setup
    rng = random.Random(1)
    chosen = trajectory(rng, len(tokenizer), reward=1.0)
    other = [rng.randrange(3, len(tokenizer)) for _ in range(4)]
    obs_only = Trajectory(chosen.input_ids[:11] + other, chosen.loss_mask, chosen.behaviour_logprobs,
                          chosen.turn_spans, [0.0])
    ids = list(chosen.input_ids)
    ids[8] = 3 if ids[8] != 3 else 4  # a sampled token
    sampled_differs = Trajectory(ids, chosen.loss_mask, chosen.behaviour_logprobs, chosen.turn_spans, [0.0])
    assert obs_only.input_ids != chosen.input_ids
    algorithm, reference = build_algorithm(cfg), Reference(model, copy.deepcopy(model))
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)  # measure gradients, move nothing
    same = update_on_pairs(cfg, algorithm, model, tokenizer.pad_token_id, sgd, reference, [(chosen, obs_only)])
    differs = update_on_pairs(cfg, algorithm, model, tokenizer.pad_token_id, sgd, reference,
                              [(chosen, sampled_differs)])
    assert same["train/optimizer_steps"] == 1
    assert same["train/grad_norm"] < 1e-6
    assert differs["train/grad_norm"] > 1e-3


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_update_on_pairs_moves_the_policy_towards_the_chosen(tmp_path, loss_type):
    torch.manual_seed(0)
    cfg = config(loss_type=loss_type, epochs=3, micro_batch_tokens=40)  # several micro-batches per minibatch
    model, tokenizer = build_policy(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=0.0)
    reference = build_reference(cfg, model, tmp_path, fresh=True)
    assert (tmp_path / dpo_online.REFERENCE_FILE).is_file()
    rng = random.Random(2)
    pairs = [(trajectory(rng, len(tokenizer), reward=1.0), trajectory(rng, len(tokenizer))) for _ in range(6)]
    before = weights(model)
    metrics = update_on_pairs(cfg, build_algorithm(cfg), model, tokenizer.pad_token_id, optimizer, reference, pairs)
    assert metrics["train/optimizer_steps"] == 3 * 2  # 6 pairs, minibatches of 4, 3 epochs
    for key in ("train/dpo_loss", "train/reward_accuracy", "train/reward_margin", "train/chosen_reward",
                "train/rejected_reward", "train/grad_norm"):
        assert key in metrics
    after = weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # The reference did not move, and the policy now prefers the chosen side.
    assert all(torch.equal(before[k], v) for k, v in reference.frozen.named_parameters())
    again = update_on_pairs(cfg.model_copy(update={"algorithm": cfg.algorithm.model_copy(update={"epochs": 1})}),
                            build_algorithm(cfg), model, tokenizer.pad_token_id, optimizer, reference, pairs)
    assert again["train/reward_margin"] > 0 and again["train/reward_accuracy"] > 0.5
    # A resumed run reloads the same frozen reference.
    reloaded = build_reference(cfg, model, tmp_path, fresh=False)
    assert all(torch.equal(before[k], v) for k, v in reloaded.frozen.named_parameters())


def test_dpo_step_pairs_best_and_worst_and_skips_tied_groups(setup, monkeypatch):
    cfg, model, tokenizer, optimizer = setup
    rng = random.Random(3)
    rewards = [[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.2, 0.0, 0.2]]
    groups = [[trajectory(rng, len(tokenizer), reward=r) for r in row] for row in rewards]
    seen = []
    real = update_module.update_on_pairs

    def spy(cfg, algorithm, model, pad_id, optimizer, reference, pairs, **kwargs):
        seen.extend(pairs)
        return real(cfg, algorithm, model, pad_id, optimizer, reference, pairs, **kwargs)

    monkeypatch.setattr(dpo_online, "update_on_pairs", spy)
    engine = type("Engine", (), {"version": 0})()
    ctx = make_context(cfg, model, tokenizer, optimizer, engine, TaskSampler(0))
    recipe = OnlineDPO.__new__(OnlineDPO)  # without building its player and reference: both are given here
    recipe.reference = Reference(model, copy.deepcopy(model))
    recipe.player = type("Player", (), {"collect": lambda self, seeds, k: Collection(
        [PlayedGroup(i, s, g) for i, (s, g) in enumerate(zip(seeds, groups))], [], {})})()
    metrics = recipe.step(ctx)
    assert metrics["rollout/pairs"] == 2
    assert seen == [(groups[0][1], groups[0][0]), (groups[3][0], groups[3][1])]
    assert metrics["train/optimizer_steps"] == 1 and metrics["rollout/kept_frac"] == 4 / 12


def test_with_lora_the_reference_is_the_adapter_free_model(tmp_path):
    torch.manual_seed(0)
    cfg = from_dict({"model": {"tiny": TINY}, "lora": {"enabled": True, "r": 4, "alpha": 8}, "sft": {"steps": 0},
                     "optim": {"lr": 1e-2, "weight_decay": 0.0},
                     "algorithm": {"name": "dpo", "epochs": 2, "minibatch_size": 4}})
    model, tokenizer = build_policy(cfg)
    reference = build_reference(cfg, model, tmp_path, fresh=True)
    assert reference.frozen is None and not (tmp_path / dpo_online.REFERENCE_FILE).exists()
    rng = random.Random(4)
    pairs = [(trajectory(rng, len(tokenizer), reward=1.0), trajectory(rng, len(tokenizer))) for _ in range(4)]
    episodes = [t for p in pairs for t in p]

    def ref_logps():
        return episode_logps(lambda b: reference.logprobs(b, 1.0), episodes, tokenizer.pad_token_id, None)

    before = ref_logps()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    metrics = update_on_pairs(cfg, build_algorithm(cfg), model, tokenizer.pad_token_id, optimizer, reference, pairs)
    assert metrics["train/optimizer_steps"] == 2
    torch.testing.assert_close(ref_logps(), before)  # the adapter moved; the reference did not
    policy = episode_logps(lambda b: update_module.policy_logprobs(model, b), episodes, tokenizer.pad_token_id, None)
    assert not torch.allclose(policy, before)


def test_episode_logps_do_not_depend_on_how_episodes_are_batched(setup):
    cfg, model, tokenizer, _ = setup
    rng = random.Random(5)
    episodes = [trajectory(rng, len(tokenizer), prompt=p, sampled=s, obs=o)
                for p, s, o in [(3, 4, 2), (8, 6, 5), (5, 2, 9), (4, 9, 1)]]
    fn = lambda b: update_module.policy_logprobs(model, b)  # noqa: E731
    with torch.no_grad():
        together = episode_logps(fn, episodes, tokenizer.pad_token_id, None)
        packed = episode_logps(fn, episodes, tokenizer.pad_token_id, max_tokens=40)
        alone = torch.cat([episode_logps(fn, [e], tokenizer.pad_token_id, None) for e in episodes])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
