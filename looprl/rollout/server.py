"""`looprl serve`: an OpenAI-compatible HTTP server in front of an inference engine.

Every request is handed to one shared engine (`HFEngine`), which gathers the requests
pending at the same moment into one batched `generate`, so concurrent clients share
forwards. Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`
(streaming too) and `POST /v1/completions` (a string or a list of token ids as
`prompt`, like vLLM). The wire format is in `openai_api.py`.

Streaming is OpenAI's server-sent events (`data: {...}` chunks, then `data: [DONE]`).
The engine samples whole turns, so a stream's chunks are sent once the turn is done.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from looprl.rollout.agent import chat_ids
from looprl.rollout.engine import GenerationRequest, HFEngine, InferenceEngine, SamplingParams
from looprl.rollout.openai_api import (
    APIError, ChatRequest, ChatTurn, CompletionRequest, completion_choice, created, new_id,
    template_messages, usage,
)


def app_for_model(model, tokenizer, model_name: str, max_batch_size: int = 64) -> FastAPI:
    """Serve a transformers model through an `HFEngine` (its config gives the limits)."""
    config = model.config
    max_model_len = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    engine = HFEngine(model, tokenizer, max_batch_size=max_batch_size)
    return build_app(engine, tokenizer, model_name, vocab_size=config.vocab_size, max_model_len=int(max_model_len))


def build_app(engine: InferenceEngine, tokenizer, model_name: str, vocab_size: int,
              max_model_len: int, default_max_tokens: int = 1024) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`.

    Args:
        engine: where turns are sampled (shared by every request).
        tokenizer: the model's tokenizer, with its chat template.
        model_name: the id clients pass as `model` (others get 404).
        vocab_size: prompt token ids must be below it.
        max_model_len: the most tokens a prompt and its completion may have together.
        default_max_tokens: the turn length when a request names none (clipped to the
            context). A fixed default, not "the rest of the context", so that requests
            with prompts of different lengths still share sampling params and batch.
    """
    app = FastAPI(title="looprl serve")
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)

    def prompt_checked(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(f"`{param}` is empty: expected at least one token id", param=param)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise APIError(f"`{param}` holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})",
                           param=param)
        return ids

    def params_for(request, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        room = max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = min(room, default_max_tokens)
        if room < 1 or max_tokens > room:
            raise APIError(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, but the model's "
                           f"context is {max_model_len} tokens", param="max_tokens")
        temperature = 1.0 if request.temperature is None else request.temperature
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature)

    def check_model(request) -> None:
        if request.model is not None and request.model != model_name:
            raise APIError(f"The model `{request.model}` does not exist; this server serves `{model_name}`",
                           status=404, param="model")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created(),
                                            "owned_by": "looprl", "max_model_len": max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        check_model(request)
        if request.prompt_token_ids:
            prompt_ids = prompt_checked(request.prompt_token_ids, "prompt_token_ids")
        else:
            prompt_ids = _render(tokenizer, request.messages, request.tools)
        params = params_for(request, len(prompt_ids), request.max_completion_tokens or request.max_tokens)
        completions = await engine.generate([GenerationRequest(prompt_ids, params)] * request.n)
        turns = [ChatTurn(tokenizer, c, parse_tools=request.tool_choice != "none") for c in completions]
        head = {"id": new_id("chatcmpl"), "created": created(), "model": model_name}
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            chunks = _chat_chunks(head, turns, request.logprobs, prompt_ids,
                                  usage(len(prompt_ids), completions) if include_usage else None)
            return StreamingResponse(_sse(chunks), media_type="text/event-stream")
        return {**head, "object": "chat.completion",
                "choices": [t.choice(i, request.logprobs) for i, t in enumerate(turns)],
                "usage": usage(len(prompt_ids), completions), "prompt_token_ids": prompt_ids}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        check_model(request)
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        prompt_ids = [prompt_checked(p if isinstance(p, list) else tokenizer.encode(p, add_special_tokens=False),
                                     "prompt") for p in prompts]
        generation = [GenerationRequest(ids, params_for(request, len(ids), request.max_tokens))
                      for ids in prompt_ids for _ in range(request.n)]
        results = await engine.generate(generation)
        with_logprobs = request.logprobs is not None
        choices = [completion_choice(tokenizer, i, c, g.prompt_ids, with_logprobs)
                   for i, (g, c) in enumerate(zip(generation, results))]
        return {"id": new_id("cmpl"), "object": "text_completion", "created": created(), "model": model_name,
                "choices": choices, "usage": usage(sum(map(len, prompt_ids)) * request.n, results)}

    return app


def _render(tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
    try:
        return chat_ids(tokenizer, template_messages(messages), tools)
    except ValueError as e:
        raise APIError(str(e), param="messages") from None
    except Exception as e:  # the template rejected what the client sent (jinja error, missing key)
        raise APIError(f"the model's chat template could not render `messages`/`tools`: "
                       f"{type(e).__name__}: {e}", param="messages") from None


def _chat_chunks(head: dict, turns: list[ChatTurn], with_logprobs: bool, prompt_ids: list[int],
                 total: dict | None):
    chunk = {**head, "object": "chat.completion.chunk"}
    for index, turn in enumerate(turns):
        first = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                 "logprobs": None, "token_ids": []}
        yield {**chunk, "choices": [first], **({"prompt_token_ids": prompt_ids} if index == 0 else {})}
        for choice in turn.chunks(index, with_logprobs):
            yield {**chunk, "choices": [choice]}
    if total is not None:
        yield {**chunk, "choices": [], "usage": total}


async def _sse(chunks) -> AsyncIterator[str]:
    for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
        # Let the loop run between chunks. The chunks are ready at once and a write to a
        # socket does not wait, so without this the loop never learns that the client
        # has gone (that runs as a callback) and the whole stream is written to a dead
        # socket, asyncio logging "socket.send() raised exception." for every chunk.
        await asyncio.sleep(0)
    yield "data: [DONE]\n\n"


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ())[1:])
        problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return JSONResponse(APIError("Bad request: " + "; ".join(problems)).body(), status_code=400)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(APIError(f"{type(exc).__name__}: {exc}", status=500).body(), status_code=500)
