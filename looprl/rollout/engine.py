"""Inference engines: `async generate(requests) -> completions` with token ids and logprobs.

`HFEngine` runs a transformers model in-process. Episodes call `generate` concurrently
from asyncio tasks; the engine gathers every request pending at that moment into one
left-padded `model.generate` call, so N concurrent episodes cost one forward per token
instead of N. The logprob it records for a sampled token is under the exact
distribution it sampled from (temperature applied, no top-k/top-p truncation), which is
what the PPO ratio needs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


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


class HFEngine:
    """In-process transformers engine that batches the requests of concurrent episodes.

    Args:
        model: a causal LM (plain or peft-wrapped). The trainer may share this object:
            then `update_weights()` only bumps the version.
        tokenizer: its tokenizer (for the pad id and stop ids).
        max_batch_size: the most sequences in one `generate` call.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 64):
        if max_batch_size <= 0:
            raise ValueError(f"Expect `max_batch_size` to be positive, actually: {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.version = 0
        self.stats = {"generate_calls": 0, "sequences": 0, "sampled_tokens": 0}
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        futures = []
        for request in requests:
            future = loop.create_future()
            self._pending.append((request, future))
            futures.append(future)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Load new weights (None: the trainer updated the shared model in place)."""
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=False)
        self.version += 1

    async def _drain(self) -> None:
        while self._pending:
            # Let every episode that is ready to ask for its next turn do so first.
            await asyncio.sleep(0)
            batch = self._take_batch()
            try:
                completions = await asyncio.to_thread(self.generate_batch, [r for r, _ in batch])
            except BaseException as e:  # hand the error to the waiting episodes
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), completion in zip(batch, completions):
                if not future.done():
                    future.set_result(completion)

    def _take_batch(self) -> list[tuple[GenerationRequest, asyncio.Future]]:
        params = self._pending[0][0].params
        batch, rest = [], []
        for item in self._pending:
            if item[0].params == params and len(batch) < self.max_batch_size:
                batch.append(item)
            else:
                rest.append(item)
        self._pending = rest
        return batch

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Run one `generate` over requests that share their sampling params."""
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
        self.stats["generate_calls"] += 1
        self.stats["sequences"] += len(requests)
        return [self._cut(ids, lps) for ids, lps in zip(new_ids.tolist(), logprobs.tolist())]

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
