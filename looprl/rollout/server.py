"""`looprl serve`: an OpenAI-compatible HTTP server in front of an inference engine.

Every request is handed to one shared engine (`HFEngine`), which gathers the requests
pending at the same moment into one batched `generate`, so concurrent clients share
forwards. Endpoints: `GET /health` (with the queue's `admitted` and `max_queue`),
`GET /v1/models`, `POST /v1/chat/completions` (streaming too) and `POST
/v1/completions` (a string or a list of token ids as `prompt`, like vLLM). The wire
format is in `openai_api.py`.

Streaming is OpenAI's server-sent events (`data: {...}` chunks, then `data: [DONE]`).
The engine samples whole turns, so a stream's chunks are sent once the turn is done.

Every refusal has OpenAI's error shape, `{"error": {"message", "type", "param",
"code"}}`, whatever its status: 400 (a request the server cannot honour, malformed
JSON, a schema error), 404 (unknown route or model), 405 (wrong method), 413 (body too
large), 429 (queue full) and 500 (a bug). The server is bounded (see `build_app`): the
body size, the prompt's tokens, `n`, the prompts of one `/v1/completions` request, the
choices of one request, `max_tokens`, the lowest temperature, and the requests it
admits at once; past the last, a request gets 429 at once rather than waiting. A client
that disconnects before its answer is complete gets one warning line in the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from looprl.rollout.agent import chat_ids
from looprl.rollout.engine import GenerationRequest, InferenceEngine, SamplingParams
from looprl.rollout.openai_api import (
    APIError,
    ChatRequest,
    ChatTurn,
    CompletionRequest,
    completion_choice,
    created,
    new_id,
    template_messages,
    usage,
)
from looprl.rollout.weight_sync import SnapshotEngine

logger = logging.getLogger(__name__)

# The endpoints that sample, and so take a place in the queue; /health and /v1/models
# answer even when it is full (a load balancer's health check must not get 429).
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")

# A refused body (too large, or its request refused for a full queue) is still read and
# dropped, up to these bounds, before the answer: a client writes its whole body before
# it reads, and a socket closed with unread data resets the connection, so the client
# would see a broken pipe instead of the 413/429. Past them the connection is closed.
DRAIN_BYTES = 16 << 20
DRAIN_S = 10.0

# The scope key under which the limits middleware sets an asyncio.Event once the client
# has gone, so that a stream stops instead of writing the rest of itself to nobody.
CLIENT_GONE = "looprl.client_gone"


class WeightsRequest(BaseModel):
    path: str
    version: int


def app_for_model(model, tokenizer, model_name: str, max_batch_size: int = 64, accept_weights: bool = False,
                  **limits: Any) -> FastAPI:
    """Serve a transformers model through an `HFEngine` (its config gives the limits).

    Args:
        model: the causal LM to sample from.
        tokenizer: its tokenizer, with its chat template.
        model_name: the id clients pass as `model`.
        max_batch_size: the most sequences in one `generate` call.
        accept_weights: serve `POST /v1/looprl/weights`, through which a training run
            (`rollout.engine=openai`) publishes its weights after each step.
        **limits: `build_app`'s bounds (`max_body_bytes`, `max_prompt_tokens`,
            `max_tokens_limit`, `max_n`, `max_prompts`, `max_choices`,
            `min_temperature`, `max_queue`, `default_max_tokens`); each defaults as there.
    """
    config = model.config
    max_model_len = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    # A snapshot engine over the served model itself (copy=False): weights pushed through
    # `POST /v1/looprl/weights` land between two generate calls, never during one.
    engine = SnapshotEngine(model, tokenizer, version=0, max_batch_size=max_batch_size, copy=False)
    app = build_app(engine, tokenizer, model_name, vocab_size=config.vocab_size, max_model_len=int(max_model_len),
                    **limits)
    if accept_weights:
        _weights_route(app, engine)
    return app


def _weights_route(app: FastAPI, engine: SnapshotEngine) -> None:
    """`POST /v1/looprl/weights {"path", "version"}`: load a safetensors file of parameters
    (a trainer's `OpenAIEngine.publish`) into the served model, as policy `version`.

    The file is read from the server's own disk: only for servers bound to a trusted
    address (`looprl serve --accept-weights`)."""

    @app.post("/v1/looprl/weights")
    async def load_weights(request: WeightsRequest) -> dict:
        from safetensors.torch import load_file

        try:
            state = await asyncio.to_thread(load_file, request.path)
        except (OSError, ValueError) as e:
            raise APIError(f"cannot read weights from {request.path!r}: {e}", param="path") from None
        try:
            await asyncio.to_thread(engine.push, state, request.version)
        except (ValueError, RuntimeError) as e:  # names or shapes of another model
            raise APIError(f"the weights do not fit the served model: {str(e)[:300]}", param="path") from None
        return {"version": engine.version, "tensors": len(state)}


def build_app(engine: InferenceEngine, tokenizer, model_name: str, vocab_size: int,
              max_model_len: int, default_max_tokens: int = 1024, *,
              max_body_bytes: int = 1 << 20, max_prompt_tokens: int | None = None,
              max_tokens_limit: int | None = None, max_n: int = 64, max_prompts: int = 64,
              max_choices: int = 256, min_temperature: float = 1e-2, max_queue: int = 256) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`.

    A request past a bound is refused with OpenAI's error shape: 413 for the body, 429
    for the queue, 400 for the others (the message names the bound and the field).

    Args:
        engine: where turns are sampled (shared by every request).
        tokenizer: the model's tokenizer, with its chat template.
        model_name: the id clients pass as `model` (others get 404).
        vocab_size: prompt token ids must be below it.
        max_model_len: the most tokens a prompt and its completion may have together.
        default_max_tokens: the turn length when a request names none (clipped to the
            context). A fixed default, not "the rest of the context", so that requests
            with prompts of different lengths still share sampling params and batch.
        max_body_bytes: the largest request body, in bytes (default 1 MiB), checked
            against Content-Length before reading and while reading a chunked upload.
            It bounds what a request costs to parse and tokenize before the other
            bounds are checked; 1 MiB holds a prompt of 100k token ids.
        max_prompt_tokens: the most tokens in one prompt (default None: the context
            less one, `max_model_len - 1`, so at least one token can be sampled).
        max_tokens_limit: the most tokens one choice may sample, whatever the context
            allows (default None: the context is the only bound).
        max_n: the most choices per prompt, `n` (default 64).
        max_prompts: the most prompts in one `/v1/completions` request (default 64).
        max_choices: the most choices in one request, prompts x `n` (default 256), so
            that one request cannot hold the engine for thousands of sequences.
        min_temperature: the lowest positive temperature served (default 0.01). A
            temperature in (0, `min_temperature`) gets 400, not greedy decoding: the
            answer's logprobs must be under the distribution sampled from, as an RL
            client's ratio needs, and near 0 that distribution is a one-hot whose
            logprobs (0, and huge negatives) mean nothing, until `logits / 1e-300`
            overflows to NaN. Greedy decoding is `temperature=0`; 0 turns the bound off.
        max_queue: the most sampling requests admitted at once, in flight or waiting
            for the engine (default 256, above `OpenAIEngine`'s 64 concurrent
            requests). Past it a request gets 429 at once, with `Retry-After: 1`.

    Raises:
        ValueError: a bound that is not positive, or a prompt bound past the context.
    """
    if max_prompt_tokens is None:
        max_prompt_tokens = max_model_len - 1
    for name, value in [("max_model_len", max_model_len), ("default_max_tokens", default_max_tokens),
                        ("max_body_bytes", max_body_bytes), ("max_prompt_tokens", max_prompt_tokens),
                        ("max_tokens_limit", 1 if max_tokens_limit is None else max_tokens_limit), ("max_n", max_n),
                        ("max_prompts", max_prompts), ("max_choices", max_choices), ("max_queue", max_queue)]:
        if value <= 0:
            raise ValueError(f"Expect `{name}` to be positive, actually: {value}")
    if max_prompt_tokens >= max_model_len:
        raise ValueError(f"Expect `max_prompt_tokens` below the context ({max_model_len}) so a prompt leaves room "
                         f"for one sampled token, actually: {max_prompt_tokens}")
    if not min_temperature >= 0:
        raise ValueError(f"Expect `min_temperature` to be >= 0, actually: {min_temperature}")

    app = FastAPI(title="looprl serve")
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
    admission = Admission(max_queue)
    app.state.admission = admission
    app.add_middleware(LimitsMiddleware, admission=admission, max_body_bytes=max_body_bytes)

    def prompt_checked(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(f"`{param}` is empty: expected at least one token id", param=param)
        if len(ids) > max_prompt_tokens:
            raise APIError(f"`{param}` has {len(ids)} tokens, more than the {max_prompt_tokens} this server takes "
                           f"in one prompt (the model's context is {max_model_len} tokens)", param=param)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise APIError(f"`{param}` holds token id {bad[0]}, outside the vocabulary [0, {vocab_size})",
                           param=param)
        return ids

    def params_for(request, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        room = max_model_len - prompt_len
        if max_tokens is None:
            max_tokens = min(room, default_max_tokens, max_tokens_limit or room)
        if max_tokens_limit is not None and max_tokens > max_tokens_limit:
            raise APIError(f"max_tokens={max_tokens} is more than the {max_tokens_limit} tokens this server "
                           "samples in one choice", param="max_tokens")
        if room < 1 or max_tokens > room:
            raise APIError(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, but the model's "
                           f"context is {max_model_len} tokens", param="max_tokens")
        temperature = 1.0 if request.temperature is None else request.temperature
        if 0 < temperature < min_temperature:
            raise APIError(f"temperature={temperature!r} is below {min_temperature}, the lowest this server "
                           "samples at (the softmax degenerates below it); use temperature=0 for greedy decoding",
                           param="temperature")
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature)

    def check_model(request) -> None:
        if request.model is not None and request.model != model_name:
            raise APIError(f"The model `{request.model}` does not exist; this server serves `{model_name}`",
                           status=404, param="model")

    def check_choices(request, prompts: int) -> None:
        if request.n > max_n:
            raise APIError(f"n={request.n} is more than the {max_n} choices per prompt this server samples",
                           param="n")
        if prompts * request.n > max_choices:
            raise APIError(f"{prompts} prompts x n={request.n} is {prompts * request.n} choices, more than the "
                           f"{max_choices} this server samples for one request", param="n")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "admitted": admission.admitted, "max_queue": admission.max_queue}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created(),
                                            "owned_by": "looprl", "max_model_len": max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        check_model(request)
        check_choices(request, 1)
        if request.prompt_token_ids:
            prompt_ids = prompt_checked(request.prompt_token_ids, "prompt_token_ids")
        else:
            prompt_ids = prompt_checked(_render(tokenizer, request.messages, request.tools), "messages")
        params = params_for(request, len(prompt_ids), request.max_completion_tokens or request.max_tokens)
        completions = await engine.generate([GenerationRequest(prompt_ids, params)] * request.n)
        turns = [ChatTurn(tokenizer, c, parse_tools=request.tool_choice != "none") for c in completions]
        head = {"id": new_id("chatcmpl"), "created": created(), "model": model_name}
        if request.stream:
            include_usage = bool((request.stream_options or {}).get("include_usage"))
            chunks = _chat_chunks(head, turns, request.logprobs, prompt_ids,
                                  usage(len(prompt_ids), completions) if include_usage else None)
            return StreamingResponse(_sse(chunks, http.scope.get(CLIENT_GONE)), media_type="text/event-stream")
        return {**head, "object": "chat.completion",
                "choices": [t.choice(i, request.logprobs) for i, t in enumerate(turns)],
                "usage": usage(len(prompt_ids), completions), "prompt_token_ids": prompt_ids}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        check_model(request)
        prompts = request.prompt if isinstance(request.prompt, list) else [request.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        # Counted before any prompt is tokenized: that is the cost the bound is for.
        if len(prompts) > max_prompts:
            raise APIError(f"`prompt` holds {len(prompts)} prompts, more than the {max_prompts} this server takes "
                           "in one request", param="prompt")
        check_choices(request, len(prompts))
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


async def _sse(chunks, gone: asyncio.Event | None = None) -> AsyncIterator[str]:
    for chunk in chunks:
        if gone is not None and gone.is_set():
            return  # the client left: the limits middleware has logged it
        yield f"data: {json.dumps(chunk)}\n\n"
        # Let the loop run between chunks. The chunks are ready at once and a write to a
        # socket does not wait, so without this the loop never learns that the client
        # has gone (that runs as a callback) and the whole stream is written to a dead
        # socket, asyncio logging "socket.send() raised exception." for every chunk.
        await asyncio.sleep(0)
    yield "data: [DONE]\n\n"


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no route, wrong method), in OpenAI's shape, not `{"detail": ...}`."""
    headers = dict(exc.headers or {})
    if exc.status_code == 404 and exc.detail == "Not Found":
        message = f"Unknown route: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        allowed = headers.get("Allow") or headers.get("allow")
        message = f"Method {request.method} is not allowed on {request.url.path}" + (
            f" (allowed: {allowed})" if allowed else "")
    else:
        message = str(exc.detail)
    return JSONResponse(APIError(message, status=exc.status_code).body(), status_code=exc.status_code,
                        headers=headers or None)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON or not the schema: 400 (as OpenAI answers), not FastAPI's 422."""
    problems, fields = [], []
    for error in exc.errors():
        loc = error.get("loc", ())
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error") or error.get("msg")
            problems.append(f"the body is not valid JSON ({reason}, at character {loc[-1] if loc else '?'})")
            continue
        where = ".".join(str(part) for part in loc[1:])
        fields.append(where)
        problems.append(f"{where}: {error.get('msg')}" if where else f"the body: {error.get('msg')}")
    param = fields[0] if len(fields) == 1 and fields[0] else None
    return JSONResponse(APIError("Bad request: " + "; ".join(problems), param=param).body(), status_code=400)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(APIError(f"{type(exc).__name__}: {exc}", status=500).body(), status_code=500)


class Admission:
    """How many sampling requests the server holds now, and the most it may.

    Attributes:
        max_queue: the most requests admitted at once (in flight or waiting).
        admitted: the requests admitted now; each leaves when its answer is sent, or
            when its handler ends after its client has gone.
        refused: the requests refused with 429 so far.
    """

    def __init__(self, max_queue: int):
        self.max_queue, self.admitted, self.refused = max_queue, 0, 0


class LimitsMiddleware:
    """ASGI middleware: the queue bound, the body bound, and one log line per disconnect.

    A sampling request (`GENERATION_PATHS`) past `admission.max_queue` gets 429 at once.
    Every request's body is read here, up to `max_body_bytes` (413 past it, from the
    declared Content-Length before reading, else while reading), and handed to the app
    whole. The middleware then owns the connection's receive channel, so it sees a
    client that leaves before its answer is complete: it logs one warning and tells the
    app (an `http.disconnect`, and `scope[CLIENT_GONE]` set).

    The handler of a request whose client left still runs to its end (its engine rows,
    already queued, are sampled anyway), so the request keeps its place in the queue
    until then and the bound holds for the engine's work too.
    """

    def __init__(self, app, admission: Admission, max_body_bytes: int):
        self.app, self.admission, self.max_body_bytes = app, admission, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        admission = self.admission
        queued = scope["method"] == "POST" and scope["path"] in GENERATION_PATHS
        if queued and admission.admitted >= admission.max_queue:
            admission.refused += 1
            error = APIError(f"The server is busy: it holds {admission.admitted} requests (in flight or waiting), "
                             f"the most it admits; retry later", status=429)
            await self._refuse(scope, receive, send, error, {"retry-after": "1"}, remaining=_content_length(scope))
            return
        admission.admitted += queued
        try:
            body = await self._body(scope, receive, send)
            if body is not None:
                await self._run(scope, receive, send, body)
        finally:
            admission.admitted -= queued

    async def _body(self, scope, receive, send) -> bytes | None:
        """The whole request body, or None when it was refused or the client left."""
        too_large = APIError(f"The request body is larger than the {self.max_body_bytes} bytes this server takes",
                             status=413)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, receive, send, too_large, remaining=declared)
            return None
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                _log_disconnect(scope, "while sending its request")
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                ended = not message.get("more_body", False)
                remaining = 0 if ended else None if declared is None else declared - len(body)
                await self._refuse(scope, receive, send, too_large, remaining=remaining)
                return None
            if not message.get("more_body", False):
                return bytes(body)

    async def _run(self, scope, receive, send, body: bytes) -> None:
        gone = asyncio.Event()
        scope[CLIENT_GONE] = gone
        state = {"delivered": False, "complete": False, "sent": 0}

        async def app_receive() -> dict:
            if not state["delivered"]:
                state["delivered"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def app_send(message: dict) -> None:
            if message["type"] == "http.response.body":
                state["sent"] += len(message.get("body", b""))
                # Marked before the send: the server answers `receive` with a disconnect
                # once the response is complete, which is then no client leaving.
                state["complete"] = state["complete"] or not message.get("more_body", False)
            await send(message)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["complete"]:
                _log_disconnect(scope, f"before its answer was complete ({state['sent']} bytes of it sent)")
            gone.set()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, app_receive, app_send)
        finally:
            watcher.cancel()

    async def _refuse(self, scope, receive, send, error: APIError, headers: dict | None = None,
                      remaining: int | None = None) -> None:
        """Answer `error` after reading and dropping the rest of the body (see DRAIN_BYTES).

        Args:
            remaining: the body bytes still to come (None: unknown, no Content-Length; 0:
                the body has been read to its end).
        """
        headers = dict(headers or {})
        if remaining != 0:
            drained = remaining is None or remaining <= DRAIN_BYTES
            if not (drained and await _drain(receive, DRAIN_BYTES, DRAIN_S)):
                headers["connection"] = "close"  # the rest of the body is still on the connection
        await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)


async def _drain(receive, limit_bytes: int, limit_s: float) -> bool:
    """Read and drop the rest of the request body; whether it ended within the bounds."""
    async def read() -> bool:
        seen = 0
        while seen <= limit_bytes:
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return True
            seen += len(message.get("body", b""))
        return False

    try:
        return await asyncio.wait_for(read(), limit_s)
    except asyncio.TimeoutError:
        return False


def _content_length(scope) -> int | None:
    try:
        return int(Headers(scope=scope)["content-length"])
    except (KeyError, ValueError):
        return None


def _log_disconnect(scope, when: str) -> None:
    client = scope.get("client")
    who = f"{client[0]}:{client[1]}" if client else "a client"
    logger.warning("client %s disconnected %s: %s %s", who, when, scope["method"], scope["path"])
