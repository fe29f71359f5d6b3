"""`ReviseAttempts`: finished attempts replay as a transcript, then one revision is played."""

from __future__ import annotations

import pytest

from looprl.envs import format_tool_call, make_env, run_oracle
from looprl.envs.revise import DIVERGE_PROMPT, REVISE_PROMPT, ReviseAttempts

SEED = 3
ORACLE = run_oracle("looprl/Calc-v0", SEED)  # calculator, then answer
WRONG = [ORACLE[0], format_tool_call("answer", {"value": -1})]


def revise(**kwargs) -> ReviseAttempts:
    return ReviseAttempts(make_env("looprl/Calc-v0"), **kwargs)


def test_without_history_it_is_the_wrapped_env():
    obs, info = revise().reset(seed=SEED)
    plain_obs, plain_info = make_env("looprl/Calc-v0").reset(seed=SEED)
    assert (obs, info["messages"], info["attempts"]) == (plain_obs, plain_info["messages"], 0)


def test_a_finished_attempt_becomes_the_transcript_and_the_revision_is_graded():
    env = revise()
    obs, info = env.reset(seed=SEED, options={"history": WRONG})
    assert obs == REVISE_PROMPT and info["attempts"] == 1
    roles = [(m["role"], m["content"]) for m in info["messages"][2:]]
    assert roles == [("assistant", WRONG[0]), ("tool", "19"), ("assistant", WRONG[1]), ("tool", "Incorrect."),
                     ("user", REVISE_PROMPT)]
    assert env.unwrapped.oracle_action() == ORACLE[0]  # a fresh attempt at the same task
    assert not env.attempt_ended
    rewards = [env.step(a)[1] for a in ORACLE]
    assert rewards == [0.0, 1.0] and env.attempt_ended and env.history == WRONG + ORACLE


def test_replay_restores_the_state_a_live_episode_reached():
    live = revise()
    live.reset(seed=SEED, options={"history": WRONG})
    live_obs = live.step(ORACLE[0])[0]
    replayed = revise()
    obs, info = replayed.reset(seed=SEED, options={"history": WRONG + ORACLE[:1]})
    assert obs == live_obs and info["attempts"] == 1 and replayed.history == live.history
    assert replayed.unwrapped.oracle_action() == live.unwrapped.oracle_action() == ORACLE[1]
    assert replayed.step(ORACLE[1])[1:3] == live.step(ORACLE[1])[1:3] == (1.0, True)


def test_context_last_shows_one_attempt_and_all_shows_every_one():
    history = WRONG + ORACLE
    _, last = revise().reset(seed=SEED, options={"history": history, "modes": ["revise", "diverge"]})
    _, every = revise(context="all").reset(seed=SEED, options={"history": history, "modes": ["revise", "diverge"]})
    assert [m["content"] for m in last["messages"][2:]] == [ORACLE[0], "19", ORACLE[1], "Correct.", DIVERGE_PROMPT]
    assert [m["content"] for m in every["messages"][2:]] == [
        WRONG[0], "19", WRONG[1], "Incorrect.", REVISE_PROMPT, ORACLE[0], "19", ORACLE[1], "Correct.", DIVERGE_PROMPT]
    assert last["attempts"] == every["attempts"] == 2


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="modes.*2 finished"):
        revise().reset(seed=SEED, options={"history": WRONG + ORACLE, "modes": ["revise"]})
    with pytest.raises(ValueError, match="Unknown reset option"):
        revise().reset(seed=SEED, options={"task": "calc:1 + 2"})
    with pytest.raises(ValueError, match="context"):
        revise(context="none")


def test_expert_previous_attempts_are_deterministic_per_seed():
    firsts = []
    for _ in range(2):
        env = revise(expert_previous=1.0)
        firsts.append([env.reset(seed=s)[1]["messages"] for s in range(8)])
    assert firsts[0] == firsts[1]
    results = {m[5]["content"] for m in firsts[0]}  # the previous attempt's answer result
    assert results == {"Correct.", "Incorrect."}


@pytest.mark.parametrize("env_id", ["looprl/SQL-v0", "looprl/Code-v0", "looprl/Hanoi-v0", "looprl/Apps-v0"])
def test_every_env_with_a_final_action_can_be_revised(env_id):
    finished = run_oracle(env_id, 1)
    env = ReviseAttempts(make_env(env_id))
    _, info = env.reset(seed=1, options={"history": finished})
    assert info["attempts"] == 1 and info["messages"][-1]["content"] == REVISE_PROMPT
    done, total = False, 0.0
    while not done:
        _, reward, terminated, truncated, step_info = env.step(env.unwrapped.oracle_action())
        total, done = total + reward, terminated or truncated
    assert step_info["success"] and env.attempt_ended and env.history[:len(finished)] == finished
    env.close()
