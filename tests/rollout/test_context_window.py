"""Agent-side context window: long episodes as chunks, token-exact (docs/architecture.md, "Trajectory").

With `context_window=W` an episode is a list of chunks: the prompt, the last W turns of
the chunk before (loss mask 0), then new turns (loss mask 1 on the sampled ids); each
turn is asked for with exactly its chunk's ids up to it, every sampled id is trained
once, and a chunk's length does not grow with the episode.
"""

from __future__ import annotations

import asyncio

import gymnasium
import pytest
import torch

from looprl.config import ConfigError, from_dict
from looprl.envs import make_env
from looprl.rollout.agent import ChunkedBuilder, ObservationTemplater, chat_ids, run_episode
from looprl.rollout.collect import collect_groups
from looprl.rollout.engine import Completion, HFEngine, SamplingParams
from looprl.train.update import chunk_rows
from looprl.types import Episode, Trajectory

HANOI = "looprl/Hanoi-v0"


class RecordingEnv(gymnasium.Wrapper):
    """Keeps the reset info and every action and step of one episode."""

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.reset_info, self.actions, self.steps = info, [], []
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.actions.append(action)
        self.steps.append({"reward": reward, "ended": terminated or truncated, "info": info})
        return obs, reward, terminated, truncated, info


class OracleEngine:
    """Samples the environment's oracle move as token ids; every `cut_every`-th turn is
    instead cut at max_new_tokens (a partial call, no eos). Records every request."""

    version = 2

    def __init__(self, env, tokenizer, cut_every: int | None = None, keep_requests: bool = True):
        self.env, self.tokenizer, self.cut_every, self.keep_requests = env, tokenizer, cut_every, keep_requests
        self.requests, self.completions, self.request_lengths = [], [], []

    async def generate(self, requests):
        (request,) = requests
        n = len(self.request_lengths)
        self.request_lengths.append(len(request.prompt_ids))
        ids = self.tokenizer.encode(self.env.unwrapped.oracle_action(), add_special_tokens=False)
        cut = min(5 if self.cut_every and n % self.cut_every == self.cut_every - 1 else len(ids) + 1,
                  request.params.max_new_tokens)
        if cut <= len(ids):
            completion = Completion(ids[:cut], [-1.0 - 0.01 * n] * cut, False, self.version)
        else:
            ids = ids + [self.tokenizer.eos_token_id]
            completion = Completion(ids, [-0.5 - 0.01 * (n + j) for j in range(len(ids))], True, self.version)
        if self.keep_requests:
            self.requests.append(request)
            self.completions.append(completion)
        return [completion]


def play(tokenizer, env_kwargs, *, seed=0, window=None, cut_every=None, max_tokens=100_000, keep_requests=True,
         **run_kwargs):
    env = RecordingEnv(make_env(HANOI, **env_kwargs))
    engine = OracleEngine(env, tokenizer, cut_every, keep_requests)
    episode = asyncio.run(run_episode(
        env, engine, tokenizer, ObservationTemplater(tokenizer), SamplingParams(max_new_tokens=64),
        seed=seed, max_tokens=max_tokens, **({"context_window": window} if window is not None else {}), **run_kwargs,
    ))
    return episode, env, engine


def check_chunks(episode: Episode, window: int, env: RecordingEnv, engine: OracleEngine, tokenizer) -> None:
    """Assert the chunk layout of `episode` against what its engine and env recorded."""
    chunks, completions = episode.chunks, engine.completions
    prompt = chat_ids(tokenizer, env.reset_info["messages"], env.reset_info["tools"])

    # Every sampled id is trained exactly once: the masked ids of the chunks, in order,
    # are the engine's ids, with its logprobs, and nothing else is masked.
    assert [t for c in chunks for t, m in zip(c.input_ids, c.loss_mask) if m] == \
        [t for c in completions for t in c.token_ids]
    assert [lp for c in chunks for lp, m in zip(c.behaviour_logprobs, c.loss_mask) if m] == \
        [lp for c in completions for lp in c.logprobs]
    assert all(set(c.loss_mask) <= {0, 1} for c in chunks)
    assert all(lp == 0.0 for c in chunks for lp, m in zip(c.behaviour_logprobs, c.loss_mask) if not m)
    assert episode.num_turns == len(completions) == len(env.steps)
    assert episode.num_sampled_tokens == sum(len(c.token_ids) for c in completions)

    # The first chunk trains 2W turns, each later one W; rewards follow their turns.
    sizes = [c.num_turns for c in chunks]
    assert sizes[0] == min(2 * window, len(completions)) and all(0 < s <= window for s in sizes[1:])
    assert all(s == window for s in sizes[1:-1])
    assert [r for c in chunks for r in c.turn_rewards] == [float(s["reward"]) for s in env.steps]
    assert episode.reward == pytest.approx(sum(s["reward"] for s in env.steps))

    # Token-in: each turn was asked for with exactly its chunk's ids before it, and the
    # span holds the engine's ids.
    spans = [(c, start, end) for c in chunks for start, end in c.turn_spans]
    assert [r.prompt_ids for r in engine.requests] == [c.input_ids[:start] for c, start, _ in spans]
    assert [c.input_ids[s:e] for c, s, e in spans] == [list(comp.token_ids) for comp in completions]

    # Each chunk starts with the prompt; a later one then carries the previous chunk's
    # last W turns as they were (sampled ids, eos of a cut turn, observation), unmasked.
    for k, chunk in enumerate(chunks):
        assert chunk.input_ids[:len(prompt)] == prompt
        carried = [] if k == 0 else chunks[k - 1].input_ids[chunks[k - 1].turn_spans[-window][0]:]
        head = len(prompt) + len(carried)
        assert chunk.input_ids[len(prompt):head] == carried and chunk.turn_spans[0][0] == head
        assert not any(chunk.loss_mask[:head])

    # Decoded, each chunk is the chat template's rendering of the task and of the turns
    # it holds (carried and new), ending with a generation prompt unless the episode ends.
    first_turn = [0] + [2 * window + window * (k - 1) for k in range(1, len(chunks))]
    for k, chunk in enumerate(chunks):
        begin = 0 if k == 0 else first_turn[k] - window
        end = first_turn[k] + chunk.num_turns
        conversation = list(env.reset_info["messages"])
        for action, step in zip(env.actions[begin:end], env.steps[begin:end]):
            conversation.append({"role": "assistant", "content": action})
            if not step["ended"]:
                conversation += step["info"]["messages"]
        ended = env.steps[end - 1]["ended"]
        rendered = tokenizer.apply_chat_template(
            conversation, tools=env.reset_info["tools"], add_generation_prompt=not ended, tokenize=False)
        decoded = tokenizer.decode(chunk.input_ids, skip_special_tokens=False)
        assert decoded + ("\n" if ended else "") == rendered

    # The episode's end belongs to its last chunk.
    assert all(not c.terminated and not c.truncated and "success" not in c.info for c in chunks[:-1])
    assert [c.info["chunk"] for c in chunks] == list(range(len(chunks)))
    assert (episode.terminated, episode.truncated) == (chunks[-1].terminated, chunks[-1].truncated)
    assert all(c.policy_version == engine.version for c in chunks)


def test_without_window_the_episode_is_the_same_trajectory(tokenizer):
    kwargs = {"num_disks": 4, "start": "standard", "window": 2}
    default, _, default_engine = play(tokenizer, kwargs, cut_every=4)
    explicit, _, explicit_engine = play(tokenizer, kwargs, cut_every=4, context_window=None)
    assert isinstance(default, Trajectory) and default.chunks == [default]
    assert explicit == default
    assert [r.prompt_ids for r in explicit_engine.requests] == [r.prompt_ids for r in default_engine.requests]
    assert default.terminated and default.info == {"success": True} and default.num_turns == 15 + 4

    # A window that never fills gives one chunk with exactly the same tokens.
    (single,) = play(tokenizer, kwargs, cut_every=4, window=100)[0].chunks
    assert (single.input_ids, single.loss_mask, single.behaviour_logprobs, single.turn_spans, single.turn_rewards) \
        == (default.input_ids, default.loss_mask, default.behaviour_logprobs, default.turn_spans, default.turn_rewards)
    assert single.info == {"success": True, "chunk": 0} and single.terminated


@pytest.mark.parametrize("window", [1, 2, 3])
def test_chunks_are_token_exact_and_train_every_sampled_token_once(tokenizer, window):
    # 4 disks: 15 oracle moves plus the cut turns, so the last chunk is full or partial
    # depending on the window.
    episode, env, engine = play(tokenizer, {"num_disks": 4, "start": "standard", "window": 2},
                                window=window, cut_every=4)
    assert isinstance(episode, Episode) and len(episode.chunks) >= 3
    assert any(not c.finished for c in engine.completions)
    check_chunks(episode, window, env, engine, tokenizer)
    assert episode.terminated and episode.info["success"] and episode.reward == 1.0


def test_truncated_episode_ends_in_its_last_chunk(tokenizer):
    episode, env, engine = play(tokenizer, {"num_disks": 5, "start": "standard", "max_turns": 11}, window=2)
    check_chunks(episode, 2, env, engine, tokenizer)
    assert episode.truncated and not episode.terminated and not episode.info["success"]
    assert [c.num_turns for c in episode.chunks] == [4, 2, 2, 2, 1]


def test_max_tokens_bounds_every_chunk(tokenizer):
    kwargs = {"num_disks": 4, "start": "standard", "window": 2}
    _, _, unbounded = play(tokenizer, kwargs, window=2)
    max_tokens = max(unbounded.request_lengths) - 10
    episode, env, engine = play(tokenizer, kwargs, window=2, max_tokens=max_tokens)
    assert episode.truncated and not episode.terminated and episode.num_turns < len(unbounded.completions)
    # Each chunk is cut as a single sequence would be: no turn is asked for past
    # max_tokens, and a turn's sampled ids end within it.
    assert max(engine.request_lengths) < max_tokens
    assert all(end <= max_tokens for c in episode.chunks for _, end in c.turn_spans)
    check_chunks(episode, 2, env, engine, tokenizer)


def test_a_chunk_cut_before_its_first_turn_is_dropped():
    """If the carried turns alone reach max_tokens, the episode is truncated with the
    chunk before as its last one (an empty chunk would train nothing)."""
    builder = ChunkedBuilder([1, 2], eos_id=0, window=1)
    for turn in range(2):
        assert builder.context() == builder.current.input_ids
        builder.add_turn(Completion([7, 0], [-0.5, -0.5], True, 1))
        builder.turn_rewards.append(float(turn))
        builder.add_observation([8, 9])
    assert builder.context() == [1, 2, 7, 0, 8, 9]  # prompt + the last turn, carried
    episode = builder.build(terminated=False, truncated=True, info={"success": False},
                            task_id="t", group_id=0, policy_version=1)
    (chunk,) = episode.chunks
    assert chunk.input_ids == [1, 2, 7, 0, 8, 9, 7, 0, 8, 9] and chunk.loss_mask == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    assert episode.truncated and chunk.info == {"success": False, "chunk": 0} and episode.reward == 1.0


def test_bad_window_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="context_window.*>= 1"):
        play(tokenizer, {"num_disks": 3}, window=0)
    assert from_dict({}).rollout.context_window is None
    assert from_dict({"rollout": {"context_window": 4}}).rollout.context_window == 4
    with pytest.raises(ConfigError, match="context_window"):
        from_dict({"rollout": {"context_window": 0}})


def test_thousand_move_hanoi_runs_in_a_bounded_context(tokenizer):
    """1,000 moves of 10-disk Hanoi with a window of 4 turns: the context the model is
    asked with and every chunk stop growing after the first chunks."""
    window = 4
    stats = {}
    for turns in (200, 1000):
        env_kwargs = {"num_disks": 10, "start": "standard", "window": 3, "max_turns": turns}
        episode, env, engine = play(tokenizer, env_kwargs, window=window, keep_requests=False)
        assert episode.num_turns == turns and episode.truncated and len(episode.chunks) == 1 + (turns - 8) // 4
        prompt = len(chat_ids(tokenizer, env.reset_info["messages"], env.reset_info["tools"]))
        # A turn is its sampled ids plus an observation the env bounds with its own window.
        turn_lengths = [b[0] - a[0] for c in episode.chunks for a, b in zip(c.turn_spans, c.turn_spans[1:])]
        bound = prompt + 2 * window * max(turn_lengths)
        longest = max(len(c.input_ids) for c in episode.chunks)
        assert max(engine.request_lengths) < longest <= bound
        # Every turn is held by at most two chunks, so memory is linear in the episode,
        # and the context never grows with it.
        total = sum(len(c.input_ids) for c in episode.chunks)
        assert total <= len(episode.chunks) * prompt + 2 * turns * max(turn_lengths)
        stats[turns] = longest, max(engine.request_lengths), bound
    # The longest chunk and request at 1,000 turns are those at 200 up to a few digits
    # of move numbers; a single sequence would be about 5x longer at 1,000 turns.
    assert stats[1000][0] <= stats[200][0] + 16 and stats[1000][1] <= stats[200][1] + 16
    assert stats[1000][0] < 3000


def fresh_logprobs(model, ids: list[int], temperature: float) -> list[float]:
    """log softmax(logits / T) of each token given the ones before it (index 0: 0.0)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double() / temperature  # (L, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return [0.0] + logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_sampled_chunks_score_the_same_as_sampled(peaked_model, tokenizer):
    """A real engine through collect_groups: each chunk's sampled tokens have, under a
    fresh forward pass of the chunk, the logprobs the engine recorded, so each was
    sampled in exactly the context it is trained in."""
    torch.manual_seed(0)
    engine = HFEngine(peaked_model, tokenizer)
    groups = collect_groups(engine, tokenizer, lambda: make_env("looprl/Calc-v0", max_turns=6), [0, 1], 2,
                            SamplingParams(max_new_tokens=8, temperature=0.8), context_window=1)
    episodes = [e for g in groups for e in g]
    assert all(isinstance(e, Episode) for e in episodes) and sum(len(e.chunks) > 2 for e in episodes) >= 2
    diff = 0.0
    for chunk in (c for e in episodes for c in e.chunks):
        fresh = fresh_logprobs(peaked_model, chunk.input_ids, 0.8)
        diff = max([diff] + [abs(fresh[p] - chunk.behaviour_logprobs[p]) for p, m in enumerate(chunk.loss_mask) if m])
    assert diff < 1e-4


def _chunk(reward: float, *, turns: int = 1, **fields) -> Trajectory:
    n = 3 * turns
    return Trajectory([5] * n, [0, 1, 1] * turns, [0.0, -0.1, -0.2] * turns,
                      turn_spans=[(3 * i + 1, 3 * i + 3) for i in range(turns)],
                      turn_rewards=[0.0] * (turns - 1) + [reward], **fields)


def test_chunks_of_an_episode_share_its_advantage():
    long = Episode([_chunk(0.25, turns=2), _chunk(0.0), _chunk(0.5, terminated=True, info={"success": True})])
    assert (long.reward, long.num_turns, long.num_sampled_tokens) == (0.75, 4, 8)
    assert long.terminated and long.info == {"success": True} and not long.truncated
    short = _chunk(1.0)
    groups = [[long, short], [Episode([_chunk(0.0), _chunk(0.0)]), _chunk(0.0)]]
    advantages = torch.tensor([[-0.25, 0.25], [0.0, 0.0]])
    keep = torch.tensor([[True, True], [False, False]])

    rows = chunk_rows(groups, advantages, keep)
    assert [(t, a) for t, a in rows] == [(c, -0.25) for c in long.chunks] + [(short, 0.25)]
    assert [id(t) for t, _ in rows] == [id(c) for c in long.chunks] + [id(short)]
    # Without windows a group is plain trajectories, one row each, as before.
    plain = [[_chunk(1.0), _chunk(0.0)]]
    assert chunk_rows(plain, torch.tensor([[0.5, -0.5]]), torch.tensor([[True, False]])) == [(plain[0][0], 0.5)]
