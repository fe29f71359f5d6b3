"""`ReviseAttempts`: an episode is one more attempt at a task, after earlier attempts.

The wrapper turns any environment whose attempts end (a final-answer or submit tool that
terminates, or the turn limit) into a self-improvement environment for ExIt (Jiang et
al. 2025, "Bootstrapping Task Spaces for Self-Improvement"). `reset` replays a
recorded history of actions that may span several finished attempts: each attempt is
played in a fresh episode of the wrapped environment on the same task (same seed),
so a history that ends an episode, which the plain env cannot replay, becomes a
"previous attempt". The agent then sees the earlier attempt(s) as the transcript it
would have seen, followed by a user message asking for a revision (or, in "diverge"
mode, a significantly different approach), and plays one new attempt; the episode ends
when that attempt ends, with that attempt's reward.

With an empty history the wrapper is the wrapped environment: the first attempt.

For warm-starting (SFT on expert episodes), `expert_previous=p` makes a reset without a
history start, with probability p, after an expert's previous attempt: the scripted
expert's own (correct) attempt, or half the time one whose final action is taken from
the expert of another task (usually wrong). The expert's revision then teaches the
format of a revision, as instruction tuning teaches a chat model before ExIt.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np

REVISE_PROMPT = "Revise your last solution: check it, then give your final answer again."
DIVERGE_PROMPT = "Solve the task again with a significantly different approach, then give your final answer."
MODES = ("revise", "diverge")
CONTEXTS = ("last", "all")


class ReviseAttempts(gymnasium.Wrapper):
    """Replays earlier finished attempts as a transcript, then asks for one revision.

    Reset options: `"history"`: every action of the earlier attempts, in order (the
    last attempt may be unfinished, then it is continued); `"modes"`: for each finished
    attempt in the history, the prompt that follows it, `"revise"` or `"diverge"`
    (default all `"revise"`). Other options are refused.

    Args:
        env: the environment (text actions; deterministic given seed and actions).
        context: `"last"` shows only the last finished attempt (the context stays
            bounded however many revisions were made, as in ExIt); `"all"` shows all.
        revise_prompt: the user message that asks for a revision.
        diverge_prompt: the user message of the self-divergence mode.
        expert_previous: probability that a reset without history first plays an
            expert's previous attempt (for warm-start data; see the module docstring).

    Attributes:
        history: every action of the episode so far, replayed ones included.
        modes: the prompt mode that followed each finished attempt.
        attempts: finished attempts so far (replayed and new).
        attempt_ended: the current attempt ended (terminated or truncated by the env),
            so `history` is a valid starting point for a further revision.
    """

    def __init__(self, env: gymnasium.Env, *, context: str = "last", revise_prompt: str = REVISE_PROMPT,
                 diverge_prompt: str = DIVERGE_PROMPT, expert_previous: float = 0.0) -> None:
        if context not in CONTEXTS:
            raise ValueError(f"Expect `context` to be one of {CONTEXTS}, actually: {context!r}")
        if not 0.0 <= expert_previous <= 1.0:
            raise ValueError(f"Expect `expert_previous` in [0, 1], actually: {expert_previous!r}")
        self.expert_previous = expert_previous
        super().__init__(env)
        self.context = context
        self.prompts = {"revise": revise_prompt, "diverge": diverge_prompt}
        self.history: list[str] = []
        self.modes: list[str] = []
        self.attempts = 0
        self.attempt_ended = False
        self._seed: int | None = None

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Replays `options["history"]` attempt by attempt; returns the conversation so far.

        Returns:
            `(obs, info)` as the wrapped env's reset: `info["messages"]` is the whole
            conversation the agent sees (system, task, shown attempts, revision prompt),
            `info["attempts"]` the finished attempts replayed.

        Raises:
            ValueError: unknown options, `modes` not matching the finished attempts.
        """
        history, modes = _read_options(options)
        if seed is None:  # every attempt must pose the same task: fix a seed now
            seed = int(np.random.default_rng().integers(0, 2**31 - 1))
        self._seed = seed
        if not history and options is None and self.expert_previous > 0:
            history = self._expert_attempt(seed)
        self.history, self.modes, self.attempts, self.attempt_ended = [], [], 0, False
        obs, info = self.env.reset(seed=seed)
        first = [dict(m) for m in info["messages"]]  # system + task
        prompts: list[list[dict]] = [[]]  # the revision prompt before each attempt
        shown: list[list[dict]] = [[]]  # the messages of each attempt
        for action in history:
            if self.attempt_ended:
                obs, prompt = self._next_attempt(modes)
                prompts.append(prompt)
                shown.append([])
            obs, _, terminated, truncated, step_info = self.env.step(action)
            self.history.append(action)
            shown[-1] += [{"role": "assistant", "content": action}, *step_info["messages"]]
            self.attempt_ended = terminated or truncated
        if self.attempt_ended:
            obs, prompt = self._next_attempt(modes)
            prompts.append(prompt)
            shown.append([])
        if modes is not None and len(modes) != self.attempts:
            raise ValueError(f"options['modes'] has {len(modes)} entries, but the history holds "
                             f"{self.attempts} finished attempt(s)")
        # "last": the task, the last finished attempt, then the prompt and attempt now played.
        first_shown = max(len(shown) - 2, 0) if self.context == "last" else 0
        messages = list(first)
        for i in range(first_shown, len(shown)):
            messages += (prompts[i] if i > first_shown else []) + shown[i]
        turn = sum(m["role"] == "assistant" for m in shown[-1])  # turns of the attempt now played
        return obs, {**info, "messages": messages, "attempts": self.attempts, "replayed": len(history), "turn": turn}

    def step(self, action: str):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.history.append(action)
        self.attempt_ended = terminated or truncated
        return obs, reward, terminated, truncated, {**info, "attempts": self.attempts + self.attempt_ended}

    def _expert_attempt(self, seed: int) -> list[str]:
        """A previous attempt for warm-start data, drawn deterministically from `seed` (maybe none)."""
        rng = np.random.default_rng(seed)
        if rng.random() >= self.expert_previous:
            return []
        actions = _expert_actions(self.env, seed)
        if rng.random() < 0.5:  # a wrong attempt: the last action from another task's expert
            other = _expert_actions(self.env, int(rng.integers(0, 2**31 - 1)))
            actions = [*actions[:-1], other[-1]]
            self.env.reset(seed=seed)
            for i, action in enumerate(actions):
                *_, terminated, truncated, _ = self.env.step(action)
                if terminated or truncated:
                    return actions[:i + 1]
            while not (terminated or truncated):  # the swapped action did not end it: the expert does
                actions.append(self.env.unwrapped.oracle_action())
                *_, terminated, truncated, _ = self.env.step(actions[-1])
        return actions

    def _next_attempt(self, modes: list[str] | None) -> tuple[str, list[dict]]:
        """Closes the finished attempt and starts the next one on the same task."""
        mode = modes[self.attempts] if modes and self.attempts < len(modes) else "revise"
        self.modes.append(mode)
        self.attempts += 1
        self.attempt_ended = False
        self.env.reset(seed=self._seed)
        prompt = self.prompts[mode]
        return prompt, [{"role": "user", "content": prompt}]


def _expert_actions(env: gymnasium.Env, seed: int) -> list[str]:
    """The scripted expert's whole attempt at the task of `seed`."""
    env.reset(seed=seed)
    actions, done = [], False
    while not done:
        actions.append(env.unwrapped.oracle_action())
        *_, terminated, truncated, _ = env.step(actions[-1])
        done = terminated or truncated
    return actions


def _read_options(options: dict[str, Any] | None) -> tuple[list[str], list[str] | None]:
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ValueError(f"Expect `options` to be a dict or None, actually: {options!r:.200}")
    unknown = set(options) - {"history", "modes"}
    if unknown:
        raise ValueError(f"Unknown reset option(s) {sorted(unknown)}; ReviseAttempts takes 'history' and 'modes'")
    history = options.get("history", [])
    if not isinstance(history, (list, tuple)) or not all(isinstance(a, str) for a in history):
        raise ValueError(f"Expect options['history'] to be a list of str, actually: {history!r:.200}")
    modes = options.get("modes")
    if modes is not None and (not isinstance(modes, (list, tuple)) or any(m not in MODES for m in modes)):
        raise ValueError(f"Expect options['modes'] to be a list of {MODES}, actually: {modes!r:.200}")
    return list(history), list(modes) if modes is not None else None
