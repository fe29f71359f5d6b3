"""An ExIt step: starting points replayed, one attempt played per episode, weights updated."""

from __future__ import annotations

import torch

from looprl.config import from_dict
from looprl.envs import format_tool_call, run_oracle
from looprl.rollout.engine import HFEngine
from looprl.rollout.exit_sampler import StartingPoint
from looprl.train.policy import build_policy
from looprl.train.recipes.exit import ExIt
from tests.helpers import make_context

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


def test_an_exit_step_trains_on_revisions_and_grows_the_buffer(monkeypatch, tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = from_dict({
        "output_dir": str(tmp_path), "seed": 0, "progress": False,
        "model": {"name": "looprl/tiny", "tiny": TINY}, "lora": {"enabled": False},
        "env": {"id": "looprl/Calc-v0", "max_tokens": 320},
        "rollout": {"tasks_per_step": 2, "group_size": 4, "max_new_tokens": 8},
        "algorithm": {"name": "grpo", "epochs": 1, "minibatch_size": 8},
        "optim": {"lr": 1e-2, "weight_decay": 0.0},
        "exit": {"enabled": True, "p_fresh": 0.0},
    })
    model, tokenizer = build_policy(cfg)
    engine = HFEngine(model, tokenizer)
    sampler = ExIt.sampler(cfg)
    wrong = [run_oracle("looprl/Calc-v0", 3)[0], format_tool_call("answer", {"value": -1})]
    sampler.add(StartingPoint(seed=3, history=tuple(wrong), attempts=1, score=0.1))
    seen = {}

    ctx = make_context(cfg, model, tokenizer, torch.optim.AdamW(model.parameters(), lr=1e-2), engine, sampler,
                       tmp_path)
    recipe = ExIt(ctx, fresh=True)

    def collect(*args, **kwargs):
        collection = exit_module_collect(*args, **kwargs)
        groups = collection.episodes
        seen["groups"] = groups
        for group in groups:  # an untrained model never succeeds: give the groups variance
            for k, t in enumerate(group):
                t.turn_rewards[-1] = float(k % 2)
        for group in collection.groups:
            group.observed = [["x"], None, ["y"], None]
        return collection

    exit_module_collect = recipe.player.collect
    recipe.player.collect = collect
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = recipe.step(ctx)

    revision, fresh = seen["groups"]
    prompt = revision[0].input_ids[:revision[0].turn_spans[0][0]]
    assert tokenizer.decode(prompt).count(wrong[1]) == 1  # the earlier attempt is prompt, not sampled
    assert all(t.loss_mask[:len(prompt)] == [0] * len(prompt) for t in revision)
    assert metrics["exit/revision_frac"] == 0.5 and metrics["exit/learnability_mean"] == 0.25
    assert metrics["train/optimizer_steps"] == 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert sampler.entries[0].score == 0.25  # re-scored
    assert [(e.seed, e.history, e.attempts) for e in sampler.entries[1:]][0][1:] in {(("x",), 2), (("y",), 2)}
    assert sampler.entries[2].attempts == 1  # the fresh task's child
