"""`looprl serve` speaks the OpenAI API, and `OpenAIEngine` samples token-exactly through it.

The real server runs as a `looprl serve` subprocess on the small tiny model; servers
whose engine is scripted (to make the model call tools) run uvicorn in a thread. Only
loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from looprl.cli import main  # noqa: E402
from looprl.envs import make_env, run_oracle  # noqa: E402
from looprl.rollout.agent import ObservationTemplater, chat_ids, run_episode  # noqa: E402
from looprl.rollout.engine import Completion, GenerationRequest, HFEngine, SamplingParams  # noqa: E402
from looprl.rollout.openai_api import text_pieces  # noqa: E402
from looprl.rollout.openai_engine import OpenAIEngine  # noqa: E402
from looprl.rollout.server import build_app  # noqa: E402
from looprl.train.batch import collate, policy_logprobs  # noqa: E402

MODEL = "tiny"
ENV_ID = "looprl/Calc-v0"
TOLERANCE = 1e-4
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    """The file the `server` fixture's stdout and stderr go to."""
    return tmp_path_factory.mktemp("serve") / "serve.log"


@contextmanager
def looprl_serve(model_path: str, log_path, *flags: str, start_s: float = 120):
    """`looprl serve MODEL --port P *flags` in a subprocess logging to `log_path`; yields its API root."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "looprl.cli", "serve", model_path, "--port", str(port), *flags],
                                stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_s
        while True:
            assert proc.poll() is None, f"looprl serve exited early:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"looprl serve did not start:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield f"{root}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model_path, server_log):
    """`looprl serve` on the small tiny model, in a subprocess; yields the API root."""
    with looprl_serve(tiny_model_path, server_log, "--served-model-name", MODEL, "--max-batch-size", "8") as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_engine(tiny_model_path, tokenizer):
    from looprl.train.models import load_model

    return HFEngine(load_model(tiny_model_path), tokenizer)


class ScriptedEngine:
    """Answers every request with the next scripted completion."""

    version = 0

    def __init__(self, completions: list[Completion]):
        self.script = list(completions)

    async def generate(self, requests):
        return [self.script.pop(0) for _ in requests]

    def update_weights(self, state_dict=None) -> None:
        self.version += 1


@contextmanager
def serve_in_thread(app):
    """Run `app` with uvicorn on a free loopback port; yields the API root."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def oracle_completions(tokenizer, seed: int) -> list[Completion]:
    eos = tokenizer.eos_token_id
    return [Completion(ids, [-0.25] * len(ids), True, 0)
            for ids in (tokenizer.encode(a, add_special_tokens=False) + [eos] for a in run_oracle(ENV_ID, seed))]


def scripted_app(tokenizer, completions):
    return build_app(ScriptedEngine(completions), tokenizer, MODEL, vocab_size=len(tokenizer), max_model_len=2048)


# (a) The official openai client.

def test_chat_completion_returns_text_token_ids_and_logprobs(client, tokenizer, hf_engine):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                              logprobs=True, extra_body={"return_token_ids": True})
    (choice,) = response.choices
    prompt_ids = response.model_extra["prompt_token_ids"]
    assert prompt_ids == chat_ids(tokenizer, MESSAGES, None)
    ids = choice.model_extra["token_ids"]
    (expected,) = hf_engine.generate_batch([GenerationRequest(prompt_ids, SamplingParams(12, 0.0))])
    assert ids == expected.token_ids
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected.logprobs, abs=TOLERANCE)
    assert choice.finish_reason == ("stop" if expected.finished else "length")
    text = tokenizer.decode(ids[:-1] if expected.finished else ids, skip_special_tokens=False)
    assert choice.message.content == choice.message.model_extra["raw_content"] == text
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == len(ids)


def test_stream_assembles_to_the_non_streamed_answer(client):
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    choices = [c.choices[0] for c in chunks if c.choices]
    assert choices[0].delta.role == "assistant"
    assert "".join(c.delta.content or "" for c in choices) == whole.message.content
    assert [t for c in choices for t in c.model_extra["token_ids"]] == whole.model_extra["token_ids"]
    assert choices[-1].finish_reason == whole.finish_reason
    assert chunks[-1].usage.completion_tokens == len(whole.model_extra["token_ids"])


def test_stream_pieces_hold_back_partial_characters(tokenizer):
    text = "Σ = 2 € 😀 done"
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids[:-1]) == text  # byte-level: some characters span several tokens
    pieces = text_pieces(tokenizer, Completion(ids, [0.0] * len(ids), True, 0), text)
    assert "".join(t for t, _ in pieces) == text
    assert [i for _, piece in pieces for i in piece] == ids
    assert not any("\ufffd" in t for t, _ in pieces) and len(pieces) > 5


def test_chat_takes_prompt_token_ids_instead_of_messages(client):
    kwargs = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    rendered = client.chat.completions.create(messages=MESSAGES, **kwargs)
    prompt_ids = rendered.model_extra["prompt_token_ids"]
    raw = client.chat.completions.create(messages=[], extra_body={"prompt_token_ids": prompt_ids}, **kwargs)
    assert raw.model_extra["prompt_token_ids"] == prompt_ids
    assert raw.choices[0].model_extra["token_ids"] == rendered.choices[0].model_extra["token_ids"]


def test_n_greedy_choices_are_equal(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({json.dumps(c.model_extra["token_ids"]) for c in response.choices}) == 1


def test_tools_and_tool_call_history_render_with_the_chat_template(client, tokenizer):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "calculator", "arguments": '{"expression": "2 + 3"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    response = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=2)
    as_template = history[:2] + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "calculator", "arguments": {"expression": "2 + 3"}}}]},
        {"role": "tool", "content": "5"},
    ]
    assert response.model_extra["prompt_token_ids"] == chat_ids(tokenizer, as_template, TOOLS)


def test_hermes_tool_calls_become_openai_tool_calls(tokenizer):
    calc_turn = oracle_completions(tokenizer, seed=3)[0]
    raw = tokenizer.decode(calc_turn.token_ids[:-1])
    with serve_in_thread(scripted_app(tokenizer, [calc_turn, calc_turn])) as root:
        client = openai.OpenAI(base_url=root, api_key="unused", max_retries=0)
        kwargs = {"model": MODEL, "messages": MESSAGES, "tools": TOOLS}
        (choice,) = client.chat.completions.create(**kwargs).choices
        chunks = [c.choices[0] for c in client.chat.completions.create(**kwargs, stream=True)]

    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == json.loads(raw[raw.index("{"):raw.rindex("}") + 1])["arguments"]
    assert choice.message.model_extra["raw_content"] == raw
    assert not choice.message.content
    (streamed,) = [d for c in chunks for d in (c.delta.tool_calls or [])]
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)
    assert chunks[-1].finish_reason == "tool_calls"


# (b) OpenAIEngine: token-in/token-out through the server.

def test_openai_engine_matches_hf_engine_at_temperature_0(server, tokenizer, hf_engine):
    _, info = make_env(ENV_ID).reset(seed=0)
    prompts = [chat_ids(tokenizer, info["messages"], info["tools"]), chat_ids(tokenizer, MESSAGES, None)]
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    engine = OpenAIEngine(server, MODEL)
    for prompt in prompts:  # one at a time: the same batch shape on both sides
        (remote,) = asyncio.run(engine.generate([GenerationRequest(prompt, params)]))
        (local,) = hf_engine.generate_batch([GenerationRequest(prompt, params)])
        assert remote.token_ids == local.token_ids
        assert remote.logprobs == pytest.approx(local.logprobs, abs=TOLERANCE)
        assert (remote.finished, remote.version) == (local.finished, 0)


def test_run_episode_through_openai_engine_is_token_exact(server, tokenizer, hf_engine):
    torch.manual_seed(0)
    engine = OpenAIEngine(server, MODEL)
    env = make_env(ENV_ID)

    traj = asyncio.run(run_episode(env, engine, tokenizer, ObservationTemplater(tokenizer),
                                   SamplingParams(max_new_tokens=8, temperature=1.0), seed=1))

    assert traj.num_turns == env.unwrapped.max_turns and traj.truncated  # untrained: garbage turns
    assert sum(traj.loss_mask) == sum(end - start for start, end in traj.turn_spans)
    batch = collate([traj], tokenizer.pad_token_id)
    with torch.no_grad():
        fresh = policy_logprobs(hf_engine.model, batch, temperature=1.0)
    mask = batch.loss_mask.bool()
    assert torch.allclose(fresh[mask], batch.old_logprobs[mask], atol=TOLERANCE)

    engine.update_weights()
    assert engine.version == 1
    with pytest.raises(ValueError, match="remote server"):
        engine.update_weights({"w": torch.zeros(1)})


def test_oracle_episode_through_openai_engine_solves_the_task(tokenizer):
    with serve_in_thread(scripted_app(tokenizer, oracle_completions(tokenizer, seed=4))) as root:
        traj = asyncio.run(run_episode(make_env(ENV_ID), OpenAIEngine(root, MODEL), tokenizer,
                                       ObservationTemplater(tokenizer), SamplingParams(64, 0.0), seed=4))
    assert traj.info["success"] and traj.terminated and traj.num_turns == 2
    assert set(lp for lp, m in zip(traj.behaviour_logprobs, traj.loss_mask) if m) == {-0.25}


def test_openai_engine_needs_token_ids_from_the_server():
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/completions")
    async def plain_completion(body: dict):  # what a server without return_token_ids answers
        return {"choices": [{"index": 0, "text": "hi", "finish_reason": "stop",
                             "logprobs": {"tokens": ["hi"], "token_logprobs": [-0.1]}}]}

    with serve_in_thread(app) as root, pytest.raises(RuntimeError, match="returned no token ids"):
        asyncio.run(OpenAIEngine(root, MODEL).generate([GenerationRequest([1, 2], SamplingParams(4, 0.0))]))


def test_openai_engine_names_an_unreachable_server():
    engine = OpenAIEngine(f"http://127.0.0.1:{free_port()}/v1", MODEL)
    with pytest.raises(RuntimeError, match="Could not reach"):
        asyncio.run(engine.generate([GenerationRequest([1, 2], SamplingParams(4, 0.0))]))


# (c) Bad requests: 400 with a JSON error that says what was wrong.

def test_completions_take_token_id_prompts(server, tokenizer):
    prompt = chat_ids(tokenizer, MESSAGES, None)
    body = {"model": MODEL, "prompt": [prompt, prompt[:-1]], "max_tokens": 4, "temperature": 0, "logprobs": 0}
    response = httpx.post(f"{server}/completions", json=body, timeout=30).json()
    assert [c["prompt_token_ids"] for c in response["choices"]] == [prompt, prompt[:-1]]
    for choice in response["choices"]:
        assert len(choice["token_ids"]) == len(choice["logprobs"]["token_logprobs"]) >= 1


CHAT = {"model": MODEL, "messages": MESSAGES}


@pytest.mark.parametrize("path, body, expected", [
    ("chat/completions", {"model": MODEL}, "messages"),
    ("chat/completions", {**CHAT, "temperature": -1}, "temperature"),
    ("chat/completions", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("chat/completions", {**CHAT, "max_tokens": 10**6}, "context"),
    ("chat/completions", {**CHAT, "top_p": 0.5}, "top_p=0.5 is not supported"),
    ("chat/completions", {**CHAT, "stop": ["\n"]}, "stop"),
    ("chat/completions", {**CHAT, "seed": 1}, "seed"),
    ("chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 3}, "top_logprobs=3"),
    ("chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice"),
    ("chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ("chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "chat template"),
    ("chat/completions", {**CHAT, "prompt_token_ids": [1, 10**7]}, "outside the vocabulary"),
    ("completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "stream": True}, "stream"),
    ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 2}, "logprobs=2"),
    ("completions", {"model": MODEL, "prompt": [-1]}, "outside the vocabulary"),
])
def test_bad_requests_get_400_naming_the_problem(server, path, body, expected):
    response = httpx.post(f"{server}/{path}", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert expected in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_gets_400_and_unknown_model_404(server):
    response = httpx.post(f"{server}/chat/completions", content=b"{not json", timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.post(f"{server}/chat/completions", json={**CHAT, "model": "gpt-4"}, timeout=30)
    assert response.status_code == 404 and "serves `tiny`" in response.json()["error"]["message"]
    models = httpx.get(f"{server}/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == [MODEL]


@pytest.mark.parametrize("argv, expected", [
    (["serve", "/no/such/model"], "does not exist"),
    (["serve", "looprl/tiny", "--max-batch-size", "0"], "--max-batch-size"),
])
def test_serve_cli_errors_are_one_line(capsys, argv, expected):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


# (d) Limits, with `looprl serve`'s defaults: every refusal in OpenAI's error shape,
# and the server answers the next good request.

GOOD = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}
TEN_MB = "10 MB"  # built in the test: a 10 MB value would also become the test's id


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    """The `{"error": {"message", "type", "param", "code"}}` body the `openai` client parses."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["message"] and error["code"] == status and error["param"] == param
    assert error["type"] == {429: "rate_limit_error", 500: "server_error"}.get(status, "invalid_request_error")
    return error


@pytest.mark.parametrize("method, path, body, status, param, expected", [
    ("POST", "completions", TEN_MB, 413, None, "larger than the 1048576 bytes"),
    ("POST", "completions", {"model": MODEL, "prompt": ["hi"] * 2000}, 400, "prompt", "2000 prompts"),
    ("POST", "completions", {"model": MODEL, "prompt": [[5]] * 8, "n": 64}, 400, "n", "512 choices"),
    ("POST", "chat/completions", {**CHAT, "temperature": 1e-300}, 400, "temperature", "temperature=0 for greedy"),
    ("POST", "chat/completions", b'{"model": "tiny", "messages": [], "temperature": NaN}', 400, "temperature",
     "temperature"),
    ("POST", "chat/completions", {**CHAT, "n": 65}, 400, "n", "n=65"),
    ("POST", "completions", {"model": MODEL, "prompt": [5] * 2048}, 400, "prompt", "2048 tokens"),
    ("POST", "chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hi " * 1000}]}, 400, "messages",
     "more than the 2047"),
    ("POST", "completions", {**GOOD, "model": "gpt-4"}, 404, "model", "serves `tiny`"),
    ("GET", "no/such/route", None, 404, None, "Unknown route: GET /v1/no/such/route"),
    ("POST", "models", {}, 405, None, "allowed: GET"),
    ("POST", "chat/completions", b"{not json", 400, None, "not valid JSON"),
    ("POST", "chat/completions", b"[1, 2]", 400, None, "the body"),
], ids=["10MB-body", "2000-prompts", "too-many-choices", "temperature-1e-300", "temperature-NaN", "n-65",
        "prompt-over-context", "messages-over-context", "unknown-model", "unknown-route", "wrong-method",
        "malformed-json", "not-an-object"])
def test_each_refusal_has_the_openai_error_shape_and_the_server_still_answers(server, method, path, body, status,
                                                                               param, expected):
    if body == TEN_MB:
        body = json.dumps({"model": MODEL, "prompt": "a" * 10_000_000}).encode()
    if isinstance(body, dict):
        kwargs = {"json": body}
    else:
        kwargs = {"content": body, "headers": {"content-type": "application/json"}} if body is not None else {}
    response = httpx.request(method, f"{server}/{path}", timeout=120, **kwargs)
    assert expected in assert_openai_error(response, status, param)["message"]
    after = httpx.post(f"{server}/completions", json=GOOD, timeout=120)
    assert after.status_code == 200 and after.json()["choices"][0]["token_ids"]


def test_the_openai_client_raises_its_error_class_for_each_status(client):
    with pytest.raises(openai.BadRequestError, match="temperature=0 for greedy") as bad:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1e-300)
    assert (bad.value.param, bad.value.type, bad.value.code) == ("temperature", "invalid_request_error", "400")
    with pytest.raises(openai.NotFoundError, match="serves `tiny`"):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError, match="Unknown route"):
        client.models.retrieve(MODEL)  # GET /v1/models/{id} is not served
    with pytest.raises(openai.APIStatusError, match="larger than") as large:
        client.completions.create(model=MODEL, prompt="a" * 2_000_000)
    assert large.value.status_code == 413
    assert client.completions.create(**GOOD).choices[0].model_extra["token_ids"]


def test_a_dropped_stream_logs_one_line(server, server_log):
    """A client that leaves mid-stream: one warning, not a warning per unsent chunk
    (the stream used to write itself whole to the dead socket, and asyncio logged
    every write: 3,521 lines for one disconnect)."""
    before = server_log.stat().st_size
    body = {**CHAT, "n": 8, "max_tokens": 512, "stream": True}
    with httpx.stream("POST", f"{server}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i == 4:
                break
    root = server.removesuffix("/v1")
    deadline = time.monotonic() + 120  # the handler ends once it sees the client gone
    while httpx.get(f"{root}/health", timeout=30).json()["admitted"]:
        assert time.monotonic() < deadline, "the dropped stream's handler did not end"
        time.sleep(0.1)
    assert httpx.post(f"{server}/completions", json=GOOD, timeout=120).status_code == 200
    with open(server_log, "rb") as log:
        log.seek(before)
        lines = log.read().decode(errors="replace").splitlines()
    assert len(lines) == 1, "\n".join(lines[:20])
    assert "disconnected before its answer was complete" in lines[0] and "/v1/chat/completions" in lines[0]
