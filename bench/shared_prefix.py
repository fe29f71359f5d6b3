"""The engine's shared prefix (`rollout.shared_prefix`): episodes/s of concurrent Calc-v0
episodes whose first turns prefill their common start (the system prompt with the tools'
signatures) once, against the same episodes with only the per-episode prefix cache,
measured in the same run, alternating, best of `--repeats`.

It matters where the shared start is most of the prompt: SmolLM2's Calc prompt is ~330
tokens, ~300 of them the system turn.

    python bench/shared_prefix.py [--model looprl/smollm2-135m-instruct] [--episodes 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from looprl.envs import make_env
from looprl.rollout.agent import ObservationTemplater, run_episode
from looprl.rollout.engine import HFEngine, SamplingParams
from looprl.train.models import load_model, load_tokenizer, resolve_model_path

ENV_ID = "looprl/Calc-v0"
KWARGS = {"min_operand": 1, "max_operand": 99, "num_operands": 3, "operators": "+-*", "max_turns": 3}


def play(engine, tokenizer, params, episodes: int, max_tokens: int) -> tuple[float, dict[str, float]]:
    """Seconds to play `episodes` concurrent episodes, and the engine's metrics over them."""
    templater = ObservationTemplater(tokenizer)

    async def wave():
        return await asyncio.gather(*[run_episode(make_env(ENV_ID, **KWARGS), engine, tokenizer, templater, params,
                                                  seed=s, max_tokens=max_tokens) for s in range(episodes)])

    since = dict(engine.stats)
    torch.manual_seed(0)
    start = time.perf_counter()
    asyncio.run(wave())
    return time.perf_counter() - start, engine.metrics(since)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="looprl/tiny", help="looprl/tiny, looprl/smollm2-135m-instruct, a folder")
    parser.add_argument("--episodes", type=int, default=32, help="concurrent episodes per measurement")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per turn")
    parser.add_argument("--max-tokens", type=int, default=512, help="token limit per episode")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each setting (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = resolve_model_path(args.model, {})
    model, tokenizer = load_model(path).eval(), load_tokenizer(path)
    engines = {shared: HFEngine(model, tokenizer, max_batch_size=max(args.episodes, 1), shared_prefix=shared)
               for shared in (False, True)}
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0)
    best: dict[bool, tuple[float, dict[str, float]]] = {}
    for _ in range(args.repeats):
        for shared, engine in engines.items():
            seconds, metrics = play(engine, tokenizer, params, args.episodes, args.max_tokens)
            if shared not in best or seconds < best[shared][0]:
                best[shared] = (seconds, metrics)

    print(f"{args.episodes} concurrent episodes of {ENV_ID} {KWARGS}, {args.model}, {args.threads} torch thread(s), "
          f"best of {args.repeats}")
    print("| engine | seconds | episodes/s | prefix hit | ratio |")
    print("|---|---|---|---|---|")
    base = best[False][0]
    for shared, label in ((False, "per-episode prefix cache (default)"), (True, "+ shared prefix")):
        seconds, metrics = best[shared]
        print(f"| {label} | {seconds:.1f} | {args.episodes / seconds:.2f} | {metrics['perf/engine_prefix_hit']:.0%} "
              f"| {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
