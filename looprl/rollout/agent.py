"""The agent loop: one episode, token-in/token-out.

The ids the engine sampled are kept as they are; only the environment's new messages
are rendered with the chat template and appended. Rendering a suffix on its own needs
a template that is prefix-stable (rendering `messages + new` starts with the rendering
of `messages`), which holds for Hermes/Qwen-style templates; `ObservationTemplater`
checks it and fails loudly otherwise.

With a context window of W turns, a long episode is played as chunks (see
`run_episode`): the model's context stays at most the prompt plus 2W turns however
many turns the episode takes, and every sampled id is still kept as sampled.

Environment calls run off the event loop, on a daemon thread (by default one per episode), and a faulty
environment (it raises, hangs past `step_timeout_s`, returns garbage) loses its episode
with an `EpisodeError` (`looprl.rollout.envcalls`), never the process.
"""

from __future__ import annotations

from looprl.rollout.engine import Completion, GenerationRequest, InferenceEngine, SamplingParams, stream_seed
from looprl.rollout.envcalls import EnvWorker, EpisodeError, check_reset, check_step
from looprl.rollout.turns import EpisodeTurn, TurnBoard, enter_episode, exit_episode, turn_board
from looprl.types import Episode, Trajectory

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

    def context(self) -> list[int]:
        """The ids to ask the next turn with (a copy: the request must not change as
        the builder grows after the call)."""
        return list(self.input_ids)

    def build(self, **fields) -> Trajectory:
        return Trajectory(
            input_ids=self.input_ids, loss_mask=self.loss_mask,
            behaviour_logprobs=self.logprobs, turn_spans=self.turn_spans,
            turn_rewards=self.turn_rewards, **fields,
        )


class ChunkedBuilder:
    """Accumulates one episode as chunks that keep only the last turns in context.

    A chunk is the prompt, then the last `window` turns of the chunk before it (each
    turn: its sampled ids, the eos appended if it was cut, and the observation ids
    that followed it, all reused as they are, with loss mask 0), then new turns. Once
    a chunk holds `2 * window` turns, the next turn opens a new chunk. The first chunk
    carries nothing, so it trains its first `2 * window` turns; every later chunk
    trains `window` new turns.
    """

    def __init__(self, prompt_ids: list[int], eos_id: int, window: int):
        if window < 1:
            raise ValueError(f"Expect `context_window` to be >= 1, actually: {window}")
        self.prompt_ids, self.eos_id, self.window = list(prompt_ids), eos_id, window
        self.closed: list[TrajectoryBuilder] = []
        self.current = TrajectoryBuilder(prompt_ids, eos_id)
        self.turn_starts: list[int] = []  # where each turn of `current`, carried or new, begins

    @property
    def turn_rewards(self) -> list[float]:
        """The rewards of the turns sampled in the current chunk."""
        return self.current.turn_rewards

    def context(self) -> list[int]:
        """The ids to ask the next turn with; opens a new chunk when this one is full."""
        if len(self.turn_starts) == 2 * self.window:
            keep_from = self.turn_starts[self.window]
            self.closed.append(self.current)
            # TrajectoryBuilder masks its prompt: the carried turns train nothing here.
            self.current = TrajectoryBuilder(self.prompt_ids + self.current.input_ids[keep_from:], self.eos_id)
            shift = len(self.prompt_ids) - keep_from
            self.turn_starts = [start + shift for start in self.turn_starts[self.window:]]
        return self.current.context()

    def add_turn(self, completion: Completion) -> None:
        self.turn_starts.append(len(self.current.input_ids))
        self.current.add_turn(completion)

    def add_observation(self, ids: list[int]) -> None:
        self.current.add_observation(ids)

    def build(self, *, terminated: bool, truncated: bool, info: dict, **fields) -> Episode:
        """The chunks; the last one carries the episode's end and `info`."""
        chunks = self.closed + [self.current]
        if len(chunks) > 1 and not self.current.turn_spans:
            chunks.pop()  # opened, then cut by max_tokens before any turn: nothing to train
        *body, last = chunks
        return Episode([
            *(c.build(terminated=False, truncated=False, info={"chunk": i}, **fields) for i, c in enumerate(body)),
            last.build(terminated=terminated, truncated=truncated, info={**info, "chunk": len(body)}, **fields),
        ])


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
    context_window: int | None = None,
    reset_options: dict | None = None,
    step_timeout_s: float | None = None,
    worker: EnvWorker | None = None,
    sample_seed: int | None = None,
) -> Trajectory | Episode:
    """Play one episode of `env` with the policy behind `engine`.

    Without a context window the episode is one `Trajectory`: every turn is appended
    to one growing sequence. With `context_window=W` it is an `Episode` of chunks (see
    `ChunkedBuilder`): each chunk is the prompt, the last W turns of the chunk before
    it as context (loss mask 0), then up to W new turns (2W in the first chunk) with
    loss mask 1 on their sampled ids. Each turn is sampled from its chunk's ids up to
    that turn, so every sampled id is trained exactly once, in the context it was
    sampled in, and the context never exceeds the prompt plus 2W turns. Observations
    are templated once and their ids reused in both chunks that hold them. The
    episode then ends by the environment's own turn limit; `max_tokens` bounds each
    chunk. Long-horizon environments should bound their own observations too
    (Hanoi's `window`).

    The environment's `reset` and `step` run on a daemon thread of the episode's own
    (see `looprl.rollout.envcalls`), so a slow tool never blocks the event loop and
    the tools of concurrent episodes run at the same time; the episode tells the
    engine when it is away (`looprl.rollout.turns`), so turn-level batches stay what
    they would be if the calls ran on the loop.

    Args:
        env: a looprl environment (Gymnasium API, text actions). After an
            `env_timeout` it is still in use by an abandoned thread: drop it.
        engine: where turns are sampled.
        tokenizer: the policy's tokenizer (chat template included).
        templater: renders observations for this tokenizer.
        params: sampling settings for every turn.
        seed: the reset seed; the same seed gives the same task.
        max_tokens: the episode is truncated once its ids (with a window: the current
            chunk's ids) exceed this length.
        group_id: recorded on the trajectory (on every chunk).
        context_window: the most recent turns kept in the model's context; None keeps
            the whole episode.
        reset_options: passed to `env.reset` (e.g. a history to replay, for ExIt).
        step_timeout_s: the longest one `reset` or `step` call may take (None: no limit).
        worker: the thread to run the environment's calls on, with its own timeout (e.g.
            one shared by episodes whose environment is not thread-safe); None: a new
            one of the episode's own, with `step_timeout_s`, ended with the episode.
        sample_seed: None samples from the process's torch random stream; a seed gives
            turn t the stream `stream_seed(sample_seed, t)` of its own, so the episode's
            tokens do not depend on the other episodes played with it (see `GenerationRequest`).

    Returns:
        A `Trajectory` when `context_window` is None, else an `Episode`; both have the
        episode's `reward`, `info`, `terminated`, `truncated` and the `chunks` to train.

    Raises:
        EpisodeError: the episode is lost: the environment raised (`env_error`), ran
            past `step_timeout_s` (`env_timeout`), returned something that is not
            Gymnasium's `(obs, info)` / `(obs, reward, terminated, truncated, info)` with
            a str obs, a finite reward and `info["messages"]` (`env_garbage`), or the
            engine failed (`engine_error`). Other errors (a bad chat template) propagate.
    """
    owned = worker is None
    worker = EnvWorker(step_timeout_s) if owned else worker
    board = turn_board()
    turn = board.start()
    token = enter_episode(turn)
    try:
        return await _play(engine, tokenizer, templater, params, _EnvCalls(env, worker, board, turn),
                           seed=seed, max_tokens=max_tokens, group_id=group_id, context_window=context_window,
                           reset_options=reset_options, sample_seed=sample_seed)
    finally:
        board.end(turn)
        exit_episode(token)
        if owned:
            worker.close()


class _EnvCalls:
    """One episode's checked environment calls on its worker, reported to the board."""

    def __init__(self, env, worker: EnvWorker, board: TurnBoard, turn: EpisodeTurn):
        self.env, self.worker, self.board, self.turn = env, worker, board, turn

    async def reset(self, seed: int, options: dict | None) -> tuple[str, dict]:
        return check_reset(await self._call("reset", self.env.reset, seed=seed, options=options))

    async def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        return check_step(await self._call("step", self.env.step, action))

    async def _call(self, what: str, fn, *args, **kwargs):
        self.board.touch(self.turn)
        try:
            return await self.worker.call(what, fn, *args, **kwargs)
        finally:
            self.board.touch(self.turn)


async def _play(engine: InferenceEngine, tokenizer, templater: ObservationTemplater, params: SamplingParams,
                calls: _EnvCalls, *, seed: int, max_tokens: int, group_id: int, context_window: int | None,
                reset_options: dict | None, sample_seed: int | None) -> Trajectory | Episode:
    _, info = await calls.reset(seed, reset_options)
    prompt_ids = chat_ids(tokenizer, info["messages"], info["tools"])
    if context_window is None:
        builder = TrajectoryBuilder(prompt_ids, tokenizer.eos_token_id)
    else:
        builder = ChunkedBuilder(prompt_ids, tokenizer.eos_token_id, context_window)
    task_id, version = info["task_id"], engine.version
    terminated = truncated = False
    step_info: dict = {}
    turns = 0
    while not (terminated or truncated):
        context = builder.context()
        budget = max_tokens - len(context)
        if budget <= 0:
            truncated = True
            break
        turn_seed = None if sample_seed is None else stream_seed(sample_seed, turns)
        completion = await _sample(engine, GenerationRequest(context, _clip_params(params, budget), turn_seed))
        turns += 1
        version = min(version, completion.version)
        builder.add_turn(completion)
        _, reward, terminated, truncated, step_info = await calls.step(sampled_text(tokenizer, completion))
        builder.turn_rewards.append(reward)
        if not (terminated or truncated):
            builder.add_observation(templater(step_info["messages"]))
    return builder.build(
        task_id=task_id, group_id=group_id, policy_version=version,
        terminated=terminated, truncated=truncated,
        info={"success": bool(step_info.get("success", False))},
    )


async def _sample(engine: InferenceEngine, request: GenerationRequest) -> Completion:
    try:
        (completion,) = await engine.generate([request])
    except Exception as e:
        raise EpisodeError("engine_error", f"generate raised {type(e).__name__}: {e}") from e
    return completion


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
