"""Rollout throughput: episodes/s of concurrent episodes through one batched `HFEngine`,
against the same episodes played one at a time, measured in the same run.

Two settings, each on `looprl/Calc-v0` with the built-in tiny model (untrained: every
turn runs to `--max-new-tokens`, so every episode does the same work):
- no tool latency: the engine's turn-level batching alone;
- a tool latency of `--latency-ms` per step (a wrapper env that sleeps): the steps run
  off the event loop, so concurrent episodes wait for their tools at the same time.

The concurrent episodes run twice: with the engine's prefix cache (each episode's keys
and values kept between its turns, the default) and without it (each turn re-reads the
episode's whole context, which on long contexts is most of what a batch pays for).

    python bench/rollout.py [--episodes 32] [--concurrency 32] [--latency-ms 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import gymnasium
import torch

from looprl.envs import make_env
from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.engine import HFEngine, SamplingParams
from looprl.train.models import load_model, load_tokenizer, resolve_model_path

ENV_ID = "looprl/Calc-v0"


class ToolLatency(gymnasium.Wrapper):
    """Every step takes `seconds` longer, as a remote tool would."""

    def __init__(self, env, seconds: float):
        super().__init__(env)
        self.seconds = seconds

    def step(self, action):
        time.sleep(self.seconds)
        return self.env.step(action)


def episodes_per_s(engine, tokenizer, params, *, episodes: int, concurrency: int, latency_s: float,
                   max_tokens: int) -> tuple[float, dict[str, float]]:
    """Play `episodes` episodes, `concurrency` at a time; episodes/s and the engine's metrics."""
    templater = ObservationTemplater(tokenizer)

    def env():
        base = make_env(ENV_ID)
        return ToolLatency(base, latency_s) if latency_s else base

    async def wave(seeds):
        return await asyncio.gather(*[run_episode(env(), engine, tokenizer, templater, params, seed=s,
                                                  max_tokens=max_tokens) for s in seeds])

    since = dict(engine.stats)
    torch.manual_seed(0)
    start = time.perf_counter()
    turns = 0
    for first in range(0, episodes, concurrency):
        trajectories = asyncio.run(wave(range(first, min(first + concurrency, episodes))))
        turns += sum(t.num_turns for t in trajectories)
    elapsed = time.perf_counter() - start
    return episodes / elapsed, {**engine.metrics(since), "turns": turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=32, help="episodes per measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent episodes in the batched runs")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="tool latency per step in the second setting")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per turn")
    parser.add_argument("--max-tokens", type=int, default=1024, help="token limit per episode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--tiny-hidden", type=int, default=None, help="tiny model hidden size (default: the recipe's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    spec = {} if args.tiny_hidden is None else {"hidden_size": args.tiny_hidden}
    path = resolve_model_path("looprl/tiny", spec)
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)
    engines = {cache: HFEngine(model, tokenizer, max_batch_size=max(args.concurrency, 1), prefix_cache=cache)
               for cache in (True, False)}
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    run = lambda concurrency, latency_s, cache=True: episodes_per_s(  # noqa: E731
        engines[cache], tokenizer, params, episodes=args.episodes, concurrency=concurrency, latency_s=latency_s,
        max_tokens=args.max_tokens)

    run(args.concurrency, 0.0), run(args.concurrency, 0.0, cache=False)  # warm-up
    latency = args.latency_ms / 1000
    rows = []
    for label, latency_s in (("no tool latency", 0.0), (f"{args.latency_ms:g} ms tool latency", latency)):
        baseline, _ = run(1, latency_s)
        uncached, _ = run(args.concurrency, latency_s, cache=False)
        batched, metrics = run(args.concurrency, latency_s)
        rows.append((label, baseline, uncached, batched, metrics))

    print(f"{args.episodes} episodes of {ENV_ID}, tiny model, {args.max_new_tokens} tokens per turn, "
          f"{args.threads} torch thread(s)")
    n = args.concurrency
    print(f"| setting | one at a time (episodes/s) | {n} concurrent, no prefix cache | ratio | {n} concurrent "
          "| ratio | prefix hit | batch occupancy | row occupancy | engine busy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, baseline, uncached, batched, m in rows:
        wall = args.episodes / batched
        print(f"| {label} | {baseline:.2f} | {uncached:.2f} | {uncached / baseline:.1f}x | {batched:.2f} "
              f"| {batched / baseline:.1f}x | {m['perf/engine_prefix_hit']:.0%} "
              f"| {m['perf/engine_batch_occupancy']:.2f} | {m['perf/engine_row_occupancy']:.2f} "
              f"| {m['perf/engine_busy_s'] / wall:.0%} |")


if __name__ == "__main__":
    main()
