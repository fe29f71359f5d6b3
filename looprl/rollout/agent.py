"""The agent loop: one episode, token-in/token-out.

The ids the engine sampled are kept as they are; only the environment's new messages
are rendered with the chat template and appended. Rendering a suffix on its own needs
a template that is prefix-stable (rendering `messages + new` starts with the rendering
of `messages`), which holds for Hermes/Qwen-style templates; `ObservationTemplater`
checks it and fails loudly otherwise.
"""

from __future__ import annotations

from looprl.rollout.engine import Completion, GenerationRequest, InferenceEngine, SamplingParams
from looprl.types import Trajectory

_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


def chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """Token ids of `messages` rendered with a generation prompt."""
    return list(tokenizer.apply_chat_template(
        messages, tools=tools or None, add_generation_prompt=True, tokenize=True, return_dict=False,
    ))


class ObservationTemplater:
    """Renders the environment's new messages as the tokens that follow a sampled turn."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        base = tokenizer.apply_chat_template(_PROBE, tokenize=False)
        eos = tokenizer.eos_token
        if eos not in base:
            raise ValueError(f"The chat template does not end assistant turns with the eos token {eos!r}")
        # What the template writes after the assistant's eos (e.g. "\n"): the engine
        # stops at eos, so the observation must start with it.
        self._base = base
        self._after_eos = base[base.rindex(eos) + len(eos):]

    def __call__(self, messages: list[dict]) -> list[int]:
        full = self.tokenizer.apply_chat_template(_PROBE + messages, tokenize=False, add_generation_prompt=True)
        if not full.startswith(self._base):
            raise ValueError("The chat template is not prefix-stable; looprl cannot append observations token-exactly")
        text = self._after_eos + full[len(self._base):]
        return self.tokenizer.encode(text, add_special_tokens=False)


class TrajectoryBuilder:
    """Accumulates one episode's ids, loss mask, behaviour logprobs and turn spans."""

    def __init__(self, prompt_ids: list[int], eos_id: int):
        self.eos_id = eos_id
        self.input_ids = list(prompt_ids)
        self.loss_mask = [0] * len(prompt_ids)
        self.logprobs = [0.0] * len(prompt_ids)
        self.turn_spans: list[tuple[int, int]] = []
        self.turn_rewards: list[float] = []

    def add_turn(self, completion: Completion) -> None:
        start = len(self.input_ids)
        self.input_ids += completion.token_ids
        self.loss_mask += [1] * len(completion.token_ids)
        self.logprobs += completion.logprobs
        self.turn_spans.append((start, len(self.input_ids)))
        if not completion.finished:  # cut at max_new_tokens: close the turn, unsampled
            self.input_ids.append(self.eos_id)
            self.loss_mask.append(0)
            self.logprobs.append(0.0)

    def add_observation(self, ids: list[int]) -> None:
        self.input_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def build(self, **fields) -> Trajectory:
        return Trajectory(
            input_ids=self.input_ids, loss_mask=self.loss_mask,
            behaviour_logprobs=self.logprobs, turn_spans=self.turn_spans,
            turn_rewards=self.turn_rewards, **fields,
        )


def sampled_text(tokenizer, completion: Completion) -> str:
    """The turn's text as the environment sees it (without the stop token)."""
    ids = completion.token_ids[:-1] if completion.finished else completion.token_ids
    return tokenizer.decode(ids, skip_special_tokens=False)


async def run_episode(
    env,
    engine: InferenceEngine,
    tokenizer,
    templater: ObservationTemplater,
    params: SamplingParams,
    *,
    seed: int,
    max_tokens: int = 2048,
    group_id: int = 0,
) -> Trajectory:
    """Play one episode of `env` with the policy behind `engine`.

    Args:
        env: a looprl environment (Gymnasium API, text actions).
        engine: where turns are sampled.
        tokenizer: the policy's tokenizer (chat template included).
        templater: renders observations for this tokenizer.
        params: sampling settings for every turn.
        seed: the reset seed; the same seed gives the same task.
        max_tokens: the episode is truncated once its ids exceed this length.
        group_id: recorded on the trajectory.
    """
    _, info = env.reset(seed=seed)
    builder = TrajectoryBuilder(chat_ids(tokenizer, info["messages"], info["tools"]), tokenizer.eos_token_id)
    task_id, version = info["task_id"], engine.version
    terminated = truncated = False
    step_info: dict = {}
    while not (terminated or truncated):
        budget = max_tokens - len(builder.input_ids)
        if budget <= 0:
            truncated = True
            break
        # A copy: the request must not change as the builder grows after the call.
        request = GenerationRequest(list(builder.input_ids), _clip_params(params, budget))
        (completion,) = await engine.generate([request])
        version = min(version, completion.version)
        builder.add_turn(completion)
        _, reward, terminated, truncated, step_info = env.step(sampled_text(tokenizer, completion))
        builder.turn_rewards.append(float(reward))
        if not (terminated or truncated):
            builder.add_observation(templater(step_info["messages"]))
    return builder.build(
        task_id=task_id, group_id=group_id, policy_version=version,
        terminated=terminated, truncated=truncated,
        info={"success": bool(step_info.get("success", False))},
    )


def _clip_params(params: SamplingParams, budget: int) -> SamplingParams:
    if params.max_new_tokens <= budget:
        return params
    return SamplingParams(max_new_tokens=budget, temperature=params.temperature)


def expert_trajectory(env, tokenizer, templater: ObservationTemplater, *, seed: int) -> Trajectory:
    """An episode played by the environment's oracle, in the same token layout as a rollout.

    The oracle's text is tokenized (there are no sampled ids to keep); the loss mask
    covers each of its turns and the eos that closes it, which is what SFT trains on.
    """
    _, info = env.reset(seed=seed)
    builder = TrajectoryBuilder(chat_ids(tokenizer, info["messages"], info["tools"]), tokenizer.eos_token_id)
    terminated = truncated = False
    step_info: dict = {}
    while not (terminated or truncated):
        action = env.unwrapped.oracle_action()
        ids = tokenizer.encode(action, add_special_tokens=False) + [tokenizer.eos_token_id]
        builder.add_turn(Completion(ids, [0.0] * len(ids), True, 0))
        _, reward, terminated, truncated, step_info = env.step(action)
        builder.turn_rewards.append(float(reward))
        if not (terminated or truncated):
            builder.add_observation(templater(step_info["messages"]))
    return builder.build(
        task_id=info["task_id"], terminated=terminated, truncated=truncated,
        info={"success": bool(step_info.get("success", False))},
    )
