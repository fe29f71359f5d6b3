"""Environment speed: steps per second of every registered looprl environment.

For each id it plays oracle episodes (the tool calls a trained agent makes) and
malformed actions (the error path a young policy hits most), and prints steps/s for
both, with the ratio against `looprl/Calc-v0`, the baseline measured in the same run.

    python bench/envs.py [--seconds 3] [ID ...]
"""

from __future__ import annotations

import argparse
import time

import gymnasium
import numpy as np

from looprl.envs import env_ids
from looprl.envs.checker import hostile_actions

BASELINE = "looprl/Calc-v0"


def oracle_steps_per_s(env_id: str, seconds: float) -> float:
    env = gymnasium.make(env_id, disable_env_checker=True).unwrapped
    steps, seed, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.oracle_action())
            done = terminated or truncated
            steps += 1
        seed += 1
    return steps / (time.perf_counter() - start)


def malformed_steps_per_s(env_id: str, seconds: float) -> float:
    env = gymnasium.make(env_id, disable_env_checker=True).unwrapped
    env.reset(seed=0)
    actions = hostile_actions(np.random.default_rng(0), [t.name for t in env.tools], 500)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        _, _, terminated, truncated, _ = env.step(actions[steps % len(actions)])
        if terminated or truncated:
            env.reset(seed=steps)
        steps += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", help="environment ids (default: all registered)")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = parser.parse_args()
    ids = args.ids or env_ids()
    if BASELINE not in ids:
        ids = [BASELINE, *ids]
    rows = {env_id: (oracle_steps_per_s(env_id, args.seconds), malformed_steps_per_s(env_id, args.seconds))
            for env_id in ids}
    base_oracle, base_bad = rows[BASELINE]
    print("| environment | oracle steps/s | vs Calc-v0 | malformed steps/s | vs Calc-v0 |")
    print("|---|---|---|---|---|")
    for env_id, (oracle, bad) in rows.items():
        print(f"| {env_id} | {oracle:,.0f} | {oracle / base_oracle:.2f}x | {bad:,.0f} | {bad / base_bad:.2f}x |")


if __name__ == "__main__":
    main()
