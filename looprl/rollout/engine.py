"""Inference engines: `async generate(requests) -> completions` with token ids and logprobs.

`HFEngine` runs a transformers model in-process. Episodes call `generate` concurrently
from asyncio tasks; the engine gathers the pending requests into one batched decode
(its own loop with the prefix cache below, else one left-padded `model.generate`), so
N concurrent episodes cost one forward per token instead of N. The logprob it records
for a sampled token is under the exact distribution it sampled from (temperature
applied, no top-k/top-p truncation and none of the model's generation-config
processors), which is what the PPO ratio needs.

Batching is turn-level and continuous: while a batch generates, new requests queue;
when it ends, the next batch is taken from everything queued (oldest first, one set of
sampling params per batch, at most `max_batch_size` rows). Before taking a batch the
engine waits for the episodes that are away in an environment call (see
`looprl.rollout.turns`), so that a batch holds one turn of every live episode and runs
reproduce exactly, however loaded the machine; `turn_wait_s` bounds that wait for slow
tools, at the price of batches that depend on timing.

Seeded requests (evaluation's): a request with a `seed` samples from a stream of its own,
one uniform per token drawn from a CPU generator seeded with it, at which the row's CDF is
inverted (`seeded_tokens`), in both decoding paths. What it samples then depends on no other
row, so an evaluation episode's outcome does not depend on the batch size or on the other
episodes played with it (up to a near-tie flipped by batched float arithmetic). Unseeded
requests (training's rollouts) draw from the process's torch stream with `torch.multinomial`,
as they always have; the two kinds never share a batch.

Prefix cache: an episode's next turn starts with everything its last turn saw and
sampled, so the engine keeps each live episode's keys and values after its turn and
feeds only the new tokens (the tool result and the chat template around it) next time,
instead of re-reading the whole context. A batch then mixes rows with different cached
lengths: each row's cache is left-padded to the longest and its new tokens follow it,
with the gap masked and explicit position ids. The cache is dropped when the episode
ends, when the weights change (a new version) and whenever the prompt no longer extends
what was cached (only the common prefix is reused). Models whose attention is not full
attention on every layer (sliding windows, state-space layers) decode through
`model.generate` without it.

Shared prefix (`shared_prefix=True`, off by default): the rows of a batch that have nothing
cached (first turns) and whose prompts start alike (the system prompt and the tools'
signatures, a group's task) reuse one prefill of their common prefix, as vLLM's automatic
prefix caching does. A key's value depends only on the tokens before it, so this is exact
up to float rounding (a batch of one against a batch of many): the distributions sampled
are the same, the tokens not always bit for bit those of a run without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import inspect
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicLayer

from looprl.rollout.turns import EpisodeTurn, current_episode, turn_board


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one turn.

    Attributes:
        max_new_tokens: the most tokens one turn may have.
        temperature: softmax temperature; 0 means greedy decoding.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"Expect `max_new_tokens` to be positive, actually: {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"Expect `temperature` to be >= 0, actually: {self.temperature}")


@dataclass(frozen=True)
class GenerationRequest:
    """One turn to sample.

    Attributes:
        prompt_ids: the context, as token ids.
        params: how to sample it.
        seed: None draws from the process's torch random stream (training's rollouts), so
            a token depends on every row drawn before it; a seed gives the turn a stream of
            its own (`seeded_tokens`), so what it samples does not depend on the batch it
            lands in (evaluation's episodes).
    """

    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None = None


def stream_seed(*parts: int) -> int:
    """A 63-bit seed naming one random stream, e.g. `(sampling seed, task seed, sample, turn)`:
    the same on every machine and Python version (no `hash()`), and unrelated for nearby parts.

    >>> stream_seed(1234, 0, 0) == stream_seed(1234, 0, 0) != stream_seed(1234, 0, 1)
    True
    """
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def turn_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(B, steps) float64 uniforms, row i drawn from a CPU generator seeded with `seeds[i]`:
    row i's draws are the same whatever the other rows, the batch size or the device."""
    return torch.stack([torch.rand(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
                        for seed in seeds])


def seeded_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one token per row of `probs` (B, V) by inverting its CDF at `uniforms` (B,).

    Inverse-CDF sampling gives row i the token whose cumulative probability first exceeds
    `uniforms[i]`: distributed as `probs[i]`, and a function of that row alone. Zero-probability
    tokens are never chosen.
    """
    cdf = probs.double().cumsum(-1)  # (B, V)
    at = (uniforms.to(cdf.device) * cdf[:, -1])[:, None]  # scaled: the sum may miss 1 in the last bits
    return torch.searchsorted(cdf, at, right=True)[:, 0].clamp(max=probs.shape[-1] - 1)


@dataclass(frozen=True)
class Completion:
    """What the engine sampled for one request.

    Attributes:
        token_ids: sampled ids, ending with the stop token when `finished`.
        logprobs: log-probability of each sampled id under the sampling distribution.
        finished: a stop token ended the turn (False: cut at `max_new_tokens`).
        version: the policy version of the weights that sampled it.
    """

    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    version: int


class InferenceEngine(Protocol):
    version: int

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]: ...

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None: ...


@dataclass(eq=False)
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    ticket: int  # serving order (see looprl.rollout.turns)
    episode: EpisodeTurn | None  # None: asked outside run_episode
    arrived: float


MIN_SHARED_TOKENS = 16  # a shorter common prefix is not worth its own forward


STAT_KEYS = ("generate_calls", "sequences", "sampled_tokens", "row_steps", "busy_s", "queue_wait_s", "hold_s",
             "prompt_tokens", "cached_tokens")


@dataclass(eq=False)
class _Prefix:
    """One episode's cached context: `ids` and, per layer, their keys and values
    (each `(kv_heads, len(ids), head_dim)`), computed by the weights of `version`."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    version: int


class HFEngine:
    """In-process transformers engine that batches the requests of concurrent episodes.

    `stats` counts, since the engine was made: `generate_calls`, `sequences` (requests
    served), `sampled_tokens` (kept: up to each row's stop token), `row_steps` (rows x
    decode steps of every call), `busy_s` (seconds inside `generate_batch`),
    `queue_wait_s` (summed seconds requests waited for their batch), `hold_s`
    (seconds a batch was held for episodes in environment calls), `prompt_tokens`
    (prompt tokens of all requests) and `cached_tokens` (of those, the ones the prefix
    cache held). `metrics()` turns them into the `perf/engine_*` figures a trainer logs.

    Args:
        model: a causal LM (plain or peft-wrapped). The trainer may share this object:
            then `update_weights()` only bumps the version.
        tokenizer: its tokenizer (for the pad id and stop ids).
        max_batch_size: the most sequences in one `generate` call.
        turn_wait_s: None (the default): a batch waits for every live episode in an
            environment call, so batches depend on the episodes alone and a run
            reproduces on a loaded machine. A number: the longest a batch waits for an
            episode that has made no progress; slower calls no longer hold the others
            back (for slow tools), but then which batch a turn lands in depends on timing.
        prefix_cache: keep each live episode's keys and values between its turns (see
            the module doc), decoding with the engine's own loop; False decodes
            through `model.generate`. Runs with and without it sample from the same
            distributions but, their floating-point sums differing in the last bits,
            not always the same tokens.
        shared_prefix: first turns whose prompts start alike prefill their common prefix
            once (see the module doc); needs the engine's own decoding (`prefix_cache`).
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 64, turn_wait_s: float | None = None,
                 prefix_cache: bool = True, shared_prefix: bool = False):
        if max_batch_size <= 0:
            raise ValueError(f"Expect `max_batch_size` to be positive, actually: {max_batch_size}")
        if turn_wait_s is not None and turn_wait_s < 0:
            raise ValueError(f"Expect `turn_wait_s` to be >= 0, actually: {turn_wait_s}")
        self.model = model
        self.device = next(model.parameters()).device  # every tensor of a batch is created or moved there
        self.max_batch_size = max_batch_size
        self.turn_wait_s = turn_wait_s
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.version = 0
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.prefix_cache = self.own_decoding = prefix_cache and decodes_with_cache(model)
        self.shared_prefix = shared_prefix and self.own_decoding
        self._logits_to_keep = _accepts(model, "logits_to_keep")
        # transformers 5.x names the forward's cache argument `cache`, earlier ones `past_key_values`.
        self._cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"
        self._prefixes: weakref.WeakKeyDictionary[EpisodeTurn, _Prefix] = weakref.WeakKeyDictionary()
        self._prefix_lock = threading.Lock()  # the loop frees prefixes while a batch runs in a thread
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task | None = None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        board, episode = turn_board(), current_episode()
        board.on_end(self._forget)
        ticket = board.asked(episode, len(requests)) if episode is not None and requests else None
        futures = []
        for request in requests:
            future = loop.create_future()
            self._pending.append(_Pending(request, future, board.ticket() if ticket is None else ticket,
                                          episode, loop.time()))
            futures.append(future)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    def metrics(self, since: dict[str, float] | None = None) -> dict[str, float]:
        """The engine's `perf/` figures over its life, or since `since` (a `dict(engine.stats)`).

        - `perf/engine_batch_occupancy`: mean requests per generate call / `max_batch_size`.
        - `perf/engine_row_occupancy`: the fraction of (row, decode step) slots that
          sampled a kept token; the rest are rows that had already stopped.
        - `perf/engine_requests`, `perf/engine_generate_calls`, `perf/engine_tokens`
          (sampled), `perf/engine_busy_s` (generating), `perf/engine_tokens_per_s` (per
          busy second), `perf/engine_queue_wait_s` (mean per request),
          `perf/engine_hold_s` (waiting for episodes in environment calls),
          `perf/engine_prefix_hit` (the fraction of prompt tokens the prefix cache held).
        """
        d = {k: self.stats[k] - (since or {}).get(k, 0) for k in STAT_KEYS}
        return {
            "perf/engine_batch_occupancy": d["sequences"] / max(d["generate_calls"] * self.max_batch_size, 1),
            "perf/engine_row_occupancy": d["sampled_tokens"] / max(d["row_steps"], 1),
            "perf/engine_requests": float(d["sequences"]),
            "perf/engine_generate_calls": float(d["generate_calls"]),
            "perf/engine_tokens": float(d["sampled_tokens"]),
            "perf/engine_busy_s": float(d["busy_s"]),
            "perf/engine_tokens_per_s": d["sampled_tokens"] / max(d["busy_s"], 1e-9),
            "perf/engine_queue_wait_s": d["queue_wait_s"] / max(d["sequences"], 1),
            "perf/engine_hold_s": float(d["hold_s"]),
            "perf/engine_prefix_hit": d["cached_tokens"] / max(d["prompt_tokens"], 1),
        }

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Load new weights (None: the trainer updated the shared model in place)."""
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=False)
        self.version += 1

    async def _drain(self) -> None:
        loop, board = asyncio.get_running_loop(), turn_board()
        served: set[EpisodeTurn] = set()  # the episodes the batch that just ended answered
        while self._pending:
            # Let every episode that is ready to ask for its next turn do so first; wait
            # for those away in an environment call, except the ones just answered while
            # others are queued: they come after them, as they would with the env on
            # the loop (their next turn overlaps this batch instead).
            await asyncio.sleep(0)
            held = time.perf_counter()
            await board.settle(self.turn_wait_s, skip=served)
            batch = self._take_batch(skip=served)
            if not batch:  # only the episodes just answered are left
                if self.turn_wait_s is None:  # all of them, not the ones whose call happened to return first
                    await board.settle(None)
                batch = self._take_batch()
            self.stats["hold_s"] += time.perf_counter() - held
            now = loop.time()
            self.stats["queue_wait_s"] += sum(now - item.arrived for item in batch)
            try:
                completions = await asyncio.to_thread(
                    self.generate_batch, [item.request for item in batch], keys=[item.episode for item in batch])
            except BaseException as e:  # hand the error to the waiting episodes
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
            else:
                for item, completion in zip(batch, completions):
                    if not item.future.done():
                        item.future.set_result(completion)
            served = {item.episode for item in batch if item.episode is not None}
            for item in batch:
                if item.episode is not None:
                    board.answered(item.episode)

    def _take_batch(self, skip: set[EpisodeTurn] = frozenset()) -> list[_Pending]:
        """The oldest pending requests (by ticket) that share the first one's sampling
        params and seededness, at most `max_batch_size`, leaving out the episodes in `skip`."""
        self._pending.sort(key=lambda item: item.ticket)
        eligible = [item for item in self._pending if item.episode not in skip]
        if not eligible:
            return []
        kind = _batch_kind(eligible[0].request)
        batch = [item for item in eligible if _batch_kind(item.request) == kind][: self.max_batch_size]
        taken = set(map(id, batch))
        self._pending = [item for item in self._pending if id(item) not in taken]
        return batch

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest],
                       keys: Sequence[EpisodeTurn | None] | None = None) -> list[Completion]:
        """Sample one turn for each of `requests`, which share their sampling params.

        Args:
            requests: the prompts and their (shared) sampling params.
            keys: the episode each request belongs to (None: none), whose cached
                prefix it may reuse and under which its context is cached for its next turn.
        """
        started = time.perf_counter()
        if len({r.seed is None for r in requests}) > 1:
            raise ValueError("Expect the requests of one batch to be all seeded or all unseeded, actually mixed")
        keys = list(keys) if keys is not None else [None] * len(requests)
        if self.own_decoding:
            new_ids, logprobs = self._decode(requests, keys)
        else:
            new_ids, logprobs = self._generate(requests)
        completions = [self._cut(ids, lps) for ids, lps in zip(new_ids.tolist(), logprobs.tolist())]
        self.stats["generate_calls"] += 1
        self.stats["sequences"] += len(requests)
        self.stats["row_steps"] += new_ids.numel()
        self.stats["prompt_tokens"] += sum(len(r.prompt_ids) for r in requests)
        self.stats["busy_s"] += time.perf_counter() - started
        return completions

    def _generate(self, requests: Sequence[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ids and their logprobs, both (B, T), through `model.generate` (no prefix cache)."""
        params = requests[0].params
        input_ids, attention_mask = (t.to(self.device) for t in left_pad([r.prompt_ids for r in requests], self.pad_id))
        if params.temperature > 0 and requests[0].seed is not None:
            return self._generate_seeded(requests, input_ids, attention_mask)
        greedy = params.temperature == 0
        sampling = {} if greedy else {"temperature": params.temperature, "top_k": 0, "top_p": 1.0}
        with _neutral_generation_config(self.model):
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask,
                do_sample=not greedy, max_new_tokens=params.max_new_tokens,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                output_scores=True, return_dict_in_generate=True, **sampling,
            )
        new_ids = out.sequences[:, input_ids.shape[1]:]  # (B, T)
        logprobs = torch.stack(
            [torch.log_softmax(s.float(), -1).gather(-1, new_ids[:, t, None])[:, 0]
             for t, s in enumerate(out.scores)], dim=1,
        )  # (B, T)
        return new_ids, logprobs

    def _generate_seeded(self, requests: Sequence[GenerationRequest], input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`_generate` for seeded requests: greedy decoding over scores that `_SeededChoice`
        reduces to each row's seeded draw; logprobs from the raw logits / T."""
        params = requests[0].params
        choice = _SeededChoice(turn_uniforms([r.seed for r in requests], params.max_new_tokens), params.temperature)
        with _neutral_generation_config(self.model):
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                max_new_tokens=params.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([choice]), output_logits=True, return_dict_in_generate=True,
            )
        new_ids = out.sequences[:, input_ids.shape[1]:]  # (B, T)
        logprobs = torch.stack(
            [torch.log_softmax(s.float() / params.temperature, -1).gather(-1, new_ids[:, t, None])[:, 0]
             for t, s in enumerate(out.logits)], dim=1,
        )  # (B, T)
        return new_ids, logprobs

    def _decode(self, requests: Sequence[GenerationRequest],
                keys: Sequence[EpisodeTurn | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled ids and their logprobs, both (B, T): a prefill of the tokens no cache
        holds, then one forward per sampled token (see the module doc for the layout)."""
        params, version = requests[0].params, self.version
        with self._prefix_lock:
            self._prune()
            reused = [self._reusable(key, r.prompt_ids) for key, r in zip(keys, requests)]
        if self.shared_prefix:
            reused = self._share_prefix(requests, reused, version)
        held = [n for _, n in reused]
        fresh = [r.prompt_ids[n:] for r, n in zip(requests, held)]
        past_len, new_len = max(held), max(len(ids) for ids in fresh)
        batch = len(requests)
        # Row i: [pad][its cached prefix] [pad][its new tokens], all right-aligned.
        host = {"dtype": torch.long, "device": "cpu"}
        mask = torch.zeros((batch, past_len + new_len), **host)
        input_ids = torch.full((batch, new_len), self.pad_id, **host)
        for row, ids in enumerate(fresh):
            mask[row, past_len - held[row]:past_len] = 1
            mask[row, past_len + new_len - len(ids):] = 1
            input_ids[row, new_len - len(ids):] = torch.tensor(ids, **host)
        mask, input_ids = mask.to(self.device), input_ids.to(self.device)
        room = new_len + params.max_new_tokens  # what this call appends to each layer
        cache = DynamicCache()
        if past_len:
            cache.layers = [_RoomyLayer(room, k, v) for k, v in _padded_layers(reused, past_len)]
            cache.layer_class_to_replicate = None
        else:
            cache.layer_class_to_replicate = functools.partial(_RoomyLayer, room)
        self.stats["cached_tokens"] += sum(held)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        # The model appends every fed token's keys and values to `cache` in place.
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions[:, past_len:],
                         use_cache=True, **{self._cache_arg: cache}, **extra)
        stop = torch.tensor(self.stop_ids, dtype=torch.long, device=self.device)
        alive = torch.ones(batch, dtype=torch.bool, device=self.device)
        position = positions[:, -1]
        seeded = requests[0].seed is not None and params.temperature > 0
        uniforms = turn_uniforms([r.seed for r in requests], params.max_new_tokens) if seeded else None
        sampled, logprobs = [], []
        for step in range(params.max_new_tokens):
            logits = out.logits[:, -1].float()
            if params.temperature == 0:
                token = logits.argmax(-1)
                logprob = torch.log_softmax(logits, -1)
            else:
                scores = logits / params.temperature
                probs = torch.softmax(scores, -1)
                token = (torch.multinomial(probs, 1)[:, 0] if uniforms is None
                         else seeded_tokens(probs, uniforms[:, step]).to(probs.device))
                logprob = torch.log_softmax(scores, -1)
            token = torch.where(alive, token, self.pad_id)
            sampled.append(token)
            logprobs.append(logprob.gather(-1, token[:, None])[:, 0])
            alive = alive & ~torch.isin(token, stop)
            if step == params.max_new_tokens - 1 or not alive.any():
                break
            # A stopped row's last token is fed masked: its context ends before it.
            mask = torch.cat([mask, alive[:, None].long()], dim=1)
            position = position + 1
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                             use_cache=True, **{self._cache_arg: cache})
        new_ids, logprobs = torch.stack(sampled, 1), torch.stack(logprobs, 1)
        if self.prefix_cache:
            with self._prefix_lock:
                self._keep(keys, requests, new_ids, mask, cache, version)
        return new_ids, logprobs

    def _share_prefix(self, requests: Sequence[GenerationRequest], reused: list[tuple[_Prefix | None, int]],
                      version: int) -> list[tuple[_Prefix | None, int]]:
        """`reused` with the rows that hold nothing cached set to reuse one prefill of
        their prompts' common prefix (at most all but each one's last token), when at
        least two share `MIN_SHARED_TOKENS` or more."""
        rows = [i for i, (_, n) in enumerate(reused) if n == 0]
        if len(rows) < 2:
            return reused
        prompts = [requests[i].prompt_ids for i in rows]
        length = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for prompt in prompts[1:]:
            length = next((j for j in range(length) if prompt[j] != first[j]), length)
        if length < MIN_SHARED_TOKENS:
            return reused
        ids = torch.tensor([first[:length]], dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device)[None]
        cache = DynamicCache()
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        self.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=positions,
                   use_cache=True, **{self._cache_arg: cache}, **extra)
        shared = _Prefix(list(first[:length]), [(layer.keys[0], layer.values[0]) for layer in cache.layers], version)
        out = list(reused)
        for i in rows:
            out[i] = (shared, length)
        return out

    def _forget(self, episode: EpisodeTurn) -> None:
        with self._prefix_lock:
            self._prefixes.pop(episode, None)

    def _reusable(self, key: EpisodeTurn | None, prompt: list[int]) -> tuple[_Prefix | None, int]:
        """The cached prefix of `key`'s episode and how many of `prompt`'s tokens it holds
        (at most all but the last, whose logits start the turn)."""
        prefix = self._prefixes.get(key) if key is not None and self.prefix_cache else None
        if prefix is None or prefix.version != self.version:
            return None, 0
        limit = min(len(prefix.ids), len(prompt) - 1)
        if prompt[:limit] == prefix.ids[:limit]:
            return prefix, limit
        held = 0
        while held < limit and prompt[held] == prefix.ids[held]:
            held += 1
        return prefix, held

    def _keep(self, keys, requests, new_ids: torch.Tensor, mask: torch.Tensor, cache, version: int) -> None:
        """Cache each keyed row's context: its prompt and sampled tokens but the last (never fed)."""
        for row, key in enumerate(keys):
            if key is None or key.ended:
                continue
            real = mask[row].bool()
            sampled = new_ids[row].tolist()
            ids = list(requests[row].prompt_ids) + sampled[: self._kept_length(sampled) - 1]
            layers = [(layer.keys[row][:, real], layer.values[row][:, real]) for layer in cache.layers]
            if layers[0][0].shape[1] != len(ids):  # cannot happen: the mask marks exactly these tokens
                raise RuntimeError(f"Prefix cache: {layers[0][0].shape[1]} cached positions for {len(ids)} tokens")
            self._prefixes[key] = _Prefix(ids, layers, version)

    def _prune(self) -> None:
        """Drop the prefixes of ended episodes and of older weights."""
        for key in [k for k, p in self._prefixes.items() if k.ended or p.version != self.version]:
            del self._prefixes[key]

    def _kept_length(self, ids: list[int]) -> int:
        """A batch pads a row after its stop token: its tokens up to and including the first one."""
        return next((i + 1 for i, token in enumerate(ids) if token in self.stop_ids), len(ids))

    def _cut(self, ids: list[int], logprobs: list[float]) -> Completion:
        kept = self._kept_length(ids)
        self.stats["sampled_tokens"] += kept
        finished = kept > 0 and ids[kept - 1] in self.stop_ids
        return Completion(ids[:kept], logprobs[:kept], finished, self.version)


def _batch_kind(request: GenerationRequest) -> tuple[SamplingParams, bool]:
    """What the requests of one batch share: their sampling params, and seeded or not."""
    return request.params, request.seed is not None


class _SeededChoice(LogitsProcessor):
    """Leaves each row one finite score, at its seeded draw from softmax(scores / T) (see
    `seeded_tokens`), so greedy decoding samples exactly that; step t reads `uniforms[:, t]`."""

    def __init__(self, uniforms: torch.Tensor, temperature: float):
        self.uniforms, self.temperature, self.step = uniforms, temperature, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = seeded_tokens(torch.softmax(scores.float() / self.temperature, -1), self.uniforms[:, self.step])
        self.step += 1
        chosen = torch.full_like(scores, float("-inf"))
        return chosen.scatter_(-1, token.to(scores.device)[:, None], 0.0)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The end-of-turn ids: the tokenizer's eos plus the model's generation eos ids."""
    ids = {tokenizer.eos_token_id}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    ids.discard(None)
    return sorted(ids)


def decodes_with_cache(model) -> bool:
    """Whether `HFEngine` can decode `model` itself with a per-episode prefix cache: a
    decoder-only model whose every layer is full attention (no sliding window, no
    state-space layers), so a `DynamicCache` of plain layers holds its whole context."""
    config = model.config.get_text_config(decoder=True)
    if getattr(config, "is_encoder_decoder", False):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return set(layer_types) == {"full_attention"} and not sliding


@contextlib.contextmanager
def _neutral_generation_config(model):
    """`model.generate` layers the model's own generation config (a real model's
    `repetition_penalty`, `top_k`, ...) under what it is asked for, and samples from
    that processed distribution, which a fresh forward pass does not give. Swap in a
    config with none of it for the call, so it samples from softmax(logits / T)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = GenerationConfig(
        bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id)
    try:
        yield
    finally:
        base.generation_config = saved


def _accepts(model, name: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


class _RoomyLayer(DynamicLayer):
    """A `DynamicLayer` that appends into room allocated once per batch (the new tokens
    and one turn of decoding) instead of concatenating a new tensor at every step."""

    def __init__(self, room: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        super().__init__()
        self.room, self.length = room, 0
        self._keys = self._values = None
        if keys is not None:
            self.update(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
        n = key_states.shape[-2]
        if self._keys is None or self.length + n > self._keys.shape[-2]:
            grown_k = key_states.new_empty((*key_states.shape[:2], self.length + n + self.room, key_states.shape[-1]))
            grown_v = value_states.new_empty((*value_states.shape[:2], self.length + n + self.room,
                                              value_states.shape[-1]))
            if self.length:
                grown_k[:, :, : self.length] = self._keys[:, :, : self.length]
                grown_v[:, :, : self.length] = self._values[:, :, : self.length]
            self._keys, self._values = grown_k, grown_v
        self._keys[:, :, self.length: self.length + n] = key_states
        self._values[:, :, self.length: self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]
        return self.keys, self.values


def _padded_layers(reused: Sequence[tuple[_Prefix | None, int]], length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the rows' cached keys and values left-padded with zeros to `length`."""
    prefix = next(p for p, n in reused if n)
    layers = []
    for layer, (k0, v0) in enumerate(prefix.layers):
        keys = k0.new_zeros((len(reused), k0.shape[0], length, k0.shape[2]))
        values = v0.new_zeros((len(reused), v0.shape[0], length, v0.shape[2]))
        for row, (p, n) in enumerate(reused):
            if n:
                keys[row, :, length - n:] = p.layers[layer][0][:, :n]
                values[row, :, length - n:] = p.layers[layer][1][:, :n]
        layers.append((keys, values))
    return layers


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into `(input_ids, attention_mask)`, both (B, L)."""
    length = max(len(s) for s in sequences)
    host = {"dtype": torch.long, "device": "cpu"}
    input_ids = torch.full((len(sequences), length), pad_id, **host)
    attention_mask = torch.zeros((len(sequences), length), **host)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, length - len(seq):] = torch.tensor(seq, **host)
            attention_mask[row, length - len(seq):] = 1
    return input_ids, attention_mask
