"""`OpenAIEngine`: the inference-engine protocol over any OpenAI-compatible server.

Token-in, token-out: each request's `prompt_ids` go to the server's `/v1/completions`
as a list of ints (never re-tokenized), and the sampled ids and their logprobs come
back in the answer. The server must return token ids: `looprl serve` always does, and
vLLM (>= 0.10.2) does when asked with `return_token_ids`, which this engine sends.

For vLLM, start the server with `--logprobs-mode processed_logprobs`, so its logprobs
are under the distribution it sampled from (temperature applied), as `HFEngine`'s are
and as the PPO ratio needs; by default vLLM returns the raw model's logprobs. The
engine also sends `top_p=1`, `top_k=-1` and `repetition_penalty=1`, so a model's
`generation_config.json` defaults do not truncate the distribution behind its back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Sequence

import httpx
import torch

from looprl.rollout.engine import Completion, GenerationRequest


class OpenAIEngine:
    """Sample turns on a remote OpenAI-compatible server (vLLM, `looprl serve`).

    Requests run concurrently (up to `max_concurrency` in flight), so a server that
    batches, as both of these do, batches the turns of concurrent episodes.

    Args:
        base_url: the server's API root, e.g. `http://127.0.0.1:8000/v1`.
        model: the model id the server serves.
        api_key: sent as a bearer token when given.
        max_concurrency: the most requests in flight at once.
        timeout: seconds to wait for one completion.
        weights_dir: where `publish` writes the weights for the server to load.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 max_concurrency: int = 64, timeout: float = 600.0, weights_dir: str | None = None):
        if max_concurrency <= 0:
            raise ValueError(f"Expect `max_concurrency` to be positive, actually: {max_concurrency}")
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.version = 0
        self.weights_dir = None if weights_dir is None else Path(weights_dir)
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        client, slots = self._connection()
        version = self.version

        async def one(request: GenerationRequest) -> Completion:
            async with slots:
                return await self._complete(client, request, version)

        return list(await asyncio.gather(*[one(r) for r in requests]))

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Bump the version once the server serves the new weights.

        A remote server's weights cannot be set from here: the trainer (or whoever
        updates the server, e.g. by restarting it on a new checkpoint or through vLLM's
        weight-update API) must do that first, then call this with no state dict.
        """
        if state_dict is not None:
            raise ValueError("OpenAIEngine cannot load a state dict into a remote server; update the "
                             "server's weights, then call update_weights() with no argument")
        self.version += 1

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """`WeightSync.publish`: make the server sample from `state` as `version`.

        A server's weights can only be set through an API of its own: `looprl serve`
        loads them from `POST {base_url}/looprl/weights` (a safetensors file this engine
        writes into `weights_dir`, which the server must be able to read: same machine or
        shared storage). Any other server refuses it (HTTP 404) and the run stops with a
        message, rather than train on samples from weights it never published.
        """
        if self.weights_dir is None:
            raise ValueError("OpenAIEngine.publish needs `weights_dir`: a folder the server can read the weights from")
        from safetensors.torch import save_file

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        path = self.weights_dir / f"weights_v{version}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)
        answer = httpx.post(self.url.removesuffix("/completions") + "/looprl/weights",
                            json={"path": str(path.resolve()), "version": version}, headers=self.headers,
                            timeout=self.timeout)
        if answer.status_code != 200:
            raise RuntimeError(f"The server at {self.url} did not load the published weights v{version} "
                               f"(HTTP {answer.status_code}: {answer.text[:200]}); only `looprl serve` takes them")
        for old in self.weights_dir.glob("weights_v*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)
        self.version = version

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _connection(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        # One client per event loop: each asyncio.run() of an evaluation gets a fresh one.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            limits = httpx.Limits(max_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(headers=self.headers, timeout=self.timeout, limits=limits)
            self._client_loop, self._slots = loop, asyncio.Semaphore(self.max_concurrency)
        return self._client, self._slots

    async def _complete(self, client: httpx.AsyncClient, request: GenerationRequest, version: int) -> Completion:
        payload = {
            "model": self.model, "prompt": request.prompt_ids, "n": 1, "stream": False,
            "max_tokens": request.params.max_new_tokens, "temperature": request.params.temperature,
            "logprobs": 0, "return_token_ids": True,
            "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0,
        }
        try:
            response = await client.post(self.url, json=payload)
        except httpx.HTTPError as e:
            raise RuntimeError(f"Could not reach the OpenAI-compatible server at {self.url}: "
                               f"{type(e).__name__}: {e}") from e
        if response.status_code != 200:
            raise RuntimeError(f"{self.url} answered {response.status_code}: {_error_message(response)}")
        return self._read_choice(response.json()["choices"][0], request, version)

    def _read_choice(self, choice: dict[str, Any], request: GenerationRequest, version: int) -> Completion:
        ids = choice.get("token_ids")
        if ids is None:
            raise RuntimeError(
                f"{self.url} returned no token ids (choices[0].token_ids); OpenAIEngine needs a server that "
                "returns them: `looprl serve`, or vLLM >= 0.10.2 (asked with return_token_ids=true)")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if logprobs is None or len(logprobs) != len(ids) or None in logprobs:
            raise RuntimeError(f"{self.url} returned no logprob for every sampled token "
                               "(choices[0].logprobs.token_logprobs, asked with logprobs=0)")
        echoed = choice.get("prompt_token_ids")
        if echoed is not None and list(echoed) != list(request.prompt_ids):
            raise RuntimeError(f"{self.url} changed the prompt's token ids; it must take them as they are")
        return Completion(list(ids), [float(x) for x in logprobs], choice.get("finish_reason") == "stop", version)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]
