"""A tiny recipe trains with `rollout.engine=openai` against `looprl serve` on loopback,
which loads the weights the run publishes after every step."""

from __future__ import annotations

import httpx
import pytest
import torch

from looprl.train.metrics import read_metrics
from looprl.train.models import load_model, load_tokenizer, resolve_model_path
from looprl.train.policy import load_trainable_state
from looprl.train.trainer import train
from tests.recipes.test_recipes import TINY, final_state, tiny_recipe
from tests.rollout.test_serve import looprl_serve

MODEL = "tiny-served"


@pytest.fixture()
def weights_server(tmp_path):
    """`looprl serve --accept-weights` on the tiny model the recipe starts from."""
    folder = resolve_model_path("looprl/tiny", TINY)
    with looprl_serve(folder, tmp_path / "serve.log", "--served-model-name", MODEL, "--accept-weights") as url:
        yield url, folder


def test_a_tiny_recipe_trains_against_looprl_serve_which_serves_the_published_weights(tmp_path, weights_server):
    url, folder = weights_server
    cfg = tiny_recipe(tmp_path, rollout={"engine": "openai", "openai_url": url, "openai_model": MODEL},
                      train={"steps": 2})
    train(cfg)
    records = [r for r in read_metrics(cfg.run_dir) if "rollout/reward_mean" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert [r["policy_version"] for r in records] == [2, 3]  # SFT's weights were the first published
    assert sum(r["train/optimizer_steps"] for r in records) > 0

    # The server now samples from the run's final weights: its greedy turn is the trained model's.
    tokenizer = load_tokenizer(folder)
    trained = load_model(folder)
    load_trainable_state(trained, final_state(cfg.run_dir)[1])
    untrained = load_model(folder)
    prompt = tokenizer.encode("Compute 1 + 2.", add_special_tokens=False)
    answer = httpx.post(f"{url}/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 12,
                                                    "temperature": 0, "logprobs": 0, "return_token_ids": True},
                        timeout=60).json()
    served = answer["choices"][0]["token_ids"]
    served_logprobs = answer["choices"][0]["logprobs"]["token_logprobs"]

    def logprobs_of(model) -> torch.Tensor:
        """The model's logprobs of the served greedy tokens."""
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + served])).logits[0, len(prompt) - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(served)[:, None])[:, 0]

    torch.testing.assert_close(torch.tensor(served_logprobs), logprobs_of(trained), atol=1e-4, rtol=0)
    # Training moved those logprobs, so the check above fails on a server left with the initial weights.
    assert (logprobs_of(trained) - logprobs_of(untrained)).abs().max() > 1e-3


def test_eval_with_the_openai_engine_gives_the_hf_engines_greedy_records(tmp_path, weights_server):
    import json

    from looprl.cli import main

    url, folder = weights_server
    common = ["eval", "--model", folder, "--env", "looprl/Calc-v0", "max_operand=2", "--episodes", "5",
              "--temperature", "0", "--max-new-tokens", "12", "--max-tokens", "192"]
    assert main([*common, "--out", str(tmp_path / "hf.json")]) == 0
    assert main([*common, "--engine", "openai", "--openai-url", url, "--served-model", MODEL,
                 "--out", str(tmp_path / "openai.json")]) == 0
    hf, remote = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("hf", "openai"))
    assert [r["seed"] for r in remote["records"]] == list(range(5))
    assert remote["records"] == hf["records"]
