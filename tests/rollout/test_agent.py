"""The agent loop is token-in/token-out (docs/architecture.md, "Trajectory").

The trajectory's sampled ids are exactly what the engine returned, the loss mask covers
exactly those ids, everything else is the chat template's rendering of the
conversation, and the behaviour logprobs are what a fresh forward pass of the same
weights gives at the sampling temperature.
"""

from __future__ import annotations

import asyncio

import gymnasium
import pytest
import torch

from looprl.envs import make_env, run_oracle
from looprl.rollout.agent import ObservationTemplater, expert_trajectory, run_episode
from looprl.rollout.engine import Completion, HFEngine, SamplingParams
from looprl.train.batch import collate, policy_logprobs

ENV_ID = "looprl/Calc-v0"
TOLERANCE = 1e-4


class RecordingEnv(gymnasium.Wrapper):
    """Keeps what one episode's `reset` and `step` calls saw and returned."""

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.reset_info, self.actions, self.steps = info, [], []
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.actions.append(action)
        self.steps.append({"terminated": terminated, "truncated": truncated, "info": info})
        return obs, reward, terminated, truncated, info


class RecordingEngine:
    """Forwards to a shared engine and keeps every request and completion of one episode."""

    def __init__(self, inner):
        self.inner = inner
        self.requests, self.completions = [], []

    @property
    def version(self) -> int:
        return self.inner.version

    def update_weights(self, state_dict=None) -> None:
        self.inner.update_weights(state_dict)

    async def generate(self, requests):
        completions = await self.inner.generate(requests)
        self.requests += list(requests)
        self.completions += completions
        return completions


class ScriptedEngine:
    """Returns fixed completions, one per request, in order."""

    version = 3

    def __init__(self, completions: list[Completion]):
        self.script = list(completions)
        self.requests, self.completions = [], []

    def update_weights(self, state_dict=None) -> None:
        self.version += 1

    async def generate(self, requests):
        out = [self.script.pop(0) for _ in requests]
        self.requests += list(requests)
        self.completions += out
        return out


def play(engine, tokenizer, params, seeds, max_tokens=2048):
    """Run one episode per seed concurrently, each with its own recording env and engine."""
    templater = ObservationTemplater(tokenizer)
    envs = [RecordingEnv(make_env(ENV_ID)) for _ in seeds]
    engines = [RecordingEngine(engine) if isinstance(engine, HFEngine) else engine for _ in seeds]

    async def run():
        return await asyncio.gather(*[
            run_episode(env, eng, tokenizer, templater, params, seed=seed, max_tokens=max_tokens)
            for env, eng, seed in zip(envs, engines, seeds)
        ])

    return asyncio.run(run()), envs, engines


def turn_text(tokenizer, completion: Completion) -> str:
    ids = completion.token_ids[:-1] if completion.finished else completion.token_ids
    return tokenizer.decode(ids, skip_special_tokens=False)


def check_layout(traj, tokenizer, env: RecordingEnv, completions, requests=None) -> None:
    """Assert the token layout of `traj` against what its engine and env recorded."""
    eos = tokenizer.eos_token_id
    ids, mask, spans = traj.input_ids, traj.loss_mask, traj.turn_spans
    assert len(spans) == len(completions) == len(env.steps) >= 1

    # The mask is 1 exactly on the sampled ids, which are the engine's ids.
    sampled_positions = [p for start, end in spans for p in range(start, end)]
    assert [ids[p] for p in sampled_positions] == [t for c in completions for t in c.token_ids]
    assert [p for p, m in enumerate(mask) if m != 0] == sampled_positions
    assert sum(mask) == sum(len(c.token_ids) for c in completions)
    assert set(mask) <= {0, 1}
    assert [traj.behaviour_logprobs[p] for p in sampled_positions] == [lp for c in completions for lp in c.logprobs]
    unsampled = set(range(len(ids))) - set(sampled_positions)
    assert all(traj.behaviour_logprobs[p] == 0.0 for p in unsampled)

    # Each turn was asked for with exactly the ids that precede it (token-in).
    if requests is not None:
        assert [r.prompt_ids for r in requests] == [ids[:start] for start, _ in spans]

    # The prompt is the chat template's rendering with the tools and a generation prompt.
    reset = env.reset_info
    prompt_text = tokenizer.apply_chat_template(
        reset["messages"], tools=reset["tools"], add_generation_prompt=True, tokenize=False
    )
    assert ids[: spans[0][0]] == tokenizer.encode(prompt_text, add_special_tokens=False)

    # After each turn: eos (sampled, or appended unmasked if the turn was cut), then
    # the templated observation, unless the episode ended at that step.
    templater = ObservationTemplater(tokenizer)
    next_starts = [start for start, _ in spans[1:]] + [len(ids)]
    for (start, end), completion, step, next_start in zip(spans, completions, env.steps, next_starts):
        if completion.finished:
            assert ids[end - 1] == eos and eos not in ids[start:end - 1]
            after = end
        else:
            assert eos not in completion.token_ids
            assert (ids[end], mask[end], traj.behaviour_logprobs[end]) == (eos, 0, 0.0)
            after = end + 1
        ended = step["terminated"] or step["truncated"]
        expected = [] if ended else templater(step["info"]["messages"])
        assert ids[after:next_start] == expected

    # The env read each turn as the decoded sampled ids, and decoding the whole
    # trajectory gives the template's rendering of the whole conversation.
    assert env.actions == [turn_text(tokenizer, c) for c in completions]
    conversation = list(reset["messages"])
    for action, step in zip(env.actions, env.steps):
        conversation.append({"role": "assistant", "content": action})
        if not (step["terminated"] or step["truncated"]):
            conversation += step["info"]["messages"]
    last_ended = env.steps[-1]["terminated"] or env.steps[-1]["truncated"]
    rendered = tokenizer.apply_chat_template(
        conversation, tools=reset["tools"], add_generation_prompt=not last_ended, tokenize=False
    )
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    # The engine stops at eos, so a trajectory that ends with a turn lacks the "\n"
    # the template writes after it.
    assert decoded + ("\n" if last_ended else "") == rendered


def test_sampled_multi_turn_episodes_are_token_exact(peaked_model, tokenizer):
    torch.manual_seed(0)
    engine = HFEngine(peaked_model, tokenizer)
    trajs, envs, engines = play(engine, tokenizer, SamplingParams(max_new_tokens=12), seeds=range(4))

    for traj, env, eng in zip(trajs, envs, engines):
        check_layout(traj, tokenizer, env, eng.completions, eng.requests)
        assert traj.num_turns >= 2
    finished = [c.finished for eng in engines for c in eng.completions]
    assert any(finished) and not all(finished), "both stop-token and max_new_tokens turns must occur"
    assert all(len(c.token_ids) == 12 for eng in engines for c in eng.completions if not c.finished)


def test_untrained_model_garbage_turns_are_token_exact(model, tokenizer):
    """Near-uniform sampling: every turn is garbage text, an error observation, and a cut."""
    torch.manual_seed(1)
    engine = HFEngine(model, tokenizer)
    trajs, envs, engines = play(engine, tokenizer, SamplingParams(max_new_tokens=8), seeds=[5, 6])

    for traj, env, eng in zip(trajs, envs, engines):
        check_layout(traj, tokenizer, env, eng.completions, eng.requests)
        assert traj.num_turns == env.unwrapped.max_turns and traj.truncated and not traj.terminated
        assert traj.reward == 0.0
        assert any(m["content"].startswith("Error:") for s in env.steps for m in s["info"]["messages"])


def oracle_completions(tokenizer, seed: int) -> list[Completion]:
    eos = tokenizer.eos_token_id
    completions = []
    for i, action in enumerate(run_oracle(ENV_ID, seed)):
        ids = tokenizer.encode(action, add_special_tokens=False) + [eos]
        completions.append(Completion(ids, [-0.5 - 0.01 * (i + j) for j in range(len(ids))], True, 3))
    return completions


@pytest.mark.parametrize("cut_first_turn", [False, True])
def test_scripted_episode_is_token_exact_and_solves_the_task(tokenizer, cut_first_turn):
    oracle = oracle_completions(tokenizer, seed=7)
    assert len(oracle) == 2  # calculator, then answer
    script = list(oracle)
    if cut_first_turn:  # a turn cut at max_new_tokens: no eos, the env reads a partial call
        partial = oracle[0].token_ids[:6]
        script.insert(0, Completion(partial, [-1.0] * len(partial), False, 3))
    engine = ScriptedEngine(script)
    (traj,), (env,), _ = play(engine, tokenizer, SamplingParams(max_new_tokens=64), seeds=[7])

    check_layout(traj, tokenizer, env, engine.completions, engine.requests)
    assert traj.num_turns == len(script)
    assert traj.turn_rewards == [0.0] * (len(script) - 1) + [1.0]
    assert traj.terminated and not traj.truncated and traj.info["success"]
    assert traj.policy_version == 3
    if cut_first_turn:
        start, end = traj.turn_spans[0]
        assert traj.input_ids[end] == tokenizer.eos_token_id and traj.loss_mask[end] == 0
        assert sum(traj.loss_mask) == sum(len(c.token_ids) for c in script)


def test_episode_is_truncated_at_max_tokens_and_last_turn_clipped(model, tokenizer):
    torch.manual_seed(0)
    _, info = make_env(ENV_ID).reset(seed=3)
    prompt_len = len(tokenizer.apply_chat_template(
        info["messages"], tools=info["tools"], add_generation_prompt=True, tokenize=True, return_dict=False,
    ))
    engine = HFEngine(model, tokenizer)
    (traj,), (env,), (eng,) = play(engine, tokenizer, SamplingParams(max_new_tokens=12), [3], prompt_len + 5)

    assert eng.requests[0].params == SamplingParams(max_new_tokens=5, temperature=1.0)
    assert traj.num_turns == 1 and len(eng.completions[0].token_ids) <= 5
    assert traj.truncated and not traj.terminated
    check_layout(traj, tokenizer, env, eng.completions, eng.requests)


def fresh_logprobs(model, ids: list[int], temperature: float) -> list[float]:
    """log softmax(logits / T) of each token given the ones before it (index 0: 0.0)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double() / temperature  # (L, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return [0.0] + logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_a_fresh_forward_pass(peaked_model, tokenizer, temperature):
    torch.manual_seed(2)
    engine = HFEngine(peaked_model, tokenizer)
    params = SamplingParams(max_new_tokens=10, temperature=temperature)
    trajs, _, _ = play(engine, tokenizer, params, seeds=range(3))
    assert all(t.num_turns >= 2 for t in trajs)

    # One path: the trainer's own batching (right-padded) and logprobs.
    batch = collate(trajs, tokenizer.pad_token_id)
    mask = batch.loss_mask.bool()
    with torch.no_grad():
        trainer_lp = policy_logprobs(peaked_model, batch, temperature=temperature)
        other_lp = policy_logprobs(peaked_model, batch, temperature=1.3 * temperature)
    trainer_diff = (trainer_lp - batch.old_logprobs)[mask].abs().max().item()
    assert trainer_diff < TOLERANCE
    # The check sees the temperature: the wrong one is far off.
    assert (other_lp - batch.old_logprobs)[mask].abs().max().item() > 100 * TOLERANCE

    # Another path: one sequence at a time, written out by hand.
    fresh_diff = 0.0
    for traj in trajs:
        fresh = fresh_logprobs(peaked_model, traj.input_ids, temperature)
        for p, m in enumerate(traj.loss_mask):
            if m:
                fresh_diff = max(fresh_diff, abs(fresh[p] - traj.behaviour_logprobs[p]))
            else:
                assert traj.behaviour_logprobs[p] == 0.0
    assert fresh_diff < TOLERANCE
    assert sum(t.num_sampled_tokens for t in trajs) > 30


def test_expert_trajectory_masks_oracle_tokens_and_eos(tokenizer):
    seed = 11
    actions = run_oracle(ENV_ID, seed)
    env = RecordingEnv(make_env(ENV_ID))
    traj = expert_trajectory(env, tokenizer, ObservationTemplater(tokenizer), seed=seed)

    eos = tokenizer.eos_token_id
    expected_turns = [tokenizer.encode(a, add_special_tokens=False) + [eos] for a in actions]
    assert [traj.input_ids[s:e] for s, e in traj.turn_spans] == expected_turns
    assert sum(traj.loss_mask) == sum(len(t) for t in expected_turns)
    assert traj.terminated and traj.info["success"] and traj.reward == 1.0
    assert env.actions == actions

    completions = [Completion(t, [0.0] * len(t), True, 0) for t in expected_turns]
    check_layout(traj, tokenizer, env, completions)

    # The same ids and mask as a rollout whose engine sampled the oracle's tokens.
    (rollout,), _, _ = play(ScriptedEngine(completions), tokenizer, SamplingParams(), seeds=[seed])
    assert (rollout.input_ids, rollout.loss_mask, rollout.turn_spans) == (
        traj.input_ids, traj.loss_mask, traj.turn_spans
    )
