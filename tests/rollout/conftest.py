"""Shared fixtures for the rollout tests: one small tiny model, built once per session."""

from __future__ import annotations

import pytest
import torch

from looprl.train.models import load_model, load_tokenizer, resolve_model_path

# Small enough that a forward pass costs microseconds on CPU.
SMALL_TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Folder of the small tiny model, built once into the session's tmp cache
    (`LOOPRL_CACHE`, set by tests/conftest.py)."""
    return resolve_model_path("looprl/tiny", SMALL_TINY)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    return load_tokenizer(tiny_model_path)


@pytest.fixture
def model(tiny_model_path):
    """The untrained tiny model as loaded (a fresh copy per test)."""
    return load_model(tiny_model_path)


@pytest.fixture
def peaked_model(tiny_model_path, tokenizer):
    """The tiny model made to sample like a policy: peaked next-token distributions and
    an eos that ends a fair share of turns.

    An untrained tiny model is close to uniform, so a logprob computed at the wrong
    temperature would barely differ from the right one, and it almost never samples
    eos. Scaling the final norm sharpens the logits; an lm_head bias on eos makes some
    turns finish (stop token) while others are cut at max_new_tokens.
    """
    model = load_model(tiny_model_path)
    with torch.no_grad():
        model.model.norm.weight.mul_(4.0)
        head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        head.weight = model.lm_head.weight
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 3.0
        model.lm_head = head
    return model.eval()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny matmuls: one thread is faster, and OpenMP threads spinning on a shared CPU
    are up to 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
