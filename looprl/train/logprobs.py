"""Per-token log-probs (and entropies) of a causal LM without its full logits.

The plain way, `token_logprobs(model(ids).logits, targets)`, holds the (tokens x
vocabulary) logits at once, in float32: at a 150k vocabulary that is 600 kB a token,
far more than the rest of a small policy's activations. Here the model's body runs
once to give the final hidden states, and the LM head then projects them a chunk of
tokens at a time; each chunk is reduced to a log-prob (and an entropy) per token
before the next one is projected. Each chunk runs under `torch.utils.checkpoint`, so
the backward recomputes that chunk's logits instead of keeping them all, and writes
their gradient into one buffer: only the hidden states and one chunk's logits (and, in
the backward, their gradient) are ever alive.

The idea is that of Liger-Kernel's fused linear cross entropy and of torchtune's
chunked output loss (`CEWithChunkedOutputLoss`); verl computes its entropy from the
logits the same way (logsumexp minus the expected logit). This version stays in
PyTorch and goes through the LM head *module*, not its weight, so a LoRA adapter on
the head (or a bias) is honoured, and so are tied embeddings.

Models whose logits are not `head(body(ids).last_hidden_state)` (up to a final logit
softcapping, which is applied here) take the full-logits path instead, with a warning
that says why: which is which is checked once per model on a short probe.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from looprl.algorithms.core import token_logprobs

logger = logging.getLogger(__name__)

# Logits per chunk, by default: 256 MiB of float32, 384 tokens at a 152k vocabulary. The
# backward holds two such tensors at once (the recomputed logits and their gradient), so
# this bounds the pass's logit memory near 0.5 GB whatever the batch. A budget in logits,
# not tokens, as Liger-Kernel sizes its chunks by the vocabulary.
CHUNK_LOGITS = 1 << 26
PROBE_TOKENS = 8

# Per transformers model: None when the chunked path reproduces its logits, else why not.
_SUPPORT: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


def token_logprobs_chunked(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` under `model` at `temperature`, projecting a chunk of tokens at a time.

    Position t of the output is about the distribution the model predicts after
    `input_ids[:, : t + 1]`, so next-token log-probs take `targets=input_ids[:, 1:]`.
    Gradients flow to every parameter as through the full logits.

    Args:
        model: a transformers causal LM, possibly wrapped by peft (an adapter disabled
            with `disable_adapter()` stays disabled here). Anything else takes the
            full-logits path.
        input_ids: (B, L) token ids.
        attention_mask: (B, L) 1 on real tokens, or None.
        targets: (B, T) ids, T <= L, aligned with the first T positions.
        temperature: the logits are divided by it (after any final softcapping).
        chunk_tokens: tokens projected through the LM head at once; None: as many as
            make `CHUNK_LOGITS` logits (`default_chunk_tokens`). `token_logprobs_full`
            is the unchunked path.
        with_entropy: also return the entropy of each position's distribution.

    Returns:
        (B, T) float32 log-probs, and with `with_entropy` a (B, T) float32 entropy.
    """
    if targets.dim() != 2 or targets.shape[0] != input_ids.shape[0] or targets.shape[1] > input_ids.shape[1]:
        raise ValueError(f"Expected targets (B, T) with T <= L for input_ids {tuple(input_ids.shape)}, "
                         f"actually {tuple(targets.shape)}")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"Expected chunk_tokens >= 1 or None, actually {chunk_tokens}")
    parts = lm_parts(model)
    if parts is None:
        return token_logprobs_full(model, input_ids, attention_mask, targets, temperature, with_entropy)
    body, head, softcap = parts
    chunk_tokens = chunk_tokens or default_chunk_tokens(model)
    batch, length = targets.shape
    # use_cache=False: a training pass must not also build a KV cache of every layer.
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    flat_hidden = hidden[:, :length].reshape(batch * length, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    # Recompute in the backward only when there is a backward: without one, each chunk's
    # logits are freed as soon as it is reduced anyway.
    needs_grad = torch.is_grad_enabled() and (
        flat_hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    outs = []
    for start in range(0, flat_targets.numel(), chunk_tokens):
        args = (head, softcap, temperature, with_entropy,
                flat_hidden[start:start + chunk_tokens], flat_targets[start:start + chunk_tokens])
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if needs_grad else _chunk(*args))
    if not outs:  # no targets: an empty result, still attached to the graph as the full path's is
        empty = flat_hidden.float().sum(-1).view(batch, length)
        return (empty, empty.clone()) if with_entropy else empty
    if with_entropy:
        return (torch.cat([o[0] for o in outs]).view(batch, length),
                torch.cat([o[1] for o in outs]).view(batch, length))
    return torch.cat(outs).view(batch, length)


def token_logprobs_full(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The same as `token_logprobs_chunked` from the model's full (B, T, V) logits.

    The fallback for models the chunked path does not cover, and the reference it is
    tested against. Only `model(input_ids=..., attention_mask=...).logits` is assumed.
    """
    length = targets.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :length].float()
    # float32 before the temperature, as the sampler does: the same numbers it sampled from.
    if temperature != 1.0:
        logits = logits / temperature
    return _reduce(logits, targets, with_entropy)


def default_chunk_tokens(model) -> int:
    """Tokens per chunk when none is asked: `CHUNK_LOGITS` logits, in multiples of 64 rows
    (at least 64) so the head's matmul stays a well-shaped one."""
    vocab = getattr(_unwrap(model).get_output_embeddings(), "out_features", None) or _text_config(model).vocab_size
    return max(64, CHUNK_LOGITS // vocab // 64 * 64)


def lm_parts(model) -> tuple[torch.nn.Module, torch.nn.Module, float | None] | None:
    """`(body, head, softcap)` such that `model`'s logits are `softcap(head(body(...).last_hidden_state))`.

    None (with a warning, once per model) when `model` is not such a transformers
    causal LM; `chunked_support` says why.
    """
    inner = _unwrap(model)
    reason = chunked_support(model)
    if reason is not None:
        return None
    return inner.base_model, inner.get_output_embeddings(), _softcap(inner)


def chunked_support(model) -> str | None:
    """None when the chunked path reproduces `model`'s logits; else the reason it does not.

    Checked once per model (a later change to its modules is not seen): structurally (a transformers `...ForCausalLM` with a body
    and an output-embedding module), then numerically, on a short probe, against the
    model's own logits, which catches any post-processing of the logits this module
    does not know of (Cohere's `logit_scale`, Granite's `logits_scaling`, ...).
    """
    inner = _unwrap(model)
    if _fsdp_sharded(model) or _fsdp_sharded(inner):
        # FSDP2 gathers the embeddings and the head in the root module's forward, which
        # calling the body and the head apart would bypass.
        return "it is sharded with FSDP2 (the root module's forward gathers the head's weights)"
    # Prompt tuning and prefix tuning happen in peft's wrapper, which the body and head bypass.
    prompt = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    key = model if prompt else inner
    try:
        return _SUPPORT[key]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable
        pass
    if prompt:
        reason = "its peft adapter is prompt learning: the wrapper, not the model, adds the virtual tokens"
    else:
        reason = _structural_reason(inner) or _probe_reason(inner)
    if reason is not None:
        logger.warning("Log-probs of %s take the full-logits path (every token's logits at once): %s",
                       type(inner).__name__, reason)
    try:
        _SUPPORT[key] = reason
    except TypeError:
        pass
    return reason


def _fsdp_sharded(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def _unwrap(model):
    """The transformers model under a peft wrapper; its modules carry the adapter in place."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for this module
        return model
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _structural_reason(inner) -> str | None:
    from transformers import PreTrainedModel

    if not isinstance(inner, PreTrainedModel):
        return f"{type(inner).__name__} is not a transformers model"
    if not type(inner).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return f"{type(inner).__name__} is not a causal LM class"
    if inner.base_model is inner:
        return "it has no separate body (base_model)"
    if not isinstance(inner.get_output_embeddings(), torch.nn.Module):
        return "it has no output-embedding module (get_output_embeddings)"
    return None


def _probe_reason(inner) -> str | None:
    """Compare the model's logits with head(body(...)) on a few tokens."""
    param = next(inner.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    vocab = getattr(inner.get_input_embeddings(), "num_embeddings", 2)
    ids = (torch.arange(PROBE_TOKENS, device=device) * 7919 % vocab).unsqueeze(0)
    mask = torch.ones_like(ids)
    # In eval mode for the probe: two forwards under dropout would differ by chance.
    modes = [(m, m.training) for m in inner.modules()]
    try:
        inner.eval()
        with torch.no_grad():
            expected = inner(input_ids=ids, attention_mask=mask).logits.float()
            hidden = inner.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            got = _head_logits(inner.get_output_embeddings(), _softcap(inner), hidden[0]).unsqueeze(0)
    except Exception as e:  # any failure of the structural guess means: use the model's own forward
        return f"the body and head do not run on their own ({type(e).__name__}: {e})"
    finally:
        for m, training in modes:
            m.training = training
    if got.shape != expected.shape:
        return f"head(body) gives shape {tuple(got.shape)}, the model {tuple(expected.shape)}"
    # The same ops on the same inputs: only the matmul's blocking may differ, by a rounding
    # of the model's dtype. Any scaling of the logits is far above this.
    tolerance = 2 * torch.finfo(hidden.dtype).eps * (1 + expected.abs().max().item()) + 1e-5
    error = (got - expected).abs().max().item()
    if not error <= tolerance:
        return f"head(body) differs from the model's logits by {error:.3g} (> {tolerance:.3g})"
    return None


def _text_config(model):
    config = _unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _softcap(inner) -> float | None:
    return getattr(_text_config(inner), "final_logit_softcapping", None)


def _head_logits(head, softcap: float | None, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of `hidden` with the model's final softcapping (Gemma 2's tanh)."""
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk(head, softcap, temperature, with_entropy, hidden, targets):
    """One chunk's (n,) log-probs (and entropies): its (n, V) logits die here."""
    logits = _head_logits(head, softcap, hidden)
    if temperature != 1.0:
        logits = logits / temperature
    out = _LogprobsFromLogits.apply(logits, targets, with_entropy)
    return out if with_entropy else out[0]


class _LogprobsFromLogits(torch.autograd.Function):
    """`_reduce` with a hand-written backward that builds one (n, V) gradient buffer in place.

    Autograd's own backward of gather - logsumexp allocates several (n, V) temporaries
    (the scattered one-hot, z - lse, its exp, their sum); writing the gradient
    softmax(z) * c + onehot * g into one buffer, as Liger-Kernel's fused linear cross
    entropy does, halves the chunk's peak in the backward. With the entropy, whose
    gradient is -softmax(z) (z - E[z]), it takes a second buffer.
    """

    @staticmethod
    def forward(ctx, logits, targets, with_entropy):
        lse = torch.logsumexp(logits, dim=-1)
        logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        if not with_entropy:
            ctx.save_for_backward(logits, targets, lse)
            return logprobs, None
        mean = (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1)  # E_softmax(z)[z]
        ctx.save_for_backward(logits, targets, lse, mean)
        return logprobs, lse - mean

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        logits, targets, lse, *mean = ctx.saved_tensors
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        # d logprob / dz = onehot - p: -g p, then + g at the target.
        grad = torch.sub(logits, lse.unsqueeze(-1)).exp_()  # p, the one buffer
        if mean and grad_entropy is not None:
            # d entropy / dz = -p (z - E[z]), so the whole gradient is p (-g_lp - g_H (z - E[z])).
            coef = torch.addcmul((grad_entropy * mean[0] - grad_logprobs).unsqueeze(-1), logits,
                                 grad_entropy.unsqueeze(-1), value=-1)
            grad.mul_(coef)
            del coef
        else:
            grad.mul_(-grad_logprobs.unsqueeze(-1))
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logprobs.unsqueeze(-1))
        return grad, None, None


def _reduce(logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
    """Log-probs of `targets` (as `core.token_logprobs`), and the entropy
    H = logsumexp(z) - sum softmax(z) z (as verl computes it from logits), sharing one
    logsumexp and never building the log-softmax tensor."""
    if not with_entropy:
        return token_logprobs(logits, targets)
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1)
    return logprobs, entropy
