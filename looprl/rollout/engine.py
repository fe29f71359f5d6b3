"""Inference engines: `async generate(requests) -> completions` with token ids and logprobs.

`HFEngine` runs a transformers model in-process. Episodes call `generate` concurrently
from asyncio tasks; the engine gathers the pending requests into one left-padded
`model.generate` call, so N concurrent episodes cost one forward per token instead of
N. The logprob it records for a sampled token is under the exact distribution it
sampled from (temperature applied, no top-k/top-p truncation), which is what the PPO
ratio needs.

Batching is turn-level and continuous: while a batch generates, new requests queue;
when it ends, the next batch is taken from everything queued (oldest first, one set of
sampling params per batch, at most `max_batch_size` rows). Before taking a batch the
engine waits, up to `turn_wait_s`, for the episodes that are away in an environment call
(see `looprl.rollout.turns`), so that with fast tools a batch holds one turn of every
live episode and runs reproduce exactly.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

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
    prompt_ids: list[int]
    params: SamplingParams


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


STAT_KEYS = ("generate_calls", "sequences", "sampled_tokens", "row_steps", "busy_s", "queue_wait_s", "hold_s")


class HFEngine:
    """In-process transformers engine that batches the requests of concurrent episodes.

    `stats` counts, since the engine was made: `generate_calls`, `sequences` (requests
    served), `sampled_tokens` (kept: up to each row's stop token), `row_steps` (rows x
    decode steps of every call), `busy_s` (seconds inside `generate_batch`),
    `queue_wait_s` (summed seconds requests waited for their batch) and `hold_s`
    (seconds a batch was held for episodes in environment calls). `metrics()` turns
    them into the `perf/engine_*` figures a trainer logs.

    Args:
        model: a causal LM (plain or peft-wrapped). The trainer may share this object:
            then `update_weights()` only bumps the version.
        tokenizer: its tokenizer (for the pad id and stop ids).
        max_batch_size: the most sequences in one `generate` call.
        turn_wait_s: the longest a batch waits for an episode that has made no progress
            (is in an environment call); slower calls no longer hold the others back,
            but then which batch a turn lands in depends on timing.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 64, turn_wait_s: float = 1.0):
        if max_batch_size <= 0:
            raise ValueError(f"Expect `max_batch_size` to be positive, actually: {max_batch_size}")
        if turn_wait_s < 0:
            raise ValueError(f"Expect `turn_wait_s` to be >= 0, actually: {turn_wait_s}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.turn_wait_s = turn_wait_s
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.version = 0
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task | None = None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        board, episode = turn_board(), current_episode()
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
          `perf/engine_hold_s` (waiting for episodes in environment calls).
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
            self.stats["hold_s"] += time.perf_counter() - held
            batch = self._take_batch(skip=served) or self._take_batch()
            now = loop.time()
            self.stats["queue_wait_s"] += sum(now - item.arrived for item in batch)
            try:
                completions = await asyncio.to_thread(self.generate_batch, [item.request for item in batch])
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
        params, at most `max_batch_size`, leaving out the episodes in `skip`."""
        self._pending.sort(key=lambda item: item.ticket)
        eligible = [item for item in self._pending if item.episode not in skip]
        if not eligible:
            return []
        params = eligible[0].request.params
        batch = [item for item in eligible if item.request.params == params][: self.max_batch_size]
        taken = set(map(id, batch))
        self._pending = [item for item in self._pending if id(item) not in taken]
        return batch

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Run one `generate` over requests that share their sampling params."""
        started = time.perf_counter()
        params = requests[0].params
        input_ids, attention_mask = left_pad([r.prompt_ids for r in requests], self.pad_id)
        greedy = params.temperature == 0
        sampling = {} if greedy else {"temperature": params.temperature, "top_k": 0, "top_p": 1.0}
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
        completions = [self._cut(ids, lps) for ids, lps in zip(new_ids.tolist(), logprobs.tolist())]
        self.stats["generate_calls"] += 1
        self.stats["sequences"] += len(requests)
        self.stats["row_steps"] += new_ids.numel()
        self.stats["busy_s"] += time.perf_counter() - started
        return completions

    def _cut(self, ids: list[int], logprobs: list[float]) -> Completion:
        # generate pads a row after its stop token: keep up to and including the first one.
        for i, token in enumerate(ids):
            if token in self.stop_ids:
                self.stats["sampled_tokens"] += i + 1
                return Completion(ids[: i + 1], logprobs[: i + 1], True, self.version)
        self.stats["sampled_tokens"] += len(ids)
        return Completion(ids, logprobs, False, self.version)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The end-of-turn ids: the tokenizer's eos plus the model's generation eos ids."""
    ids = {tokenizer.eos_token_id}
    eos = model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    ids.discard(None)
    return sorted(ids)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into `(input_ids, attention_mask)`, both (B, L)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, length - len(seq):] = 1
    return input_ids, attention_mask
