"""`looprl serve`'s bounds on servers with small limits: the queue, the body, max_tokens,
a failing engine and a client that leaves.

The engines here are scripted: `GatedEngine` holds every request until the test opens
its gate, so which requests are admitted does not depend on how fast the machine is.
Servers run uvicorn in a thread on loopback (`serve_in_thread`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from looprl.rollout.engine import Completion  # noqa: E402
from looprl.rollout.server import build_app  # noqa: E402
from tests.rollout.test_serve import MESSAGES, MODEL, assert_openai_error, serve_in_thread  # noqa: E402

GOOD = {"model": MODEL, "prompt": [5, 6], "max_tokens": 2, "temperature": 0}
WAIT_S = 120  # generous: the machine is shared; no test asserts how long anything took


class GatedEngine:
    """Answers each request with its stop token, once `gate` is open (or with `error`)."""

    version = 0

    def __init__(self, stop_id: int, error: Exception | None = None):
        self.stop_id, self.error = stop_id, error
        self.gate = threading.Event()  # opened from the test's thread
        self.asked = 0

    async def generate(self, requests):
        self.asked += len(requests)
        deadline = time.monotonic() + WAIT_S
        while not self.gate.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError("the test never opened the gate")
            await asyncio.sleep(0.01)
        if self.error is not None:
            raise self.error
        return [Completion([self.stop_id], [-0.5], True, 0) for _ in requests]

    def update_weights(self, state_dict=None) -> None:
        self.version += 1


def gated_app(tokenizer, engine: GatedEngine, **limits):
    return build_app(engine, tokenizer, MODEL, vocab_size=len(tokenizer), max_model_len=64, **limits)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def test_a_full_queue_answers_429_at_once_and_every_request_completes(tokenizer):
    engine = GatedEngine(tokenizer.eos_token_id)
    app = gated_app(tokenizer, engine, max_queue=4)
    with serve_in_thread(app) as root:
        async def flood() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(timeout=WAIT_S, limits=limits) as http:
                tasks = [asyncio.ensure_future(http.post(f"{root}/completions", json=GOOD)) for _ in range(50)]
                try:
                    # The refused come back while the admitted still wait for the gate.
                    deadline = time.monotonic() + WAIT_S
                    while sum(t.done() for t in tasks) < 46 and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    client = openai.OpenAI(base_url=root, api_key="unused", max_retries=0)
                    with pytest.raises(openai.RateLimitError, match="server is busy"):
                        await asyncio.to_thread(client.completions.create, **GOOD)
                    health = (await http.get(root.removesuffix("/v1") + "/health")).json()
                    assert (health["admitted"], health["max_queue"]) == (4, 4)
                finally:
                    engine.gate.set()
                return await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)

        responses = asyncio.run(flood())
        statuses = [r.status_code for r in responses]
        assert statuses.count(200) == 4 and statuses.count(429) == 46, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert_openai_error(refused, 429)
        assert refused.headers["retry-after"] == "1"
        assert engine.asked == 4  # the refused never reached the engine
        assert httpx.post(f"{root}/completions", json=GOOD, timeout=WAIT_S).status_code == 200
        # A request leaves the queue just after its answer's last byte is sent.
        wait_until(lambda: app.state.admission.admitted == 0, "every request has left the queue")
        assert app.state.admission.refused == 47


def test_bodies_over_the_limit_get_413_with_or_without_content_length(tokenizer):
    engine = GatedEngine(tokenizer.eos_token_id)
    engine.gate.set()

    def chunks():  # no Content-Length: the limit is checked while reading
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(50):
            yield b"a" * 1000
        yield b'"}'

    with serve_in_thread(gated_app(tokenizer, engine, max_body_bytes=10_000)) as root, httpx.Client(
            timeout=WAIT_S) as http:
        headers = {"content-type": "application/json"}
        declared = http.post(f"{root}/completions", json={**GOOD, "prompt": "a" * 20_000})
        assert "10000 bytes" in assert_openai_error(declared, 413)["message"]
        chunked = http.post(f"{root}/completions", content=chunks(), headers=headers)
        assert_openai_error(chunked, 413)
        assert http.post(f"{root}/completions", json=GOOD).status_code == 200
    assert engine.asked == 1


def test_max_tokens_limit_bounds_asked_and_default_turns(tokenizer):
    engine = GatedEngine(tokenizer.eos_token_id)
    engine.gate.set()
    with serve_in_thread(gated_app(tokenizer, engine, max_tokens_limit=8)) as root:
        response = httpx.post(f"{root}/completions", json={**GOOD, "max_tokens": 9}, timeout=WAIT_S)
        assert "more than the 8 tokens" in assert_openai_error(response, 400, "max_tokens")["message"]
        assert httpx.post(f"{root}/completions", json={**GOOD, "max_tokens": None}, timeout=WAIT_S).status_code == 200


def test_an_engine_failure_is_a_500_in_the_openai_shape(tokenizer):
    engine = GatedEngine(tokenizer.eos_token_id, error=RuntimeError("the engine broke"))
    engine.gate.set()
    with serve_in_thread(gated_app(tokenizer, engine)) as root:
        client = openai.OpenAI(base_url=root, api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="the engine broke"):
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        response = httpx.post(f"{root}/completions", json=GOOD, timeout=WAIT_S)
        assert "RuntimeError: the engine broke" in assert_openai_error(response, 500)["message"]
        assert httpx.get(f"{root}/models", timeout=WAIT_S).status_code == 200


def test_a_client_that_leaves_before_its_answer_gets_one_log_line(tokenizer, caplog):
    engine = GatedEngine(tokenizer.eos_token_id)
    app = gated_app(tokenizer, engine)
    caplog.set_level(logging.WARNING)
    with serve_in_thread(app) as root:
        try:
            with pytest.raises(httpx.TimeoutException):  # httpx drops the connection at its timeout
                httpx.post(f"{root}/completions", json=GOOD, timeout=2)
            wait_until(lambda: any("disconnected" in r.getMessage() for r in caplog.records), "the line is logged")
        finally:
            engine.gate.set()
        wait_until(lambda: app.state.admission.admitted == 0, "the handler ends")
        assert httpx.post(f"{root}/completions", json=GOOD, timeout=WAIT_S).status_code == 200
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "disconnected before its answer was complete" in lines[0] and "POST /v1/completions" in lines[0]


@pytest.mark.parametrize("limits, expected", [
    ({"max_queue": 0}, "max_queue"),
    ({"max_n": -1}, "max_n"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"max_prompt_tokens": 64}, "max_prompt_tokens"),
    ({"max_tokens_limit": 0}, "max_tokens_limit"),
    ({"min_temperature": -1.0}, "min_temperature"),
])
def test_build_app_refuses_bounds_it_cannot_keep(tokenizer, limits, expected):
    with pytest.raises(ValueError, match=expected):
        gated_app(tokenizer, GatedEngine(tokenizer.eos_token_id), **limits)
