"""The OpenAI wire format of `looprl serve`: request schemas and response bodies.

Requests are validated by pydantic. A field the server cannot honour (stop strings,
top_p/top_k truncation, penalties, per-request seeds, top-N logprobs, forced tool
choice) is refused with an error that names it, never silently ignored; fields it does
not know are ignored, as OpenAI-compatible servers do.

For RL clients every answer carries the exact token ids, as vLLM does with
`return_token_ids`: `prompt_token_ids` (top level for chat, per choice for
completions) and `token_ids` per choice. A finished choice's `token_ids` end with the
stop token, and `logprobs` has one entry per id, under the distribution sampled from
(temperature applied). A chat request may pass `prompt_token_ids` instead of rendering
`messages`, and `/v1/completions` takes a list of ids as `prompt`, so a client can
continue a trajectory without re-tokenizing.
"""

from __future__ import annotations

import json
import time
import uuid
from itertools import accumulate
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from looprl.envs.parsing import parse_action
from looprl.rollout.agent import sampled_text
from looprl.rollout.engine import Completion

# Sampling fields this server cannot honour, with the value that means "off".
_OFF_VALUES = {
    "top_p": (1,), "top_k": (-1, 0), "min_p": (0,), "presence_penalty": (0,),
    "frequency_penalty": (0,), "repetition_penalty": (1,), "stop": ([], ""), "seed": (),
    "logit_bias": ({},), "best_of": (1,),
}


class APIError(Exception):
    """A request the server refuses; becomes `{"error": {...}}` with `status`.

    The body is OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`,
    which the `openai` client reads into its `APIStatusError` subclasses (it picks the
    class from the status). `code` is the status, as vLLM sends it; `type` is
    `rate_limit_error` for 429 (the queue is full), `server_error` for 5xx and
    `invalid_request_error` for the other 4xx.
    """

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param

    def body(self) -> dict:
        if self.status == 429:
            kind = "rate_limit_error"
        else:
            kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    n: int = Field(1, ge=1)  # its upper bound is the server's `max_n`
    stream: bool = False
    return_token_ids: bool | None = None  # vLLM's flag; token ids are always returned

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, off in _OFF_VALUES.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value not in off:
                raise ValueError(f"{name}={value!r} is not supported by looprl serve (it samples from the "
                                 f"full softmax at `temperature`, with no stop strings or seeds)")
        return self


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stream_options: dict[str, Any] | None = None
    prompt_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _check(self):
        if not self.messages and not self.prompt_token_ids:
            raise ValueError("expected a non-empty `messages` list (or `prompt_token_ids`)")
        if self.top_logprobs:
            raise ValueError(f"top_logprobs={self.top_logprobs} is not supported: the engine returns the "
                             "logprob of each sampled token only (use logprobs=true, top_logprobs=0)")
        return self


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.logprobs:
            raise ValueError(f"logprobs={self.logprobs} is not supported: the engine returns the logprob of "
                             "each sampled token only (use logprobs=0)")
        if self.echo:
            raise ValueError("echo=true is not supported")
        if self.stream:
            raise ValueError("stream=true is only served on /v1/chat/completions")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("expected a non-empty `prompt`")
        return self


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI chat messages as chat templates take them.

    Text content parts are joined, `developer` becomes `system`, and tool-call
    arguments given as a JSON string become a dict (what most templates expect).
    Raises ValueError naming the offending message.
    """
    out = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}].role must be system, developer, user, assistant or tool, got {role!r}")
        item = {k: v for k, v in message.items() if v is not None}
        item["role"] = "system" if role == "developer" else role
        item["content"] = _text(message.get("content"), f"messages[{i}].content")
        if message.get("tool_calls"):
            item["tool_calls"] = [_template_call(c, f"messages[{i}].tool_calls[{j}]")
                                  for j, c in enumerate(message["tool_calls"])]
        out.append(item)
    return out


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ValueError(f"{where} must be a string or a list of text parts ({{'type': 'text', 'text': ...}})")


def _template_call(call: Any, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must look like {{'type': 'function', 'function': {{'name': ..., 'arguments': ...}}}}")
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON: {e}") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object")
    return {"type": "function", "id": call.get("id"), "function": {"name": function["name"], "arguments": arguments}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completions: list[Completion]) -> dict:
    completion_tokens = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ChatTurn:
    """One sampled choice, read as an assistant message (prose, tool calls, raw text)."""

    def __init__(self, tokenizer, completion: Completion, parse_tools: bool):
        self.tokenizer, self.completion = tokenizer, completion
        self.raw = sampled_text(tokenizer, completion)
        parsed = parse_action(self.raw) if parse_tools else None
        self.tool_calls = [
            {"id": new_id("call"), "type": "function",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
            for call in (parsed.tool_calls if parsed else ())
        ]
        self.content = (parsed.content or None) if self.tool_calls else self.raw
        if not completion.finished:
            self.finish_reason = "length"
        else:
            self.finish_reason = "tool_calls" if self.tool_calls else "stop"

    def choice(self, index: int, with_logprobs: bool) -> dict:
        message = {"role": "assistant", "content": self.content, "raw_content": self.raw}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        ids = self.completion.token_ids
        return {"index": index, "message": message, "finish_reason": self.finish_reason,
                "logprobs": self._logprobs(ids, self.completion.logprobs) if with_logprobs else None,
                "token_ids": ids}

    def chunks(self, index: int, with_logprobs: bool) -> Iterator[dict]:
        """Stream deltas whose content joins to `content`, then the finish delta."""
        if self.tool_calls:
            pieces = [(self.content or "", self.completion.token_ids)]
        else:
            pieces = text_pieces(self.tokenizer, self.completion, self.raw)
        start = 0
        for text, ids in pieces:
            logprobs = self.completion.logprobs[start:start + len(ids)]
            start += len(ids)
            yield {"index": index, "delta": {"content": text}, "finish_reason": None,
                   "logprobs": self._logprobs(ids, logprobs) if with_logprobs else None, "token_ids": ids}
        if self.tool_calls:
            calls = [{"index": i, **call} for i, call in enumerate(self.tool_calls)]
            yield {"index": index, "delta": {"tool_calls": calls, "raw_content": self.raw},
                   "finish_reason": None, "logprobs": None, "token_ids": []}
        yield {"index": index, "delta": {}, "finish_reason": self.finish_reason, "logprobs": None, "token_ids": []}

    def _logprobs(self, ids: list[int], logprobs: list[float]) -> dict:
        tokens = [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")), "top_logprobs": []}
                            for t, lp in zip(tokens, logprobs)]}


def text_pieces(tokenizer, completion: Completion, text: str) -> list[tuple[str, list[int]]]:
    """Split a turn into `(text delta, ids)` pieces, one per token where the text allows.

    A token that ends inside a multi-byte character (or whose prefix decoding is not a
    prefix of `text`) is held back and joins the next piece, so the deltas always join
    to exactly `text`. The stop token, which has no text, ends the last piece.
    """
    ids = completion.token_ids
    body = ids[:-1] if completion.finished else ids
    pieces, emitted, held = [], "", []
    for k, token in enumerate(body, start=1):
        held.append(token)
        prefix = tokenizer.decode(body[:k], skip_special_tokens=False)
        if prefix.startswith(emitted) and text.startswith(prefix) and not prefix.endswith("\ufffd"):
            pieces.append((prefix[len(emitted):], held))
            emitted, held = prefix, []
    tail = held + ids[len(body):]
    if tail or text != emitted:
        pieces.append((text[len(emitted):], tail))
    return pieces


def completion_choice(tokenizer, index: int, completion: Completion, prompt_ids: list[int],
                      with_logprobs: bool) -> dict:
    """One `/v1/completions` choice, with vLLM's `token_ids` and `prompt_token_ids`."""
    ids = completion.token_ids
    logprobs = None
    if with_logprobs:
        tokens = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
        offsets = [0, *accumulate(len(t) for t in tokens)][:len(tokens)]
        logprobs = {"tokens": tokens, "token_logprobs": completion.logprobs,
                    "top_logprobs": None, "text_offset": offsets}
    return {"index": index, "text": sampled_text(tokenizer, completion), "logprobs": logprobs,
            "finish_reason": "stop" if completion.finished else "length",
            "token_ids": ids, "prompt_token_ids": prompt_ids}


def created() -> int:
    return int(time.time())
